"""The CharForge panel's server routes (nodes/panel.py) through a real aiohttp server: what they list, the
files they serve, and every way out of CharForge's folders refused; cancel and resume through ComfyUI."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

SECRET = "not for the browser"


@pytest.fixture
def pack(comfy_env):
    """The routes registered on the ComfyUI stand-in, with one run, one dataset and one character on disk."""
    from charforge import bridge
    from charforge.engine.train.run import MetricsRow, RunFolder
    from charforge.nodes import panel
    from charforge.nodes.train import runs_directory

    bridge.register_model_folders()  # what pack.py does: models/charforge holds the characters
    assert panel.register_routes()
    folder = RunFolder.create(runs_directory(), "alice")
    folder.update_status(state="cancelled", step=3, total_steps=10, loss=0.2, state_step=3)
    folder.write_config(
        {
            "config": {"steps": 10, "lora": {"rank": 4}},
            "arch": "sd15",
            "base_model": "/m/tiny",
            "trigger_word": "sks",
            "dataset": {"images": 2},
        }
    )
    folder.append_metrics([MetricsRow(s, 1.0 / s, 1e-4, 2.0, 0, s * 0.5) for s in (1, 2, 3)])
    folder.state_path.write_bytes(b"state")
    folder.samples_dir.mkdir()
    for name in ("step_000002_0.png", "step_000002_1.png", "step_000003_0.png"):
        (folder.samples_dir / name).write_bytes(b"\x89PNG sample")
    folder.loss_curve_path.write_bytes(b"\x89PNG loss")
    folder.write_origin(
        {
            "prompt": {
                "1": {
                    "class_type": "CharForgeTrainLoRA",
                    "inputs": {"output_name": "alice", "resume": "never"},
                },
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
            },
            "prompt_id": "p-1",
            "workflow": {"nodes": []},
        }
    )

    datasets = Path(panel.datasets_directory())
    report = datasets / "alice" / "report"
    report.mkdir(parents=True)
    (datasets / "alice" / "manifest.json").write_text("{}")
    (report / "report.json").write_text(
        json.dumps(
            {
                "counts": {"images": 5, "accepted": 4, "rejected": 1},
                "rejection_reasons": {"too small": 1},
                "captions": {"coverage": 1.0},
                "trigger": {"word": "sks"},
                "contact_sheets": ["contact_sheet_001.png"],
            }
        )
    )
    (report / "report.html").write_text("<html>report</html>")
    (report / "contact_sheet_001.png").write_bytes(b"\x89PNG sheet")

    characters = comfy_env.base_dir / "models" / "charforge" / "characters"
    characters.mkdir(parents=True)
    (characters / "alice.yaml").write_text(
        "name: alice\ntrigger_words: [sks]\nloras:\n  - {name: alice.safetensors, "
        "weight: 0.8}\nthreshold: 0.35\n"
    )
    (characters / "broken.yaml").write_text("name: [not a name\n")

    (comfy_env.base_dir / "secret.txt").write_text(SECRET)
    (comfy_env.base_dir / "secret.png").write_bytes(SECRET.encode())
    return comfy_env


def _request(env, method: str, path: str, body: dict | None = None, raw: bool = False):
    """One request to an aiohttp server holding the registered routes (ComfyUI's own server does the same)."""
    import yarl
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def go():
        app = web.Application()
        for route_method, route_path, handler in env.server.routes.registered:
            app.router.add_route(route_method, route_path, handler)
        async with TestClient(TestServer(app)) as client:
            url = str(client.make_url("")).rstrip("/") + path
            # raw: sent byte for byte (no client-side ".." folding), as a hostile client would
            response = await client.session.request(
                method, yarl.URL(url, encoded=True) if raw else url, json=body
            )
            return response.status, await response.read(), response.headers.get("Content-Type", "")

    return asyncio.run(go())


def get_json(env, path, method="GET", body=None):
    status, data, _ = _request(env, method, path, body)
    return status, json.loads(data)


def test_routes_are_registered_once(pack):
    from charforge.nodes import panel

    assert panel.register_routes()
    paths = [(m, p) for m, p, _ in pack.server.routes.registered if p.startswith("/charforge/")]
    assert len(paths) == len(set(paths))
    assert ("POST", "/charforge/runs/{run}/cancel") in paths and ("GET", "/charforge/characters") in paths


def test_panel_routes_are_a_no_op_outside_comfyui(no_comfy):
    from charforge.nodes import panel

    assert panel.register_routes() is False


def test_run_details(pack):
    status, run = get_json(pack, "/charforge/runs/alice")
    assert status == 200
    assert (run["name"], run["state"], run["step"], run["total_steps"], run["resumable"]) == (
        "alice",
        "cancelled",
        3,
        10,
        True,
    )
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3] and run["metrics"][1]["loss"] == 0.5
    assert run["samples"] == [
        {"step": 2, "files": ["samples/step_000002_0.png", "samples/step_000002_1.png"]},
        {"step": 3, "files": ["samples/step_000003_0.png"]},
    ]
    assert run["loss_curve"] == "loss.png" and run["can_queue_again"] and run["prompt_id"] == "p-1"
    assert (run["arch"], run["base_model"], run["trigger_word"], run["rank"]) == ("sd15", "tiny", "sks", 4)
    assert "prompt" not in run  # the origin's prompt stays on the server
    assert get_json(pack, "/charforge/runs/nobody")[0] == 404
    assert get_json(pack, "/charforge/runs/_cache")[0] == 404


