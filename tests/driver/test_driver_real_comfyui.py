"""The driver against a real ComfyUI (built-in nodes only, no models, CPU).

Skipped unless ``COMFYUI_DIR`` points at a ComfyUI checkout; ``COMFYUI_PYTHON`` selects its interpreter
(default: the checkout's venv, else this one). The server is started on 127.0.0.1 (a free port in
8300-8399) with a throw-away ``--base-directory`` and stopped afterwards.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import image_workflow, webp_workflow
from fakes.ui_workflows import node

from cf_testing.real_comfyui import free_port, slow_workflow
from charforge.driver import cli
from charforge.driver.client import ComfyClient
from charforge.driver.errors import Interrupted, ValidationError
from charforge.driver.local import LocalComfyUI

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to run against a real ComfyUI"
    ),
]


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalComfyUI]:
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    server = LocalComfyUI(
        os.environ["COMFYUI_DIR"],
        python=os.environ.get("COMFYUI_PYTHON"),
        port=free_port(),
        extra_args=["--cpu", "--base-directory", str(base)],
        log_path=base / "comfyui.log",
    )
    server.start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def real(comfyui: LocalComfyUI) -> Iterator[ComfyClient]:
    with ComfyClient(comfyui.url, poll_interval=1.0) as client:
        yield client


def test_status_and_version(real):
    stats = real.system_stats()
    assert stats["system"]["comfyui_version"]
    info = real.object_info()
    assert {"EmptyImage", "ImageScale", "SaveImage", "SaveAnimatedWEBP"} <= set(info)


def test_image_and_animated_webp_are_downloaded(real, tmp_path):
    wf = image_workflow(width=40, height=30)
    wf["1"]["inputs"]["color"] = int(time.time()) & 0xFFFFFF  # avoid the server's output cache
    events = []
    result = real.run(wf, timeout=120, on_event=events.append)
    kinds = [e.type for e in events if e.prompt_id == result.prompt_id]
    assert kinds.index("execution_start") < kinds.index("executed") < kinds.index("execution_success")
    files = real.download_outputs(result, tmp_path)
    assert len(files) == 1 and files[0].path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = (
        int.from_bytes(files[0].path.read_bytes()[16:20], "big"),
        int.from_bytes(files[0].path.read_bytes()[20:24], "big"),
    )
    assert (width, height) == (40, 30)

    wf = webp_workflow(frames=8)
    wf["1"]["inputs"]["color"] = (int(time.time()) + 1) & 0xFFFFFF
    result = real.run(wf, timeout=120)
    (webp,) = result.files
    assert webp.key == "images" and webp.animated and webp.filename.endswith(".webp")
    (downloaded,) = real.download_outputs(result, tmp_path)
    assert downloaded.path.read_bytes()[8:12] == b"WEBP"


def test_bad_workflows_fail_in_preflight_and_at_the_server(real):
    wf = image_workflow()
    wf["2"]["inputs"]["upscale_method"] = "lancoz"
    with pytest.raises(ValidationError) as info:
        real.prepare_run(wf)
    assert "did you mean 'lanczos'" in str(info.value) and info.value.source == "preflight"
    with pytest.raises(ValidationError) as info:
        real.submit(wf)
    assert info.value.source == "server" and info.value.problems[0].input_name == "upscale_method"


def test_cancel_interrupts_only_our_running_job(real):
    job = real.submit(slow_workflow(int(time.time()) & 0xFFFF, size=768, batch=8, scales=6, prefix="slow/s"))
    with pytest.raises(Interrupted):
        for event in real.watch(job, timeout=300):
            if event.type == "executing" and event.node == "3":
                assert real.cancel(job.prompt_id) == "interrupted"
    entry = real.history(job.prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert [m[0] for m in entry["status"]["messages"]][-1] == "execution_interrupted"


def test_cli_runs_an_editor_workflow(comfyui, tmp_path):
    ui = {
        "version": 0.4,
        "nodes": [
            node(
                1, "EmptyImage", outputs=[("IMAGE", "IMAGE")], widgets=[32, 32, 2, int(time.time()) & 0xFFFF]
            ),
            node(2, "Reroute", inputs=[("", "*", 1)], outputs=[("", "IMAGE")]),
            node(
                3,
                "ImageScale",
                inputs=[("image", "IMAGE", 2)],
                outputs=[("IMAGE", "IMAGE")],
                widgets=["nearest-exact", 8, 8, "disabled"],
                mode=4,
            ),
            node(4, "SaveImage", inputs=[("images", "IMAGE", 3)], widgets=["ui/x"]),
            node(5, "Note", widgets=["a note"]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"]],
    }
    path = tmp_path / "ui.json"
    path.write_text(json.dumps(ui))
    out = tmp_path / "out"
    code = cli.main(["run", str(path), "--server", comfyui.url, "--out", str(out), "--progress", "plain"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [f["path"] for f in manifest["files"]] == ["ui/x_00001_.png", "ui/x_00002_.png"]
    png = (out / "ui" / "x_00001_.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 32  # the bypassed resize was wired through
    assert b"workflow" in png  # the editor workflow is embedded
    assert isinstance(Path(out / "manifest.json").stat().st_size, int)
