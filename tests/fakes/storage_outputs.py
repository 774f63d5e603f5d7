"""CharForge's file-writing nodes on the fake ComfyUI, running the real nodes' code as ComfyUI runs a node (in a
thread, with the fake's base folder as ComfyUI's): tiny frames, Save Video (a real mp4 through PyAV),
Storyboard Sheet (the real numbered folder with frames, sheet and metadata.json), a score node whose ``json``
output is a score sheet, and Send Outputs to Storage (the real node; it sends with this process's AWS
variables: the worker's environment). For the tests of a serverless job's outputs coming home through S3."""

from __future__ import annotations

import asyncio
import json

from fakes.comfy_server import FakeComfyServer, NodeDef

FRAMES_NODE = "CFTestTinyFrames"


def tiny_frames(count: int = 4, size: int = 32, seed: int = 0):
    """An IMAGE batch ``(count, size, size, 3)`` in 0..1: a gradient moving from frame to frame."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, size).view(1, size, 1, 1).expand(count, size, size, 3).clone()
    for i in range(count):
        base[i] = (base[i] + 0.1 * i + 0.05 * torch.rand(size, size, 3, generator=generator)) % 1.0
    return base


def storyboard_record(count: int) -> str:
    frames = [{"index": i, "prompt": f"frame {i + 1}", "caption": f"scene {i + 1}"} for i in range(count)]
    return json.dumps({"mode": "simple", "frames": frames})


def _thread(function):
    async def run(ctx, **inputs):
        answer = await asyncio.to_thread(function, ctx, **inputs)
        return answer["result"], answer.get("ui")

    return run


def add_output_nodes(server: FakeComfyServer) -> None:
    """Tiny frames, Save Video, Storyboard Sheet, a score sheet node and Send Outputs to Storage."""
    from charforge.common.transfer import OUTPUTS_NODE_CLASS
    from charforge.engine.story.storyboard import FORMAT
    from charforge.nodes.storage import SendOutputsToStorage
    from charforge.nodes.story import StoryboardSheet
    from charforge.nodes.video import SaveVideo

    def frames(ctx, count, seed):
        return {"result": (tiny_frames(count, seed=seed),)}

    def save_video(ctx, frames, fps, format, filename_prefix, **_):
        return SaveVideo().save(frames, fps=fps, format=format, filename_prefix=filename_prefix)

    def sheet(ctx, frames, storyboard, title, filename_prefix, columns, story=""):
        record = json.loads(storyboard)
        record["format"] = FORMAT
        return StoryboardSheet().save(frames, json.dumps(record), title, filename_prefix, columns, story)

    def score(ctx, frames, **_):
        sheet = {
            "metric": "identity",
            "rows": [{"index": i, "value": 0.5 + i / 10} for i in range(len(frames))],
        }
        return {"result": (None, 0.5, None, json.dumps(sheet))}

    def send(ctx, destination, **outputs):
        for hidden in ("prompt", "unique_id"):
            outputs.pop(hidden, None)
        return SendOutputsToStorage().send(destination, prompt=ctx.prompt, unique_id=ctx.node_id, **outputs)

    server.nodes[FRAMES_NODE] = NodeDef(
        FRAMES_NODE,
        {"count": ("INT", {"default": 4}), "seed": ("INT", {"default": 0})},
        outputs=("IMAGE",),
        run=_thread(frames),
    )
    server.nodes["CharForgeSaveVideo"] = NodeDef(
        "CharForgeSaveVideo",
        {
            "frames": ("IMAGE", {}),
            "fps": ("FLOAT", {"default": 8.0}),
            "format": (["mp4", "webm", "gif", "webp"], {"default": "mp4"}),
            "filename_prefix": ("STRING", {"default": "video/CharForge"}),
        },
        hidden={"prompt": "PROMPT"},
        outputs=("STRING",),
        output_node=True,
        category="CharForge/Video",
        run=_thread(save_video),
    )
    server.nodes["CharForgeStoryboardSheet"] = NodeDef(
        "CharForgeStoryboardSheet",
        {
            "frames": ("IMAGE", {}),
            "storyboard": ("STRING", {"default": ""}),
            "title": ("STRING", {"default": ""}),
            "filename_prefix": ("STRING", {"default": "charforge/storyboard"}),
            "columns": ("INT", {"default": 0}),
        },
        outputs=("IMAGE", "STRING", "STRING"),
        output_node=True,
        category="CharForge/Story",
        run=_thread(sheet),
    )
    server.nodes["CharForgeClipScore"] = NodeDef(
        "CharForgeClipScore",
        {"frames": ("IMAGE", {})},
        outputs=("CHARFORGE_SCORES", "FLOAT", "IMAGE", "STRING"),
        output_node=True,
        category="CharForge/Score",
        run=_thread(score),
    )
    server.nodes[OUTPUTS_NODE_CLASS] = NodeDef(
        OUTPUTS_NODE_CLASS,
        {"destination": ("STRING", {"default": ""})},
        hidden={"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        outputs=("STRING",),
        output_node=True,
        category="CharForge/Transfer",
        run=_thread(send),
    )


def video_story_graph(count: int = 4) -> dict:
    """Frames into Save Video (mp4), Storyboard Sheet and a score sheet: a job whose files the worker's own
    answer would not bring home (metadata.json, the sheet JSON; the mp4 only base64 in the answer)."""
    return {
        "1": {"class_type": FRAMES_NODE, "inputs": {"count": count, "seed": 0}, "_meta": {"title": "Frames"}},
        "2": {
            "class_type": "CharForgeSaveVideo",
            "inputs": {"frames": ["1", 0], "fps": 8.0, "format": "mp4", "filename_prefix": "video/CharForge"},
            "_meta": {"title": "Video"},
        },
        "3": {
            "class_type": "CharForgeStoryboardSheet",
            "inputs": {
                "frames": ["1", 0],
                "storyboard": storyboard_record(count),
                "title": "test story",
                "filename_prefix": "charforge/storyboard",
                "columns": 2,
            },
            "_meta": {"title": "Storyboard"},
        },
        "4": {
            "class_type": "CharForgeClipScore",
            "inputs": {"frames": ["1", 0]},
            "_meta": {"title": "Score"},
        },
    }