def test_run_files_are_served(pack):
    status, data, kind = _request(pack, "GET", "/charforge/runs/alice/files/samples/step_000002_1.png")
    assert (status, data, kind) == (200, b"\x89PNG sample", "image/png")
    status, data, _ = _request(pack, "GET", "/charforge/runs/alice/files/loss.png")
    assert (status, data) == (200, b"\x89PNG loss")


@pytest.mark.parametrize(
    "path",
    [
        "/charforge/runs/alice/files/../../../secret.png",
        "/charforge/runs/alice/files/..%2F..%2F..%2Fsecret.png",
        "/charforge/runs/alice/files/%2e%2e/%2e%2e/%2e%2e/secret.png",
        "/charforge/runs/alice/files/samples%2F..%2F..%2F..%2F..%2Fsecret.png",
        "/charforge/runs/alice/files/..%5C..%5C..%5Csecret.png",
        "/charforge/runs/alice/files/%2Fetc%2Fpasswd",
        "/charforge/runs/alice/files//etc/passwd",
        "/charforge/runs/..%2F..%2F..%2F/files/secret.png",
        "/charforge/runs/%2e%2e/files/secret.png",
        "/charforge/runs/alice/files/status.json",  # inside, but not an image the panel shows
        "/charforge/runs/alice/files/state.pt",
        "/charforge/runs/alice/files/samples/missing.png",
        "/charforge/runs/alice/files/samples%00.png",
        "/charforge/datasets/alice/files/../../../../secret.txt",
        "/charforge/datasets/alice/files/report%2F..%2F..%2F..%2F..%2F..%2Fsecret.png",
        "/charforge/datasets/..%2F..%2F..%2F/files/secret.png",
        "/charforge/datasets/alice/files/manifest.json%00.png",
    ],
)
def test_traversal_is_refused(pack, path):
    for raw in (False, True):
        status, data, _ = _request(pack, "GET", path, raw=raw)
        assert status in (400, 404), (path, status)
        assert SECRET.encode() not in data


def test_links_out_of_the_folders_are_refused(pack, tmp_path):
    from charforge.nodes import panel
    from charforge.nodes.train import runs_directory

    outside = tmp_path / "elsewhere"
    (outside / "samples").mkdir(parents=True)
    (outside / "status.json").write_text('{"state": "completed"}')
    (outside / "samples" / "step_000001_0.png").write_bytes(SECRET.encode())
    run = Path(runs_directory()) / "alice"
    os.symlink(pack.base_dir / "secret.png", run / "samples" / "step_000009_0.png")
    os.symlink(outside, Path(runs_directory()) / "linked")
    os.symlink(
        pack.base_dir / "secret.png", Path(panel.datasets_directory()) / "alice" / "report" / "sheet.png"
    )
    for path in (
        "/charforge/runs/alice/files/samples/step_000009_0.png",
        "/charforge/runs/linked",
        "/charforge/runs/linked/files/samples/step_000001_0.png",
        "/charforge/datasets/alice/files/report/sheet.png",
    ):
        status, data, _ = _request(pack, "GET", path)
        assert status == 404 and SECRET.encode() not in data, path


