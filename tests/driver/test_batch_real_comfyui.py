"""``charforge batch run`` against a real ComfyUI (opt-in: ``-m comfyui`` with ``COMFYUI_DIR`` set).

A 3 x 4 x 3 sweep (36 jobs) of built-in CPU nodes, then the same batch killed mid-run and resumed. Loopback
ports 18300-18399 only.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from fakes.batch_checks import assert_outputs_once, batch_process, batch_run
from PIL import Image

import cf_testing.real_comfyui as real
from cf_testing.real_comfyui import RunningComfyUI, comfyui_dir
from charforge.driver.batch import load_batch
from charforge.driver.batch.journal import JOURNAL_NAME, replay

pytestmark = pytest.mark.comfyui

PORTS = range(18300, 18400)

#: Base colour x tint colour, blended: three cheap built-in nodes that run on CPU without any model.
WORKFLOW = {
    "1": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0},
        "_meta": {"title": "Base"},
    },
    "2": {
        "class_type": "EmptyImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFF0000},
        "_meta": {"title": "Tint"},
    },
    "3": {
        "class_type": "ImageBlend",
        "inputs": {"image1": ["1", 0], "image2": ["2", 0], "blend_factor": 0.5, "blend_mode": "normal"},
        "_meta": {"title": "Blend"},
    },
    "4": {
        "class_type": "SaveImage",
        "inputs": {"images": ["3", 0], "filename_prefix": "batchtest"},
        "_meta": {"title": "Save"},
    },
}

SWEEP = """\
workflow: wf.json
axes:
  prompt: {set: Tint.color, values: [16711680, 65280, 255]}     # "prompts": red, green, blue tints
  seed: {set: Base.color, values: [0, 4210752, 8421504, 16777215]}
  strength: {set: Blend.blend_factor, values: [0.25, 0.5, 0.75]}
"""


def start_comfyui(base: Path, port: int | None = None) -> RunningComfyUI:
    comfy = comfyui_dir()
    assert comfy is not None
    return real.start_comfyui(comfy, base, ports=PORTS, port=port)


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    if comfyui_dir() is None:
        pytest.skip("set COMFYUI_DIR to run the real-ComfyUI tests")
    server = start_comfyui(tmp_path_factory.mktemp("comfy"))
    yield server
    server.stop()


def _spec(tmp_path: Path) -> Path:
    (tmp_path / "wf.json").write_text(json.dumps(WORKFLOW))
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    return tmp_path / "sweep.yaml"


def test_36_job_sweep_with_contact_sheet(tmp_path, comfyui):
    spec = _spec(tmp_path)
    plan = load_batch(spec)
    assert len(plan.jobs) == 36 and plan.jobs[0].folder == "prompt-16711680/seed-0/strength-0.25"
    out = tmp_path / "out"
    code, stdout, err = batch_run(spec, out, comfyui.url, "--contact-sheet", "seed,strength")
    assert code == 0, err
    assert "done 36" in stdout
    assert_outputs_once(out, plan)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.width > 4 * 3 * 60 and sheet.height > 3 * 60
    # the blend really ran: strength 0.75 of a pure red tint over black is mostly red
    first = plan.jobs[2]  # prompt red, seed 0 (black), strength 0.75
    manifest = json.loads((out / first.folder / "manifest.json").read_text())
    pixel = Image.open(out / first.folder / manifest["files"][0]["path"]).convert("RGB").getpixel((5, 5))
    assert pixel[0] > 150 and pixel[1] < 30 and pixel[2] < 30
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 36 and summary["servers"][0]["done"] == 36


def test_killed_and_resumed_against_real_comfyui(tmp_path, comfyui):
    spec = _spec(tmp_path)
    (tmp_path / "sweep.yaml").write_text(SWEEP.replace("0.25, 0.5, 0.75", "0.3, 0.6, 0.9"))  # fresh outputs
    out = tmp_path / "out"
    proc = batch_process(spec, out, comfyui.url, "--window", "3")
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count('"ev":"done"') >= 5:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = replay(journal)
    in_flight = [j for j in state.jobs.values() if j.state in ("submitting", "submitted", "finished")]
    code, _, err = batch_run(spec, out, comfyui.url)
    assert code == 0, err
    plan = load_batch(spec)
    assert_outputs_once(out, plan)
    # every prompt id the journal ever used ran at most once on the server, and each job has one "done"
    history = comfyui.get("/history?max_items=1000")
    ids = [pid for j in replay(journal).jobs.values() for pid in j.prompt_ids]
    assert len(ids) == len(set(ids))
    for job in in_flight:  # the jobs on the server at the kill were followed, not sent again
        if job.prompt_id in history:
            assert replay(journal).jobs[job.id].prompt_id == job.prompt_id
    assert json.loads((out / "summary.json").read_text())["counts"]["done"] == 36


def test_real_comfyui_restarted_mid_batch(tmp_path):
    """ComfyUI killed and started again (same port and folders, empty history) while a batch runs."""
    if comfyui_dir() is None:
        pytest.skip("set COMFYUI_DIR to run the real-ComfyUI tests")
    import threading

    from charforge.driver.batch import Batch

    slow = json.loads(json.dumps(WORKFLOW))
    slow["1"]["inputs"].update(width=512, height=512)
    slow["2"]["inputs"].update(width=512, height=512)
    slow["5"] = {
        "class_type": "ImageBlur",
        "inputs": {"image": ["3", 0], "blur_radius": 15, "sigma": 5.0},
        "_meta": {"title": "Blur"},
    }
    slow["4"]["inputs"]["images"] = ["5", 0]
    (tmp_path / "wf.json").write_text(json.dumps(slow))
    (tmp_path / "sweep.yaml").write_text(
        "workflow: wf.json\naxes:\n  seed: {set: Base.color, range: {start: 1, stop: 24}}\n"
    )
    base = tmp_path / "comfy"
    server = start_comfyui(base)
    port = int(server.url.rsplit(":", 1)[1])
    out = tmp_path / "out"
    results: list = []
    runner = threading.Thread(
        target=lambda: results.extend(
            Batch.from_file(tmp_path / "sweep.yaml").run(
                servers=[server.url], out=out, capacity=2, backoff=1.0, retries=8
            )
        )
    )
    runner.start()
    try:
        journal = out / JOURNAL_NAME
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            journal.exists() and journal.read_text().count('"ev":"done"') >= 4
        ):
            time.sleep(0.05)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        time.sleep(1.0)
        server = start_comfyui(base, port)
        runner.join(timeout=400)
        assert not runner.is_alive()
    finally:
        server.stop()
    assert len(results) == 24 and all(r.ok for r in results), [r.reason for r in results if not r.ok]
    plan = load_batch(tmp_path / "sweep.yaml")
    assert_outputs_once(out, plan)
    state = replay(out / JOURNAL_NAME)
    ids = [pid for j in state.jobs.values() for pid in j.prompt_ids]
    assert len(ids) == len(set(ids))  # a resubmission always got a new prompt id
    assert sum(j.submissions > 1 for j in state.jobs.values()) >= 1  # the restart lost at least one job
