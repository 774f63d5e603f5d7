"""The ``charforge`` command against the fake server: output modes, exit codes, Ctrl-C, local server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer, image_workflow, sampler_workflow, wait_workflow, webp_workflow
from fakes.processes import sigint_as_in_a_terminal
from fakes.ui_workflows import classic

from cf_testing.cli import run_driver_cli as run_cli
from charforge.driver import local

TESTS_DIR = Path(__file__).resolve().parents[1]


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_run_downloads_and_reports(fake_comfy, tmp_path):
    wf = write(tmp_path / "wf.json", sampler_workflow())
    code, out, err = run_cli(
        "run",
        str(wf),
        "--server",
        fake_comfy.url,
        "--out",
        str(tmp_path / "o"),
        "--set",
        "KSampler.seed=99",
        "--set",
        "Positive.text=a dog",
        "--progress",
        "plain",
    )
    assert code == 0, err
    assert "txt2img_00001_.png  <- node 9" in out and "manifest:" in out
    assert "running 3 (KSampler)" in err and "3 (KSampler): 4/4" in err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [o["input"] for o in manifest["overrides"]] == ["seed", "text"]
    assert manifest["overrides"][0]["value"] == 99 and manifest["files"][0]["path"] == "txt2img_00001_.png"
    post = next(r for r in fake_comfy.requests if r.path == "/prompt")
    assert post.body["prompt"]["3"]["inputs"]["seed"] == 99


def test_run_json_is_ndjson_with_a_result(fake_comfy, tmp_path):
    wf = write(tmp_path / "wf.json", webp_workflow())
    code, out, err = run_cli(
        "run", str(wf), "--server", fake_comfy.url, "--out", str(tmp_path / "o"), "--json"
    )
    assert code == 0 and err == ""
    records = [json.loads(line) for line in out.splitlines()]
    kinds = [r["event"] for r in records]
    assert kinds[0] == "submitted" and kinds[-1] == "result" and "execution_success" in kinds
    result = records[-1]
    assert result["files"][0]["animated"] is True and result["files"][0]["path"].endswith("clip_00001_.webp")
    assert Path(result["manifest"]).is_file()


def test_preflight_failure_exits_2_without_queueing(fake_comfy, tmp_path):
    wf = image_workflow()
    wf["2"]["inputs"]["crop"] = "centre"
    path = write(tmp_path / "wf.json", wf)
    code, out, err = run_cli("run", str(path), "--server", fake_comfy.url, "--out", str(tmp_path / "o"))
    assert code == 2
    assert "crop: 'centre' is not one of the allowed values; did you mean 'center'" in err
    assert not any(r.path == "/prompt" for r in fake_comfy.requests)
    code, out, _ = run_cli("run", str(path), "--server", fake_comfy.url, "--json")
    record = json.loads(out.splitlines()[-1])
    assert code == 2 and record["event"] == "error" and record["problems"][0]["input"] == "crop"


def test_server_side_400_is_rendered_per_node(fake_comfy, tmp_path):
    wf = image_workflow()
    wf["2"]["inputs"]["width"] = 99999
    path = write(tmp_path / "wf.json", wf)
    code, _, err = run_cli("run", str(path), "--server", fake_comfy.url, "--no-preflight")
    assert code == 2
    assert "the server rejected the workflow: Prompt outputs failed validation" in err
    assert 'node 2 "Resize" (ImageScale):\n    - width: 99999 is above the maximum 16384' in err


def test_exit_codes_for_failure_unreachable_timeout_and_usage(fake_comfy, tmp_path):
    path = write(tmp_path / "wf.json", image_workflow())
    fake_comfy.knobs.fail_node = "ImageScale"
    code, out, _ = run_cli("run", str(path), "--server", fake_comfy.url, "--json")
    record = json.loads(out.splitlines()[-1])
    assert code == 1 and record["node_id"] == "2" and record["exception_type"] == "ValueError"
    fake_comfy.knobs.fail_node = None
    assert run_cli("status", "--server", "http://127.0.0.1:9")[0] == 3
    slow = write(tmp_path / "slow.json", wait_workflow(seconds=20, steps=200))
    start = time.monotonic()
    code, _, err = run_cli(
        "run", str(slow), "--server", fake_comfy.url, "--timeout", "0.7", "--progress", "plain"
    )
    assert code == 124 and time.monotonic() - start < 5
    assert "interrupted" in err and len(fake_comfy.interrupt_calls) == 1
    assert run_cli("run", str(tmp_path / "missing.json"), "--server", fake_comfy.url)[0] == 2
    code, _, err = run_cli("run", str(path), "--server", fake_comfy.url, "--set", "Nope.x=1")
    assert code == 2 and "no node 'Nope'" in err
    with pytest.raises(SystemExit) as info:
        run_cli("run")
    assert info.value.code == 2


def test_ctrl_c_cancels_only_this_job(fake_comfy, tmp_path):
    other = write(tmp_path / "other.json", wait_workflow(seconds=0.3, tag="other"))
    mine = write(tmp_path / "mine.json", wait_workflow(seconds=30, steps=300, tag="mine"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charforge.driver.cli",
            "run",
            str(mine),
            "--server",
            fake_comfy.url,
            "--out",
            str(tmp_path / "o"),
            "--progress",
            "plain",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=sigint_as_in_a_terminal,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "running 1" in line:
                break
        code, _, _ = run_cli(
            "run", str(other), "--server", fake_comfy.url, "--no-download", "--timeout", "0.01"
        )
        assert code == 124  # queued behind mine, then removed from the queue by its own timeout
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=20)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "cancelling job" in rest and ": interrupted" in rest
    mine_id = next(
        r.body["prompt_id"]
        for r in fake_comfy.requests
        if r.path == "/prompt" and "mine" in json.dumps(r.body["prompt"])
    )
    assert fake_comfy.interrupt_calls == [{"prompt_id": mine_id}]
    deletes = [r.body["delete"] for r in fake_comfy.requests if r.path == "/queue" and r.method == "POST"]
    assert mine_id not in sum(deletes, [])


def test_status_cancel_validate_convert(fake_comfy, tmp_path):
    code, out, _ = run_cli("status", "--server", fake_comfy.url)
    assert code == 0 and "ComfyUI 0.3.64" in out and "queue: 0 running, 0 pending" in out
    fake_comfy.knobs.start_delay = 1.0
    wf = write(tmp_path / "wf.json", image_workflow())
    code, out, _ = run_cli("run", str(wf), "--server", fake_comfy.url, "--timeout", "0.3", "--json")
    prompt_id = json.loads(out.splitlines()[0])["prompt_id"]
    code, out, _ = run_cli("status", prompt_id, "--server", fake_comfy.url)
    assert code == 1 and "unknown" in out  # the timeout removed it from the queue
    assert run_cli("cancel", prompt_id, "--server", fake_comfy.url)[0] == 1
    fake_comfy.knobs.start_delay = 0.0

    code, out, err = run_cli("validate", str(wf), "--server", fake_comfy.url)
    assert code == 0 and "ok: 3 nodes, 3 would run" in out
    code, _, err = run_cli("validate", str(wf), "--server", fake_comfy.url, "--set", "Resize.width=-1")
    assert code == 2 and "width: -1 is below the minimum 0" in err

    ui = write(tmp_path / "ui.json", classic())
    api = tmp_path / "api.json"
    code, out, err = run_cli("convert", str(ui), "-o", str(api), "--server", fake_comfy.url)
    assert code == 0, err
    converted = json.loads(api.read_text())
    assert converted["3"]["inputs"]["seed"] == 156680208700286 and converted["3"]["inputs"]["steps"] == 20
    code, out, err = run_cli("run", str(ui), "--server", fake_comfy.url, "--out", str(tmp_path / "o"))
    assert code == 0, err  # an editor workflow runs directly (detected and converted)


def test_profiles_and_env_auth(fake_comfy, tmp_path, monkeypatch):
    fake_comfy.knobs.require_headers = {"Authorization": "Bearer studio-secret-token"}
    config = tmp_path / "config.yaml"
    config.write_text(
        f"default_profile: studio\nprofiles:\n  studio:\n    server: {fake_comfy.url}\n"
        "    token_env: STUDIO_TOKEN\n"
    )
    monkeypatch.setenv("STUDIO_TOKEN", "studio-secret-token")
    monkeypatch.setenv("CHARFORGE_CONFIG", str(config))
    for var in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE", "CHARFORGE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    assert "studio-secret-token" not in out + err
    monkeypatch.setenv("STUDIO_TOKEN", "wrong-studio-token")
    code, out, err = run_cli("status", "--profile", "studio")
    assert code == 3 and "401" in err and "wrong-studio-token" not in err
    code, _, err = run_cli("status", "--profile", "nope")
    assert code == 2 and "no profile 'nope'" in err and "studio" in err


def test_local_server_is_started_from_comfyui_dir_and_stopped(tmp_path, monkeypatch):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\nfrom fakes.comfy_server import main\nmain()\n"
    )
    monkeypatch.setattr(local, "DEFAULT_LOCAL_URL", "http://127.0.0.1:9")  # nothing answers there
    monkeypatch.setenv("COMFYUI_DIR", str(comfy))
    monkeypatch.setenv("COMFYUI_PYTHON", sys.executable)
    monkeypatch.setenv("CHARFORGE_CONFIG", str(tmp_path / "none.yaml"))
    for var in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    started: list[local.LocalComfyUI] = []
    original = local.LocalComfyUI.start

    def spy(self, timeout=180.0):
        started.append(self)
        return original(self, timeout)

    monkeypatch.setattr(local.LocalComfyUI, "start", spy)
    wf = write(tmp_path / "wf.json", image_workflow())
    code, out, err = run_cli("run", str(wf), "--out", str(tmp_path / "o"), "--progress", "plain")
    assert code == 0, err
    assert "starting ComfyUI from" in err and len(started) == 1
    assert started[0].process is not None and started[0].process.poll() is not None  # stopped afterwards
    assert not local.probe(started[0].url)


def test_local_server_missing_gives_a_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(local, "DEFAULT_LOCAL_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    monkeypatch.setenv("CHARFORGE_CONFIG", str(tmp_path / "none.yaml"))
    for var in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    code, _, err = run_cli("status")
    assert code == 3 and "COMFYUI_DIR" in err and "--server" in err


def test_prefixed_https_style_url_is_used_verbatim(tmp_path):
    with FakeComfyServer(prefix="team/comfy") as server:
        path = write(tmp_path / "wf.json", image_workflow())
        code, out, err = run_cli("run", str(path), "--server", server.url, "--out", str(tmp_path / "o"))
        assert code == 0, err
        assert {c.path for c in server.ws_connects} == {"/team/comfy/ws"}


def test_wait_attaches_to_a_job_submitted_elsewhere(fake_comfy, client, tmp_path):
    fake_comfy.knobs.node_seconds = 0.2
    job = client.submit(webp_workflow(frames=2))
    code, out, err = run_cli(
        "wait", job.prompt_id, "--server", fake_comfy.url, "--out", str(tmp_path / "o"), "--progress", "plain"
    )
    assert code == 0, err
    assert "anim/clip_00001_.webp" in out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["prompt_id"] == job.prompt_id
    code, _, err = run_cli("wait", "no-such-job", "--server", fake_comfy.url, "--timeout", "10")
    assert code == 1 and "not queued, running or in the history" in err