def test_safe_file_rules(tmp_path):
    from charforge.nodes.panel import safe_file

    (tmp_path / "run" / "samples").mkdir(parents=True)
    (tmp_path / "run" / "samples" / "a.png").write_bytes(b"x")
    assert (
        safe_file(tmp_path, "run", "samples/a.png", {".png": "image/png"})
        == (tmp_path / "run/samples/a.png").resolve()
    )
    assert safe_file(tmp_path, "run") == (tmp_path / "run").resolve()
    for name, relative in [
        ("..", ""),
        (".", ""),
        ("run/..", ""),
        ("run\\x", ""),
        ("", ""),
        (".hidden", ""),
        ("run", "../run/samples/a.png"),
        ("run", "samples/../samples/a.png"),
        ("run", "/samples/a.png"),
        ("run", "samples\\a.png"),
        ("run", "samples//a.png"),
        ("run", "samples/a.png\x00"),
        ("run", str(tmp_path / "run/samples/a.png")),
    ]:
        assert safe_file(tmp_path, name, relative, {".png": "image/png"}) is None, (name, relative)
    assert safe_file(tmp_path, "run", "samples/a.png", {".jpg": "image/jpeg"}) is None


def test_datasets_and_their_report(pack):
    status, body = get_json(pack, "/charforge/datasets")
    [dataset] = body["datasets"]
    assert status == 200 and dataset["name"] == "alice"
    assert dataset["counts"]["accepted"] == 4 and dataset["rejection_reasons"] == {"too small": 1}
    assert dataset["report"] == "report/report.html"
    assert dataset["contact_sheets"] == ["report/contact_sheet_001.png"]
    status, data, kind = _request(pack, "GET", "/charforge/datasets/alice/files/report/report.html")
    assert (status, data, kind) == (200, b"<html>report</html>", "text/html; charset=utf-8")
    status, data, kind = _request(pack, "GET", "/charforge/datasets/alice/files/report/contact_sheet_001.png")
    assert (status, kind) == (200, "image/png")


def test_characters(pack):
    status, body = get_json(pack, "/charforge/characters")
    assert status == 200
    alice, broken = body["characters"]
    assert alice["name"] == "alice" and alice["trigger_words"] == ["sks"] and alice["threshold"] == 0.35
    assert alice["loras"] == [{"name": "alice.safetensors", "weight": 0.8, "clip_weight": 0.8}]
    assert broken["name"] == "broken" and "error" in broken


def test_cancel_interrupts_only_the_prompt_training_the_run(pack, monkeypatch):
    from charforge import bridge
    from charforge.engine.train.run import RunFolder, mark_active
    from charforge.nodes.train import runs_directory

    interrupted = []
    monkeypatch.setattr(bridge, "interrupt_prompt", lambda prompt_id: interrupted.append(prompt_id) or True)
    assert get_json(pack, "/charforge/runs/alice/cancel", "POST")[0] == 409  # not training here
    folder = RunFolder(Path(runs_directory()) / "alice")
    mark_active(folder, True)
    try:
        status, body = get_json(pack, "/charforge/runs/alice/cancel", "POST")
    finally:
        mark_active(folder, False)
    assert status == 200 and body == {"cancelled": "alice", "prompt_id": "p-1"} and interrupted == ["p-1"]
    assert _request(pack, "GET", "/charforge/runs/alice/cancel")[0] == 405  # never by a plain GET


