"""Opt-in: Send Outputs to Storage in a real ComfyUI, wired by the driver as on a RunPod serverless worker.

The driver's :func:`add_outputs_node` adds the node to a graph of built-in EmptyImage frames into CharForge's
Save Video (mp4) and Storyboard Sheet; ComfyUI's own /prompt validation takes the extra ``from_<node>__<index>``
inputs and its executor hands the node their values and the PROMPT; the node sends the files to a moto S3 server
on loopback with the server process's AWS variables (the worker's environment); the driver reads the receipt
image and brings every file home byte-identical. ComfyUI's Python needs boto3: when it has none, this machine's
boto3 is put on its path for the test (nothing is installed into it).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from fakes.moto_s3 import moto_s3, use_s3

import cf_testing.real_comfyui as real

pytestmark = real.suite_marks()
pytest.importorskip("boto3")
pytest.importorskip("moto")

PORTS = range(8650, 8700)


def _boto3_path(python: str, tmp_path: Path) -> str | None:
    """A folder holding links to this Python's boto3 and its dependencies, for a ComfyUI Python without it."""
    if subprocess.run([python, "-c", "import boto3"], capture_output=True).returncode == 0:
        return None
    import boto3
    import botocore
    import dateutil
    import jmespath
    import s3transfer
    import six

    shim = tmp_path / "boto3_shim"
    shim.mkdir()
    for module in (boto3, botocore, dateutil, jmespath, s3transfer):
        (shim / module.__name__).symlink_to(Path(module.__file__).parent)
    (shim / "six.py").symlink_to(six.__file__)
    return str(shim)


def _filled(info: dict, class_type: str, given: dict) -> dict:
    """`given` plus the default of every other required widget of `class_type` (from /object_info)."""
    inputs = dict(given)
    for name, spec in info[class_type]["input"]["required"].items():
        if name not in inputs and len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]:
            inputs[name] = spec[1]["default"]
    return inputs


def test_send_outputs_in_real_comfyui_brings_the_video_and_storyboard_home(tmp_path, monkeypatch):
    from charforge.driver.runpod.results import add_outputs_node, outputs_home, receipt

    comfy = real.comfyui_dir()
    python = real.comfyui_python(comfy)
    real.require_module(python, "av")
    with moto_s3() as endpoint:
        bucket = use_s3(monkeypatch, endpoint, str(tmp_path))
        base = tmp_path / "base"
        real.link_pack(base)
        env = {name: value for name, value in __import__("os").environ.items() if name.startswith("AWS_")}
        shim = _boto3_path(python, tmp_path)
        if shim:
            env["PYTHONPATH"] = shim
        server = real.start_comfyui(comfy, base, python, ports=PORTS, env=env)
        try:
            info = server.get("/object_info")
            assert "CharForgeSendOutputsToStorage" in info
            frames = [f"frame {i + 1}" for i in range(3)]
            record = {"mode": "simple", "frames": [{"index": i, "prompt": p} for i, p in enumerate(frames)]}
            graph = {
                "1": {
                    "class_type": "EmptyImage",
                    "inputs": {"width": 32, "height": 32, "batch_size": 3, "color": 0x336699},
                },
                "2": {
                    "class_type": "CharForgeSaveVideo",
                    "inputs": _filled(info, "CharForgeSaveVideo", {"frames": ["1", 0], "format": "mp4"}),
                },
                "3": {
                    "class_type": "CharForgeStoryboardSheet",
                    "inputs": _filled(
                        info,
                        "CharForgeStoryboardSheet",
                        {"frames": ["1", 0], "storyboard": json.dumps(record), "columns": 3},
                    ),
                },
            }
            prompt, note = add_outputs_node(graph, f"s3://{bucket}/results/outputs")
            assert note is None
            outputs = server.run_prompt(prompt, "cf-test")
        finally:
            server.stop()
        [shown] = outputs["charforge_outputs"]["images"]
        found = receipt(
            shown["filename"], (base / "output" / shown["subfolder"] / shown["filename"]).read_bytes()
        )
        assert found is not None and found["kind"] == "outputs"
        by_path = {f["path"]: f for f in found["files"]}
        [video] = [p for p in by_path if p.endswith(".mp4")]
        assert by_path[video]["node"] == "2" and by_path[video]["class_type"] == "CharForgeSaveVideo"
        board = [p for p in by_path if p.endswith("/metadata.json")]
        assert len(board) == 1 and by_path[board[0]]["node"] == "3"

        out = tmp_path / "out"
        got = outputs_home(
            {**found, "destination": prompt["charforge_outputs"]["inputs"]["destination"]}, out
        )
        assert {g["path"] for g in got} == set(by_path)
        for entry in got:
            assert (out / entry["path"]).read_bytes() == (base / "output" / entry["path"]).read_bytes()
        assert (out / video).read_bytes()[4:8] == b"ftyp"
