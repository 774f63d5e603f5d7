"""A stand-in of CharForge's Train LoRA on the fake ComfyUI with CharForge's transfer routes: it writes what the
real node writes (the run folder under ``output/charforge/train_runs/<name>``, the LoRA in ``models/loras`` and in
the run folder) and shows the node's text and loss curve; a training sweep over it; a LoRA download that can be
made to stop half-way (the batch tests of trained LoRAs coming home and going up to S3)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fakes.charforge_routes import transfer_server
from fakes.comfy_server import FakeComfyServer, FakeImage, NodeDef, png_bytes

NAMES = ["pip_a", "pip_b", "pip_c"]
LORA_ROUTE = "/charforge/transfer/models/loras/files/"


def lora_bytes(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest() * 8000  # 256 kB: the stalled download stops in the middle


def add_train_node(server: FakeComfyServer, seconds: float = 0.0) -> None:
    """Train LoRA as the fake server runs it: the run folder under output/charforge/train_runs/<name>, the LoRA
    in models/loras and in the run folder, the loss curve shown, and the node's text. The dataset folder each
    run was given is kept in ``server.trained_on`` (by output name)."""
    server.trained_on = {}  # type: ignore[attr-defined]

    async def train(ctx, output_name, steps, dataset_folder="", **_hidden):
        server.trained_on[output_name] = dataset_folder  # type: ignore[attr-defined]
        if seconds:
            await asyncio.sleep(seconds)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", output_name)
        run = server.output_dir / "charforge" / "train_runs" / name
        (run / "samples").mkdir(parents=True, exist_ok=True)
        (run / "loss.png").write_bytes(png_bytes(4, 4, (1, 2, 3)))
        (run / "samples" / f"step_{steps:06d}_0.png").write_bytes(png_bytes(4, 4, (4, 5, 6)))
        (run / "status.json").write_text('{"state": "completed"}')
        (run / f"{name}.safetensors").write_bytes(lora_bytes(name))
        loras = server.root / "models" / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        (loras / f"{name}.safetensors").write_bytes(lora_bytes(name))
        text = (
            f"{name}.safetensors: {steps} steps, final loss 0.1234; run folder {run}; preset 'sd15' values "
            "used, not steps (turn use_preset_values off)"
        )
        shown = {"filename": "loss.png", "subfolder": f"charforge/train_runs/{name}", "type": "output"}
        from charforge.engine.train.run import TrainingRun

        trained = TrainingRun(
            name=name,
            run_dir=str(run),
            state="completed",
            step=steps,
            total_steps=steps,
            loss=0.1234,
            lora_path=str(loras / f"{name}.safetensors"),
            lora_name=f"{name}.safetensors",
            loss_curve=str(run / "loss.png"),
        )
        curve, samples = FakeImage(1, 4, 4, 0x010203), FakeImage(1, 4, 4, 0x040506)
        return (f"{name}.safetensors", trained, curve, samples), {"text": [text], "images": [shown]}

    server.nodes["CharForgeTrainLoRA"] = NodeDef(
        "CharForgeTrainLoRA",
        {
            "output_name": ("STRING", {"default": "my_character"}),
            "steps": ("INT", {"default": 10, "min": 0, "max": 100000}),
        },
        optional={"dataset_folder": ("STRING", {"default": ""})},
        outputs=("STRING", "CHARFORGE_TRAINING_RUN", "IMAGE", "IMAGE"),
        output_node=True,
        category="CharForge/Train",
        run=train,
    )


def add_store_node(server: FakeComfyServer) -> None:
    """CharForge's Send Training to Storage on the fake server: the real node's code, run in a thread as
    ComfyUI runs a node (it sends to S3 with this process's AWS variables: the worker's environment)."""
    from charforge.common.transfer import STORE_NODE_CLASS
    from charforge.nodes.storage import SendTrainingToStorage

    async def send(ctx, run, destination, **_hidden):
        answer = await asyncio.to_thread(
            SendTrainingToStorage().send, run=run, destination=destination, unique_id=ctx.node_id
        )
        return answer["result"], answer["ui"]

    server.nodes[STORE_NODE_CLASS] = NodeDef(
        STORE_NODE_CLASS,
        {"run": ("CHARFORGE_TRAINING_RUN", {}), "destination": ("STRING", {"default": ""})},
        hidden={"unique_id": "UNIQUE_ID"},
        outputs=("STRING",),
        output_node=True,
        category="CharForge/Transfer",
        run=send,
    )


def add_fetch_node(server: FakeComfyServer) -> None:
    """CharForge's Fetch from Storage on the fake server: the real node's code, in a thread."""
    from charforge.common.transfer import FETCH_NODE_CLASS
    from charforge.nodes.storage import FetchFromStorage

    async def fetch(ctx, source, folder_name="", **_hidden):
        answer = await asyncio.to_thread(FetchFromStorage().fetch, source=source, folder_name=folder_name)
        return answer["result"], answer["ui"]

    server.nodes[FETCH_NODE_CLASS] = NodeDef(
        FETCH_NODE_CLASS,
        {"source": ("STRING", {"default": ""}), "folder_name": ("STRING", {"default": ""})},
        outputs=("STRING",),
        category="CharForge/Transfer",
        run=fetch,
    )


def train_spec(
    tmp_path: Path, output_name: str, axis: str, setting: str, values: list, file: str = "sweep.json"
) -> Path:
    """A batch spec in `tmp_path`: one Train LoRA node (title Train, `output_name`, 4 steps) in train.json, swept
    over `axis` setting `setting` (e.g. ``Train.steps``) to each of `values`."""
    graph = {
        "1": {
            "class_type": "CharForgeTrainLoRA",
            "_meta": {"title": "Train"},
            "inputs": {"output_name": output_name, "steps": 4},
        }
    }
    (tmp_path / "train.json").write_text(json.dumps(graph))
    spec = tmp_path / file
    spec.write_text(
        json.dumps({"workflow": "train.json", "axes": {axis: {"set": setting, "values": values}}})
    )
    return spec


def training_sweep(tmp_path: Path, names: list[str] = NAMES) -> Path:
    """Train LoRA swept over its output name: one LoRA per name in `names`."""
    return train_spec(tmp_path, "x", "name", "Train.output_name", names)


class Stall:
    """Makes the first LoRA download stop half-way and hang (the driver is then killed)."""

    def __init__(self) -> None:
        self.on = False
        self.hit = threading.Event()


@contextlib.contextmanager
def training_server(comfy_env, monkeypatch, stall: Stall | None = None) -> Iterator[FakeComfyServer]:
    from aiohttp import web

    from charforge.nodes import transfer

    real = transfer.lora_file_handler

    async def lora_file(request):
        if stall is None or not stall.on:
            return await real(request)
        stall.on = False
        path = transfer._model_path("loras", request.match_info.get("name", ""))
        data = path.read_bytes()
        response = web.StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        )
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        stall.hit.set()
        deadline = time.monotonic() + 30
        while (
            time.monotonic() < deadline
            and request.transport is not None
            and not request.transport.is_closing()
        ):
            await asyncio.sleep(0.05)  # the driver is killed meanwhile
        return response

    monkeypatch.setattr(
        transfer, "ROUTES", tuple((m, p, lora_file if h is real else h) for m, p, h in transfer.ROUTES)
    )
    with transfer_server(comfy_env) as fake:
        add_train_node(fake)
        yield fake


def check_lora_home(folder: Path, name: str, server_root: Path) -> dict:
    """Job folder `folder` holds LoRA `name` (the stand-in's bytes, as on the server under `server_root`) and its
    run folder (loss curve, LoRA, the sample, status), every file in its manifest with its sha256; returns the
    manifest's one training record (state "home")."""
    lora = folder / "lora" / f"{name}.safetensors"
    assert (
        lora.read_bytes() == lora_bytes(name) == (server_root / "models" / "loras" / lora.name).read_bytes()
    )
    run = folder / "lora" / "run" / name
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == [
        "loss.png",
        f"{name}.safetensors",
        "samples/step_000004_0.png",
        "status.json",
    ]
    manifest = json.loads((folder / "manifest.json").read_text())
    [training] = manifest["training"]
    assert training["state"] == "home" and training["lora"] == f"{name}.safetensors"
    assert training["lora_sha256"] == hashlib.sha256(lora_bytes(name)).hexdigest()
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk  # the outputs (the loss curve shown) and everything that came home
    for rel, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    return training