def test_resume_queues_the_runs_prompt_again_through_comfyui(pack, monkeypatch):
    from charforge import bridge
    from charforge.engine.train.run import RunFolder
    from charforge.nodes.train import runs_directory

    queued = []

    async def queue_prompt(prompt, client_id=None, workflow=None):
        queued.append((prompt, client_id, workflow))
        return "p-2"

    monkeypatch.setattr(bridge, "queue_prompt", queue_prompt)
    status, body = get_json(pack, "/charforge/runs/alice/resume", "POST", {"client_id": "browser-1"})
    assert status == 200 and body == {"queued": "alice", "prompt_id": "p-2"}
    [(prompt, client_id, workflow)] = queued
    assert prompt["1"]["inputs"] == {"output_name": "alice", "resume": "auto"} and client_id == "browser-1"
    assert prompt["2"] == {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}} and workflow == {
        "nodes": []
    }

    folder = RunFolder(Path(runs_directory()) / "alice")
    folder.update_status(state="completed")
    assert get_json(pack, "/charforge/runs/alice/resume", "POST")[0] == 409  # nothing to resume
    folder.update_status(state="running")
    assert get_json(pack, "/charforge/runs/alice/resume", "POST")[0] == 409  # still training
    folder.update_status(state="cancelled")
    folder.origin_path.unlink()
    status, body = get_json(pack, "/charforge/runs/alice/resume", "POST")
    assert status == 409 and "origin.json" in body["error"]
    assert len(queued) == 1


def test_resume_reports_comfyuis_refusal(pack, monkeypatch):
    from charforge import bridge

    async def refuse(prompt, client_id=None, workflow=None):
        raise bridge.PromptRejected({"message": "Prompt outputs failed validation"}, {"1": {"errors": ["x"]}})

    monkeypatch.setattr(bridge, "queue_prompt", refuse)
    status, body = get_json(pack, "/charforge/runs/alice/resume", "POST")
    assert (
        status == 400
        and "failed validation" in body["error"]
        and body["node_errors"] == {"1": {"errors": ["x"]}}
    )


def test_run_details_carry_the_checkpoint_scores_pick_checkpoint_wrote(pack, comfy_with_faces):
    """Pick Checkpoint on a run's samples writes the scores into the run folder; the run's details show them."""
    import numpy as np
    import torch
    from PIL import Image

    from cf_testing.comfyui import run_node
    from cf_testing.face_models import blank_image, face_image
    from charforge.engine.train.run import RunFolder
    from charforge.nodes.score import BuildIdentity, LoadFaceModels, PickCheckpoint
    from charforge.nodes.train import runs_directory

    assert get_json(pack, "/charforge/runs/alice")[1]["scores"] == []
    folder = RunFolder(Path(runs_directory()) / "alice")
    for path in folder.samples_dir.iterdir():
        path.unlink()
    for step, persons in ((2, [7, None]), (3, [0, 0])):
        for index, person in enumerate(persons):
            image = blank_image() if person is None else face_image(person=person, noise=2, seed=index)
            Image.fromarray(image).save(folder.sample_path(step, index))
    (face_models,) = run_node(LoadFaceModels, pack="buffalo_l", det_size=320, provider="auto").result
    references = [face_image(person=0, noise=2, seed=s) for s in range(3)]
    identity = run_node(
        BuildIdentity,
        face_models=face_models,
        name="alice",
        save=False,
        images=torch.from_numpy(np.stack([r.astype(np.float32) / 255.0 for r in references])),
    ).result[0]
    run = run_node(
        PickCheckpoint,
        face_models=face_models,
        identity=identity,
        samples_folder=str(folder.samples_dir),
        threshold=0.0,
        identity_weight=1.0,
        text_weight=0.5,
    )
    assert run.result[0] == "000003" and "scores saved in alice/scores.json" in run.ui["text"][0]
    status, details = get_json(pack, "/charforge/runs/alice")
    assert status == 200 and details["best_scored_step"] == 3
    assert [(s["step"], s["images"], s["faces"], s["identity"]) for s in details["scores"]] == [
        (2, 2, 1, "alice"),
        (3, 2, 2, "alice"),
    ]
    assert details["scores"][1]["identity_mean"] > details["scores"][0]["identity_mean"]
    # the file stays in the run folder; other runs' folders and the runs folder get nothing
    assert sorted(p.name for p in Path(runs_directory()).iterdir()) == ["alice"]
    assert (folder.root / "scores.json").is_file()
