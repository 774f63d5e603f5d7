"""Opt-in: the training workflow in a real ComfyUI, as a new user runs it (COMFYUI_DIR set).

The pack is linked into a throwaway base directory with install.py, a tiny SD1.5 sits in
``models/diffusers`` and a kohya dataset in ``input/``. Through the HTTP / WebSocket API only: queue the
Train LoRA node, watch the progress bar messages and the ``charforge.train.progress`` events, press
Cancel (``/interrupt``) mid-run, check ``GET /charforge/runs``, queue it again and see it resume and
finish, and find the LoRA in ``/models/loras`` and in LoraLoader's list. The server listens on a
loopback port between 8700 and 8799 and is stopped afterwards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import numpy as np
import pytest

from cf_testing.model_fixtures import train_inputs
from cf_testing.models import build_tiny_sd15
from cf_testing.photos import write_training_folder
from cf_testing.real_comfyui import (
    comfyui_dir,
    comfyui_python,
    install_pack,
    pack_import_failures,
    start_comfyui,
    suite_marks,
)

pytestmark = suite_marks()

CLIENT = "cf-train-test"
STEPS = 30


PORTS = range(8700, 8800)


@pytest.fixture
def server(tmp_path, monkeypatch):
    comfy = comfyui_dir()
    base = tmp_path / "base"
    install_pack(comfy, base)
    tiny = build_tiny_sd15(tmp_path / "tiny")
    shutil.copytree(tiny.diffusers_dir, base / "models" / "diffusers" / "tiny_sd15")
    write_training_folder(base / "input" / "img" / "3_sks person", np.random.default_rng(0))
    running = start_comfyui(comfy, base, comfyui_python(comfy), ports=PORTS)
    try:
        yield running
    finally:
        running.stop()


def _prompt() -> dict:
    overrides = {
        "sample_steps": 2,
        "mixed_precision": "no",
        "bucket_step": 32,
        "min_bucket": 32,
        "sample_every": 0,
    }
    return {
        "1": {
            "class_type": "CharForgeTrainLoRA",
            "inputs": train_inputs(steps=STEPS, memory_profile="auto", overrides=json.dumps(overrides)),
        },
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
    }


async def _queue_and_watch(url: str, interrupt_at: int | None, timeout: float = 600) -> dict:
    """Queue the prompt with the WebSocket open; optionally POST /interrupt once `interrupt_at` steps are done.

    Returns the messages seen (by type) and how the prompt ended.
    """
    import aiohttp

    seen: dict[str, list] = {"progress": [], "charforge.train.progress": [], "end": []}
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId={CLIENT}") as ws:
        prompt_id = str(uuid.uuid4())
        async with session.post(
            f"{url}/prompt", json={"prompt": _prompt(), "client_id": CLIENT, "prompt_id": prompt_id}
        ) as response:
            body = await response.json()
            assert response.status == 200 and body["node_errors"] == {}, body
        interrupted = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            kind, payload = data.get("type"), data.get("data", {})
            if payload.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "progress" and payload.get("node") == "1":
                seen["progress"].append(payload["value"])
                if interrupt_at is not None and payload["value"] >= interrupt_at and not interrupted:
                    interrupted = True
                    async with session.post(f"{url}/interrupt", json={"prompt_id": prompt_id}):
                        pass
            elif kind == "charforge.train.progress":
                seen["charforge.train.progress"].append(payload)
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                seen["end"].append(kind)
                if kind == "execution_error":
                    seen["error"] = payload
                break
        else:
            raise TimeoutError(f"prompt did not finish in {timeout}s")
        seen["prompt_id"] = prompt_id
    return seen


def test_train_cancel_resume_from_comfyui(server):
    info = server.get("/object_info/CharForgeTrainLoRA")["CharForgeTrainLoRA"]
    assert info["category"] == "CharForge/Train"
    assert "[diffusers] tiny_sd15" in info["input"]["required"]["base_model"][0]
    assert not pack_import_failures(server.log(), "charforge")
    assert server.get("/charforge/runs") == {"runs": []}
    assert server.get("/api/charforge/runs") == {"runs": []}  # ComfyUI also serves it under /api

    # Queue, watch the progress bar, press Cancel a few steps in.
    first = asyncio.run(_queue_and_watch(server.url, interrupt_at=5))
    assert first["end"] == ["execution_interrupted"], (first, server.log()[-3000:])
    assert first["progress"][:5] == [1, 2, 3, 4, 5]
    assert any(e.get("phase") == "training" and "eta_seconds" in e for e in first["charforge.train.progress"])
    [run] = server.get("/charforge/runs")["runs"]
    stopped_at = run["step"]
    assert run["name"] == "alice" and run["state"] == "cancelled" and run["resumable"]
    assert 5 <= stopped_at < STEPS  # stopped within a step of the Cancel
    assert "alice.safetensors" not in server.get("/models/loras")
    print(f"Cancel pressed at step 5; run stopped at step {stopped_at}; progress seen: {first['progress']}")

    # Queue the same thing again: it resumes where it stopped and finishes.
    second = asyncio.run(_queue_and_watch(server.url, interrupt_at=None))
    assert second["end"] == ["execution_success"], (second.get("error"), server.log()[-3000:])
    assert second["progress"][0] == stopped_at + 1 and second["progress"][-1] == STEPS
    entry = server.wait_history(second["prompt_id"])
    text = entry["outputs"]["1"]["text"][0]
    assert f"resumed at step {stopped_at}" in text and f"{STEPS} steps" in text
    assert entry["outputs"]["2"]["images"]  # the loss curve, previewed

    [run] = server.get("/charforge/runs")["runs"]
    assert run["state"] == "completed" and run["step"] == STEPS and not run["resumable"]
    assert "alice.safetensors" in server.get("/models/loras")
    lora_loader = server.get("/object_info/LoraLoader")["LoraLoader"]
    assert "alice.safetensors" in lora_loader["input"]["required"]["lora_name"][0]
    print(f"resumed: progress {second['progress'][0]}..{second['progress'][-1]}; {text}")
    print("runs:", json.dumps(server.get("/charforge/runs")))
