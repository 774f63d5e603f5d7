"""A loopback fake of the ComfyUI 0.3.64 HTTP/WebSocket API, for driver tests.

It reproduces the parts of the protocol a driver depends on, as documented in
``docs/comfyui-contract.md`` (sections 2.2 and 5):

* POST ``/prompt`` validation with the server's exact error shapes (400 bodies with ``error`` and
  ``node_errors``; 200 with ``node_errors`` when only some outputs are valid), priorities (``number``,
  ``front``), client-chosen ``prompt_id``;
* a single worker that runs prompts one at a time and emits the WebSocket messages in the server's order
  (``status`` -> ``execution_start`` -> ``execution_cached`` -> per node ``progress_state`` / ``executing`` /
  ``progress`` / ``executed`` -> ``execution_success`` | ``execution_error`` | ``execution_interrupted`` ->
  history written -> ``status`` -> ``executing {node: null}``), only to the prompt's ``client_id``;
* binary preview frames (type 1, or type 4 for clients that announced ``supports_preview_metadata``);
* ``/history``, ``/queue``, ``/interrupt`` (global and targeted), ``/view`` with its path rules,
  ``/upload/image`` with same-bytes dedupe and ``x (1).png`` renaming, ``/object_info``, ``/system_stats``,
  ``/features``; every route also under ``/api/...`` and optionally below a path prefix (like a reverse proxy);
* classic output caching (an identical resubmission re-uses the previous outputs, writes no files);
* real small output files (PNG, animated WEBP, GIF, WAV) in temporary input/output/temp folders.

Knobs (attributes of :class:`Knobs`, changeable while the server runs) reproduce the failure modes drivers
meet in the field: slow nodes, a node that raises, a socket that drops mid-run, a socket that silently stops
delivering, a delay between ``execution_success`` and the history write, required auth headers.

Usage::

    with FakeComfyServer() as server:
        client = ComfyClient(server.url)

Run as a script it stands in for ComfyUI's ``main.py`` (``--listen 127.0.0.1 --port N``) until killed.

(Over 600 lines on purpose: it is one protocol, and its parts share the one queue, history and socket state that
the documented message order depends on; the thread and event loop around it are :mod:`fakes.loopback`'s.)
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import io
import json
import os
import struct
import tempfile
import threading
import time
import traceback
import uuid
import wave
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from fakes.loopback import LoopbackServer

COMFYUI_VERSION = "0.3.64"
MAX_UPLOAD_SIZE = 100 * 1024 * 1024


# ----------------------------------------------------------------------------------------------------------
# Small real files
# ----------------------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bytes(
    width: int, height: int, rgb: tuple[int, int, int], text: dict[str, str] | None = None
) -> bytes:
    """Encode a solid-colour RGB PNG (with optional tEXt chunks, as ComfyUI writes ``prompt``/``workflow``)."""
    row = b"\x00" + bytes(rgb) * width
    raw = row * height
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    for key, value in (text or {}).items():
        out += png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
    out += png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    return out


def animated_webp_bytes(frames: list[tuple[int, int, tuple[int, int, int]]], fps: float) -> bytes:
    """Encode an animated WEBP (Pillow when available, else a minimal RIFF container with an ANIM chunk)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is present in the dev environment
        body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x02" + b"\x00" * 9
        body += b"ANIM" + struct.pack("<I", 6) + b"\x00" * 6
        return b"RIFF" + struct.pack("<I", len(body)) + body
    images = [Image.new("RGB", (w, h), rgb) for w, h, rgb in frames]
    buf = io.BytesIO()
    images[0].save(
        buf,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=int(1000 / fps),
        loop=0,
        lossless=True,
    )
    return buf.getvalue()


def gif_bytes() -> bytes:
    """A valid 1x1 GIF89a."""
    return (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x00\x00\x00\x00\x00"
        b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
    )


def wav_bytes(seconds: float = 0.05, rate: int = 8000) -> bytes:
    """A short silent mono WAV."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x00\x00" * int(seconds * rate))
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Fake node classes
# ----------------------------------------------------------------------------------------------------------


class NodeFailure(Exception):
    """Raised inside a fake node to produce an ``execution_error``."""


class Interrupt(Exception):
    """Raised when the interrupt flag is seen (ComfyUI's InterruptProcessingException)."""


@dataclass
class FakeImage:
    """Stands for an IMAGE tensor: a batch of solid-colour frames."""

    batch: int
    width: int
    height: int
    color: int = 0

    @property
    def rgb(self) -> tuple[int, int, int]:
        return (self.color >> 16) & 255, (self.color >> 8) & 255, self.color & 255


@dataclass
class NodeDef:
    """A fake node class: its schema (served by /object_info) and behaviour."""

    name: str
    required: dict[str, tuple] = field(default_factory=dict)
    optional: dict[str, tuple] = field(default_factory=dict)
    hidden: dict[str, str] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()
    output_names: tuple[str, ...] | None = None
    output_node: bool = False
    category: str = "fake"
    python_module: str = "nodes"
    #: ``run(ctx, **inputs) -> (outputs tuple, ui dict | None)``; may be a coroutine function.
    run: Callable[..., Any] | None = None
    #: names whose built-in min/max/combo checks are replaced by ``validate`` (like VALIDATE_INPUTS)
    validate_names: tuple[str, ...] = ()
    validate: Callable[..., Any] | None = None
    display_name: str | None = None

    def input_types(self, server: FakeComfyServer) -> dict[str, dict]:
        req = {k: (v(server) if callable(v) else v) for k, v in self.required.items()}
        opt = {k: (v(server) if callable(v) else v) for k, v in self.optional.items()}
        result: dict[str, dict] = {"required": req}
        if opt:
            result["optional"] = opt
        if self.hidden:
            result["hidden"] = dict(self.hidden)
        return result

    def object_info(self, server: FakeComfyServer) -> dict[str, Any]:
        types = self.input_types(server)
        info = {
            "input": {
                k: {n: list(v) if isinstance(v, tuple) else v for n, v in d.items()} for k, d in types.items()
            },
            "input_order": {k: list(d) for k, d in types.items()},
            "output": list(self.outputs),
            "output_is_list": [False] * len(self.outputs),
            "output_name": list(self.output_names or self.outputs),
            "name": self.name,
            "display_name": self.display_name or self.name,
            "description": "",
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        return info


@dataclass
class RunContext:
    """What a running fake node can use: its ids, the server (for files/progress) and interrupt checks."""

    server: FakeComfyServer
    prompt_id: str
    node_id: str
    client_id: str | None
    prompt: dict
    extra_data: dict

    async def progress(self, steps: int, seconds: float, preview: bool = False) -> None:
        """Report ``steps`` progress updates spread over ``seconds`` (checks the interrupt flag each step)."""
        for i in range(1, steps + 1):
            await asyncio.sleep(seconds / steps if steps else 0)
            await self.server._progress_update(self, i, steps, preview)

    async def work(self, seconds: float) -> None:
        """Spend time like a node that does not report progress (no interrupt checks)."""
        if seconds > 0:
            await asyncio.sleep(seconds)


def _seconds(ctx: RunContext) -> float:
    return ctx.server.knobs.node_seconds


async def _empty_image(ctx, width, height, batch_size, color):
    await ctx.work(_seconds(ctx))
    return (FakeImage(batch_size, width, height, color),), None


async def _image_scale(ctx, image, upscale_method, width, height, crop):
    await ctx.work(_seconds(ctx))
    return (FakeImage(image.batch, width or image.width, height or image.height, image.color),), None


async def _save_image(ctx, images, filename_prefix, **_hidden):
    await ctx.work(_seconds(ctx))
    return (), {"images": ctx.server._save_pngs(ctx, images, filename_prefix, "output")}


async def _preview_image(ctx, images, **_hidden):
    await ctx.work(_seconds(ctx))
    prefix = "ComfyUI_temp_" + uuid.uuid4().hex[:5]
    return (), {"images": ctx.server._save_pngs(ctx, images, prefix, "temp")}


async def _save_webp(ctx, images, filename_prefix, fps, lossless, quality, method, **_hidden):
    await ctx.work(_seconds(ctx))
    r, g, b = images.rgb
    # Distinct frames: Pillow would store identical ones as a still image.
    frames = [(images.width, images.height, (r, g, (b + 40 * i) % 256)) for i in range(images.batch)]
    item = ctx.server._write_output(filename_prefix, "webp", animated_webp_bytes(frames, fps))
    return (), {"images": [item], "animated": [True]}


async def _load_image(ctx, image, **_):
    await ctx.work(_seconds(ctx))
    return (FakeImage(1, 64, 64, 0x808080), "MASK"), None


async def _checkpoint(ctx, ckpt_name):
    await ctx.work(_seconds(ctx))
    return ("MODEL", "CLIP", "VAE"), None


async def _encode(ctx, text, clip):
    await ctx.work(_seconds(ctx))
    return (f"COND({text})",), None


async def _empty_latent(ctx, width, height, batch_size):
    await ctx.work(_seconds(ctx))
    return ({"batch": batch_size, "width": width, "height": height},), None


async def _ksampler(
    ctx, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise
):
    await ctx.progress(steps, _seconds(ctx), preview=True)
    return (dict(latent_image, seed=seed),), None


async def _vae_decode(ctx, samples, vae):
    await ctx.work(_seconds(ctx))
    return (
        FakeImage(samples["batch"], samples["width"], samples["height"], samples.get("seed", 0) & 0xFFFFFF),
    ), None


async def _wait(ctx, seconds, steps=10, anything=None):
    await ctx.progress(steps, seconds)
    return (seconds,), None


async def _show_text(ctx, text, number=0.0):
    await ctx.work(_seconds(ctx))
    return (text,), {"text": [text], "number": [number]}


async def _save_gif(ctx, images, filename_prefix):
    await ctx.work(_seconds(ctx))
    item = ctx.server._write_output(filename_prefix, "gif", gif_bytes())
    item["format"] = "image/gif"
    return (), {"gifs": [item]}


async def _save_audio(ctx, filename_prefix):
    await ctx.work(_seconds(ctx))
    return (), {"audio": [ctx.server._write_output(filename_prefix, "wav", wav_bytes())]}


async def _hostile(ctx, anything=None):
    """Claims outputs with names that try to escape the client's output folder."""
    return (), {
        "images": [
            {"filename": "../../escape.png", "subfolder": "", "type": "output"},
            {"filename": "abs.png", "subfolder": "/etc/cron.d", "type": "output"},
            {"filename": "..", "subfolder": "../../..", "type": "output"},
            {"filename": "C:\\Windows\\win.png", "subfolder": "..\\..", "type": "output"},
        ]
    }


async def _mode(ctx, mode, value):
    await ctx.work(_seconds(ctx))
    return (f"{mode}:{value}",), None


def _validate_load_image(server: FakeComfyServer, image: Any) -> bool | str:
    name, base = server._annotated(str(image), "input")
    if not (base / name).is_file():
        return f"Invalid image file: {image}"
    return True


INT_MAX = 0xFFFFFFFFFFFFFFFF
UPSCALE = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
SAMPLERS = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim"]
SCHEDULERS = ["normal", "karras", "exponential", "sgm_uniform", "simple"]
HIDDEN_OUT = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def default_nodes() -> dict[str, NodeDef]:
    """The node classes the fake server knows (a few built-ins plus a tiny fake custom pack)."""
    nodes = [
        NodeDef(
            "EmptyImage",
            {
                "width": ("INT", {"default": 512, "min": 1, "max": 16384, "step": 1}),
                "height": ("INT", {"default": 512, "min": 1, "max": 16384, "step": 1}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
                "color": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}),
            },
            outputs=("IMAGE",),
            category="image",
            run=_empty_image,
        ),
        NodeDef(
            "ImageScale",
            {
                "image": ("IMAGE",),
                "upscale_method": (UPSCALE,),
                "width": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
                "height": ("INT", {"default": 512, "min": 0, "max": 16384, "step": 1}),
                "crop": (["disabled", "center"],),
            },
            outputs=("IMAGE",),
            category="image/upscaling",
            run=_image_scale,
        ),
        NodeDef(
            "SaveImage",
            {
                "images": ("IMAGE", {"tooltip": "The images to save."}),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
            },
            hidden=HIDDEN_OUT,
            output_node=True,
            category="image",
            run=_save_image,
        ),
        NodeDef(
            "PreviewImage",
            {"images": ("IMAGE",)},
            hidden=HIDDEN_OUT,
            output_node=True,
            category="image",
            run=_preview_image,
        ),
        NodeDef(
            "SaveAnimatedWEBP",
            {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "ComfyUI"}),
                "fps": ("FLOAT", {"default": 6.0, "min": 0.01, "max": 1000.0, "step": 0.01}),
                "lossless": ("BOOLEAN", {"default": True}),
                "quality": ("INT", {"default": 80, "min": 0, "max": 100}),
                "method": (["default", "fastest", "slowest"],),
            },
            hidden=HIDDEN_OUT,
            output_node=True,
            category="image/animation",
            run=_save_webp,
        ),
        NodeDef(
            "LoadImage",
            {
                "image": (
                    lambda s: (
                        sorted(p.name for p in s.input_dir.iterdir() if p.is_file()),
                        {"image_upload": True},
                    )
                ),
            },
            outputs=("IMAGE", "MASK"),
            category="image",
            run=_load_image,
            validate_names=("image",),
            validate=_validate_load_image,
        ),
        NodeDef(
            "CheckpointLoaderSimple",
            {
                "ckpt_name": (
                    ["v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors"],
                    {"tooltip": "The name of the checkpoint (model) to load."},
                ),
            },
            outputs=("MODEL", "CLIP", "VAE"),
            category="loaders",
            run=_checkpoint,
        ),
        NodeDef(
            "CLIPTextEncode",
            {
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
                "clip": ("CLIP",),
            },
            outputs=("CONDITIONING",),
            category="conditioning",
            run=_encode,
        ),
        NodeDef(
            "EmptyLatentImage",
            {
                "width": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                "height": ("INT", {"default": 512, "min": 16, "max": 16384, "step": 8}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            },
            outputs=("LATENT",),
            category="latent",
            run=_empty_latent,
        ),
        NodeDef(
            "KSampler",
            {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": INT_MAX, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (SAMPLERS,),
                "scheduler": (SCHEDULERS,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            outputs=("LATENT",),
            category="sampling",
            run=_ksampler,
        ),
        NodeDef(
            "VAEDecode",
            {"samples": ("LATENT",), "vae": ("VAE",)},
            outputs=("IMAGE",),
            category="latent",
            run=_vae_decode,
        ),
        # --- a fake custom-node pack ---
        NodeDef(
            "CF_Wait",
            {
                "seconds": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3600.0}),
            },
            optional={
                "steps": ("INT", {"default": 10, "min": 1, "max": 1000}),
                "anything": ("*",),
            },
            outputs=("FLOAT",),
            category="charforge/test",
            python_module="custom_nodes.fakepack",
            run=_wait,
        ),
        NodeDef(
            "CF_ShowText",
            {
                "text": ("STRING", {"forceInput": True}),
            },
            optional={"number": ("FLOAT", {"default": 0.0})},
            outputs=("STRING",),
            output_node=True,
            category="charforge/test",
            python_module="custom_nodes.fakepack",
            run=_show_text,
        ),
        NodeDef(
            "CF_Mode",
            {
                "mode": ("COMBO", {"options": ["fast", "best"]}),
                "value": ("STRING", {"default": ""}),
            },
            outputs=("STRING",),
            category="charforge/test",
            python_module="custom_nodes.fakepack",
            run=_mode,
        ),
        NodeDef(
            "CF_SaveGif",
            {
                "images": ("IMAGE",),
                "filename_prefix": ("STRING", {"default": "gif/CF"}),
            },
            output_node=True,
            category="charforge/test",
            python_module="custom_nodes.fakepack",
            run=_save_gif,
        ),
        NodeDef(
            "CF_SaveAudio",
            {
                "filename_prefix": ("STRING", {"default": "audio/CF"}),
            },
            output_node=True,
            category="charforge/test",
            python_module="custom_nodes.fakepack",
            run=_save_audio,
        ),
        NodeDef(
            "CF_Hostile",
            {},
            optional={"anything": ("*",)},
            output_node=True,
            category="charforge/test",
            python_module="custom_nodes.fakepack",
            run=_hostile,
        ),
    ]
    return {n.name: n for n in nodes}


# ----------------------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Knobs:
    """Behaviour switches; tests change them before or during a run."""

    #: seconds each executed node takes (samplers spread it over their progress steps)
    node_seconds: float = 0.0
    #: node id or class_type whose execution raises (``execution_error``)
    fail_node: str | None = None
    fail_message: str = "fake failure"
    #: drop the client's socket (abort the TCP connection) instead of sending this event type ...
    drop_socket_on: str | None = None
    #: ... this many times (then deliver normally)
    drop_times: int = 1
    #: stop delivering any WebSocket message to clients (the socket stays open): a stalled proxy
    mute_websocket: bool = False
    #: delay between execution_success/error and the history write (the race of contract fact 7)
    history_delay: float = 0.0
    #: when set, every request must carry these headers (else 401)
    require_headers: dict[str, str] | None = None
    #: serve any /view filename (a hostile server ignoring ComfyUI's own path rules)
    lenient_view: bool = False
    #: output caching like ComfyUI's classic cache
    caching: bool = True
    #: extra seconds before a queued prompt starts (models loading...)
    start_delay: float = 0.0
    #: send ``executing {node: null}`` after the history write (False: a client must poll the history)
    send_finished_marker: bool = True
    #: queue the next N prompts but cut the connection instead of answering (the answer is lost)
    abort_prompt_responses: int = 0
    # --- fault injection for batch tests (HTTP requests only; /ws is affected by ``down`` alone) ---
    #: answer the next N HTTP requests with ``fail_status`` ...
    fail_next: int = 0
    #: ... and each other one with this probability (a 500/429 storm)
    fail_rate: float = 0.0
    fail_status: int = 500
    #: ``Retry-After`` header (seconds) sent with injected failures
    retry_after: float | None = None
    #: only requests whose path (below the prefix, without ``/api``) starts with one of these are failed/dropped
    fault_paths: tuple[str, ...] = ()
    #: abort the TCP connection of HTTP requests with this probability (a flaky network)
    drop_rate: float = 0.0
    #: the server is "down": every request, WebSocket included, has its connection aborted
    down: bool = False
    #: seed of the random faults (reproducible storms)
    fault_seed: int = 0
    #: body text of the injected ``fail_status`` answers (default ``"<status>: injected fault"``)
    fail_body: str | None = None
    # --- a hostile server (bounds the driver must keep) ---
    #: ``/view`` misbehaves: "infinite" streams bytes until the client goes away, "trickle" sends one byte
    #: every ``trickle_seconds`` (for ``trickle_bytes`` bytes)
    view_mode: str | None = None
    trickle_seconds: float = 2.0
    trickle_bytes: int = 1000
    #: ``/history/<id>`` answers a valid JSON object this many bytes long (streamed, never built in memory)
    huge_history_bytes: int = 0
    #: send each newly connected WebSocket one text message this many bytes long, ``oversize_ws_times`` times
    oversize_ws_bytes: int = 0
    oversize_ws_times: int = 1
    #: answer these paths (below the prefix, without ``/api``; exact, or a prefix ending in "/") with this JSON
    #: instead: a value, or ``callable(request) -> value``
    replies: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any = None
    time: float = field(default_factory=time.time)


class FakeComfyServer(LoopbackServer):
    """The fake ComfyUI server; ``start()`` runs it on 127.0.0.1 in a background thread."""

    thread_name = "fake-comfy"
    what = "fake ComfyUI server"

    def __init__(
        self,
        *,
        prefix: str = "",
        root: str | Path | None = None,
        knobs: Knobs | None = None,
        port: int = 0,
        extra_routes: tuple = (),
    ) -> None:
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fake-comfy-")
            root = self._tmp.name
        self.root = Path(root)
        self.input_dir = self.root / "input"
        self.output_dir = self.root / "output"
        self.temp_dir = self.root / "temp"
        for d in (self.input_dir, self.output_dir, self.temp_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.input_dir / "example.png").write_bytes(png_bytes(4, 4, (200, 10, 10)))
        self.knobs = knobs or Knobs()
        self.nodes = default_nodes()
        #: more (method, path, handler) routes, e.g. CharForge's own (nodes/transfer.py) as a pack adds them
        self.extra_routes = tuple(extra_routes)
        self.requests: list[RecordedRequest] = []
        self.ws_connects: list[RecordedRequest] = []
        self.interrupt_calls: list[dict] = []
        self._init_loopback(port)
        # ComfyUI state
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._transports: dict[str, Any] = {}
        self._flags: dict[str, dict] = {}
        self.queue: list[tuple] = []
        self.running: dict[int, tuple] = {}
        self.history: dict[str, dict] = {}
        self.history_written_at: dict[str, float] = {}
        self.number = 0
        self._task_counter = 0
        self._interrupt = False
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self._cache: dict[str, tuple[Any, tuple, dict | None]] = {}
        self._queue_event: asyncio.Event | None = None
        self._drops_done = 0
        self.sent: list[tuple[str | None, str, Any]] = []  # (sid, type, data) of every JSON message delivered
        #: how many times each prompt id started executing (a batch must never run one twice)
        self.executions: dict[str, int] = {}
        #: prompt ids in the order they started executing, with their graph (to count runs per job)
        self.executed: list[tuple[str, dict]] = []
        #: bumped by :meth:`restart`; a prompt that was running then never gets a history entry
        self.generation = 0
        #: the generation each entry of ``executed`` ran in
        self.execution_generations: list[int] = []
        self.injected_faults = 0
        #: queued + running prompts seen by each accepted POST /prompt (how hard a client feeds the queue)
        self.in_flight_at_submit: list[int] = []
        #: bytes the hostile modes (view_mode, huge_history_bytes) managed to send before the client stopped
        self.hostile_bytes_sent = 0
        self._oversize_sent = 0
        import random

        self._fault_rng = random.Random(self.knobs.fault_seed)

    # ---- lifecycle --------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL including the prefix, with a trailing slash when a prefix is used."""
        base = f"http://127.0.0.1:{self.port}"
        return f"{base}{self.prefix}/" if self.prefix else base

    def stop(self) -> None:
        super().stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def restart(self) -> None:
        """Simulate a ComfyUI restart: queue, running job, history and cache are forgotten, sockets drop."""
        self.call(self._forget_everything)

    async def _forget_everything(self) -> None:
        self.generation += 1
        self.queue = []
        self.running.clear()
        self.history.clear()
        self._cache.clear()
        if self.last_node_id is not None:
            self._interrupt = True
        for sid in list(self.sockets):
            transport = self._transports.get(sid)
            self.sockets.pop(sid, None)
            if transport is not None:
                transport.abort()

    def call(self, coro_fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``coro_fn(*args)`` on the server loop from a test thread and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result(10)

    async def _startup(self) -> None:
        self._queue_event = asyncio.Event()
        app = web.Application(middlewares=[self._middleware], client_max_size=MAX_UPLOAD_SIZE)
        routes = [
            ("GET", "/ws", self.h_ws),
            ("POST", "/prompt", self.h_post_prompt),
            ("GET", "/prompt", self.h_get_prompt),
            ("GET", "/queue", self.h_get_queue),
            ("POST", "/queue", self.h_post_queue),
            ("POST", "/interrupt", self.h_interrupt),
            ("GET", "/history", self.h_get_history),
            ("GET", "/history/{prompt_id}", self.h_get_history_item),
            ("POST", "/history", self.h_post_history),
            ("GET", "/object_info", self.h_object_info),
            ("GET", "/object_info/{node_class}", self.h_object_info_one),
            ("GET", "/view", self.h_view),
            ("POST", "/upload/image", self.h_upload),
            ("GET", "/system_stats", self.h_system_stats),
            ("GET", "/features", self.h_features),
            ("POST", "/free", self.h_free),
            *self.extra_routes,
        ]
        for method, path, handler in routes:
            for full in (self.prefix + path, self.prefix + "/api" + path):
                app.router.add_route(method, full, handler)
        await self._listen(app)
        self._worker = asyncio.ensure_future(self._prompt_worker())

    async def _shutdown(self) -> None:
        self._worker.cancel()
        for ws in list(self.sockets.values()):
            await ws.close()
        await self._cleanup()

    # ---- middleware: auth, Origin check, request log --------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        body = None
        if request.method == "POST" and request.content_type == "application/json" and request.can_read_body:
            try:
                body = json.loads(await request.text())
            except ValueError:
                body = "<invalid json>"
        record = RecordedRequest(
            request.method, request.path, dict(request.query), dict(request.headers), body
        )
        self.requests.append(record)
        fault = self._fault(request)
        if fault is not None:
            return fault
        reply = self._canned_reply(request)
        if reply is not None:
            return reply
        required = self.knobs.require_headers or {}
        for name, value in required.items():
            if request.headers.get(name) != value:
                return web.Response(status=401, text="401: Unauthorized")
        origin = request.headers.get("Origin")
        if origin is not None:
            from urllib.parse import urlsplit

            if urlsplit(origin).netloc != request.headers.get("Host"):
                return web.Response(status=403)
        return await handler(request)

    def _fault(self, request: web.Request) -> web.StreamResponse | None:
        """An injected failure for this request (see the fault knobs of :class:`Knobs`), or None."""
        k = self.knobs
        if k.down:
            self.injected_faults += 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        path = request.path[len(self.prefix) :]
        if path.startswith("/api/"):
            path = path[4:]
        if path == "/ws" or (k.fault_paths and not path.startswith(tuple(k.fault_paths))):
            return None
        if k.drop_rate and self._fault_rng.random() < k.drop_rate:
            self.injected_faults += 1
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if k.fail_next > 0 or (k.fail_rate and self._fault_rng.random() < k.fail_rate):
            k.fail_next = max(0, k.fail_next - 1)
            self.injected_faults += 1
            headers = {"Retry-After": f"{k.retry_after:g}"} if k.retry_after is not None else None
            text = k.fail_body if k.fail_body is not None else f"{k.fail_status}: injected fault"
            return web.Response(status=k.fail_status, text=text, headers=headers)
        return None

    def _canned_reply(self, request: web.Request) -> web.StreamResponse | None:
        """The JSON of ``knobs.replies`` for this request's path, or None."""
        path = request.path[len(self.prefix) :]
        if path.startswith("/api/"):
            path = path[4:]
        for pattern, value in self.knobs.replies.items():
            if path == pattern or (pattern.endswith("/") and path.startswith(pattern)):
                return web.json_response(value(request) if callable(value) else value)
        return None

    async def _stream(
        self,
        request: web.Request,
        head: bytes,
        size: int | None,
        tail: bytes = b"",
        chunk: bytes = b"x" * 65536,
        pause: float = 0.0,
    ) -> web.StreamResponse:
        """Stream ``head``, then ``chunk`` until ``size`` bytes (None: forever), then ``tail``; counts what went
        out in ``hostile_bytes_sent`` and stops quietly when the client leaves."""
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write(head)
            self.hostile_bytes_sent += len(head)
            sent = len(head)
            while size is None or sent < size - len(tail):
                part = chunk if size is None else chunk[: size - len(tail) - sent]
                await resp.write(part)
                self.hostile_bytes_sent += len(part)
                sent += len(part)
                if pause:
                    await asyncio.sleep(pause)
                else:
                    await asyncio.sleep(0)
            await resp.write(tail)
            await resp.write_eof()
        return resp

    # ---- messaging ----------------------------------------------------------------------------------------

    def queue_info(self) -> dict:
        return {"exec_info": {"queue_remaining": len(self.queue) + len(self.running)}}

    async def send(self, event: str, data: Any, sid: str | None) -> None:
        """Send a JSON message to ``sid`` (or to every socket when ``sid`` is None)."""
        targets = list(self.sockets.items()) if sid is None else [(sid, self.sockets.get(sid))]
        for target_sid, ws in targets:
            if ws is None or ws.closed:
                continue
            if self.knobs.drop_socket_on == event and self._drops_done < self.knobs.drop_times:
                self._drops_done += 1
                transport = self._transports.get(target_sid)
                self.sockets.pop(target_sid, None)
                if transport is not None:
                    transport.abort()
                continue
            if self.knobs.mute_websocket:
                continue
            try:
                await ws.send_str(json.dumps({"type": event, "data": data}))
                self.sent.append((target_sid, event, data))
            except (ConnectionError, RuntimeError):
                pass

    async def send_bytes(self, payload: bytes, sid: str | None) -> None:
        ws = self.sockets.get(sid) if sid else None
        if ws is None or ws.closed or self.knobs.mute_websocket:
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_bytes(payload)

    async def queue_updated(self) -> None:
        await self.send("status", {"status": self.queue_info()}, None)

    async def add_message(
        self, messages: list, event: str, data: dict, client_id: str | None, broadcast: bool = False
    ) -> None:
        data = {**data, "timestamp": int(time.time() * 1000)}
        messages.append((event, data))
        if client_id is not None or broadcast:
            await self.send(event, data, client_id)

    # ---- WebSocket ----------------------------------------------------------------------------------------

    async def h_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws_connects.append(
            RecordedRequest("GET", request.path, dict(request.query), dict(request.headers))
        )
        sid = request.query.get("clientId", "")
        if sid:
            self.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        self.sockets[sid] = ws
        self._transports[sid] = request.transport
        self._flags[sid] = {}
        try:
            if self.knobs.oversize_ws_bytes and self._oversize_sent < self.knobs.oversize_ws_times:
                self._oversize_sent += 1
                padding = "x" * self.knobs.oversize_ws_bytes
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.send_str(json.dumps({"type": "status", "data": {"padding": padding}}))
            await self.send("status", {"status": self.queue_info(), "sid": sid}, sid)
            if self.client_id == sid and self.last_node_id is not None:
                await self.send("executing", {"node": self.last_node_id}, sid)
            first = True
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(msg.data)
                    except ValueError:
                        continue
                    if first and data.get("type") == "feature_flags":
                        self._flags[sid] = data.get("data", {})
                        await self.send(
                            "feature_flags",
                            {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE},
                            sid,
                        )
                    first = False
        finally:
            if self.sockets.get(sid) is ws:
                self.sockets.pop(sid, None)
                self._flags.pop(sid, None)
        return ws

    # ---- prompt submission and validation -------------------------------------------------------------------

    async def h_post_prompt(self, request: web.Request) -> web.Response:
        try:
            json_data = json.loads(await request.text())
        except ValueError:
            return web.Response(status=500, text="500 Internal Server Error")
        if "number" in json_data:
            number = float(json_data["number"])
        else:
            number = self.number
            if json_data.get("front"):
                number = -number
            self.number += 1
        if "prompt" not in json_data:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        valid, error, outputs, node_errors = self.validate_prompt(
            prompt, json_data.get("partial_execution_targets")
        )
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not valid:
            return web.json_response({"error": error, "node_errors": node_errors}, status=400)
        self.in_flight_at_submit.append(len(self.queue) + len(self.running))
        heapq.heappush(self.queue, (number, prompt_id, prompt, extra_data, outputs))
        await self.queue_updated()
        assert self._queue_event is not None
        self._queue_event.set()
        if self.knobs.abort_prompt_responses > 0:
            self.knobs.abort_prompt_responses -= 1
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=200)
        return web.json_response({"prompt_id": prompt_id, "number": number, "node_errors": node_errors})

    def validate_prompt(self, prompt: Any, partial: list | None) -> tuple[bool, dict | None, list, dict]:
        """Mirror of ComfyUI's ``execution.validate_prompt`` for the fake node set."""
        outputs = []
        for x in prompt:
            if "class_type" not in prompt[x]:
                return (
                    False,
                    {
                        "type": "invalid_prompt",
                        "message": "Cannot execute because a node is missing the class_type property.",
                        "details": f"Node ID '#{x}'",
                        "extra_info": {},
                    },
                    [],
                    {},
                )
            class_type = prompt[x]["class_type"]
            node = self.nodes.get(class_type)
            if node is None:
                return (
                    False,
                    {
                        "type": "invalid_prompt",
                        "message": f"Cannot execute because node {class_type} does not exist.",
                        "details": f"Node ID '#{x}'",
                        "extra_info": {},
                    },
                    [],
                    {},
                )
            if node.output_node and (partial is None or x in partial):
                outputs.append(x)
        if not outputs:
            return (
                False,
                {
                    "type": "prompt_no_outputs",
                    "message": "Prompt has no outputs",
                    "details": "",
                    "extra_info": {},
                },
                [],
                {},
            )
        good: list[str] = []
        errors: list[tuple[str, list]] = []
        node_errors: dict[str, dict] = {}
        validated: dict[str, tuple] = {}
        for o in outputs:
            try:
                ok, reasons = self._validate_inputs(prompt, o, validated)
            except Exception as ex:  # noqa: BLE001 - mirrors the server's catch-all
                ok = False
                reasons = [
                    {
                        "type": "exception_during_validation",
                        "message": "Exception when validating node",
                        "details": str(ex),
                        "extra_info": {
                            "exception_type": type(ex).__name__,
                            "traceback": traceback.format_tb(ex.__traceback__),
                        },
                    }
                ]
                validated[o] = (False, reasons)
            if ok:
                good.append(o)
                continue
            errors.append((o, reasons))
            for node_id, (node_ok, node_reasons) in validated.items():
                if not node_ok and node_reasons:
                    if node_id not in node_errors:
                        node_errors[node_id] = {
                            "errors": node_reasons,
                            "dependent_outputs": [],
                            "class_type": prompt[node_id]["class_type"],
                        }
                    node_errors[node_id]["dependent_outputs"].append(o)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for _, reasons in errors for e in reasons)
            return (
                False,
                {
                    "type": "prompt_outputs_failed_validation",
                    "message": "Prompt outputs failed validation",
                    "details": details,
                    "extra_info": {},
                },
                [],
                node_errors,
            )
        return True, None, good, node_errors

    def _validate_inputs(self, prompt: dict, unique_id: str, validated: dict) -> tuple[bool, list]:
        if unique_id in validated:
            return validated[unique_id]
        inputs = prompt[unique_id]["inputs"]
        node = self.nodes[prompt[unique_id]["class_type"]]
        types = node.input_types(self)
        errors: list[dict] = []
        valid = True
        for category in ("required", "optional"):
            for x, spec in types.get(category, {}).items():
                input_type = spec[0]
                extra = spec[1] if len(spec) > 1 else {}
                info = [input_type, extra]
                if x not in inputs:
                    if category == "required":
                        errors.append(
                            {
                                "type": "required_input_missing",
                                "message": "Required input is missing",
                                "details": f"{x}",
                                "extra_info": {"input_name": x},
                            }
                        )
                    continue
                val = inputs[x]
                if isinstance(val, list):
                    if len(val) != 2:
                        errors.append(
                            {
                                "type": "bad_linked_input",
                                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                                "details": f"{x}",
                                "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                            }
                        )
                        continue
                    o_id = val[0]
                    received = self.nodes[prompt[o_id]["class_type"]].outputs[val[1]]
                    if not _types_match(received, input_type):
                        errors.append(
                            {
                                "type": "return_type_mismatch",
                                "message": "Return type mismatch between linked nodes",
                                "details": f"{x}, received_type({received}) mismatch input_type({input_type})",
                                "extra_info": {
                                    "input_name": x,
                                    "input_config": info,
                                    "received_type": received,
                                    "linked_node": val,
                                },
                            }
                        )
                        continue
                    try:
                        ok, _ = self._validate_inputs(prompt, o_id, validated)
                        if not ok:
                            valid = False
                    except Exception as ex:  # noqa: BLE001
                        valid = False
                        validated[o_id] = (
                            False,
                            [
                                {
                                    "type": "exception_during_inner_validation",
                                    "message": "Exception when validating inner node",
                                    "details": str(ex),
                                    "extra_info": {
                                        "input_name": x,
                                        "input_config": info,
                                        "exception_message": str(ex),
                                        "exception_type": type(ex).__name__,
                                        "traceback": [],
                                        "linked_node": val,
                                    },
                                }
                            ],
                        )
                    continue
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                try:
                    converters = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
                    converter = converters.get(input_type) if isinstance(input_type, str) else None
                    if converter is not None:
                        val = converter(val)
                        inputs[x] = val
                except Exception as ex:  # noqa: BLE001
                    errors.append(
                        {
                            "type": "invalid_input_type",
                            "message": f"Failed to convert an input value to a {input_type} value",
                            "details": f"{x}, {val}, {ex}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": info,
                                "received_value": val,
                                "exception_message": str(ex),
                            },
                        }
                    )
                    continue
                if x in node.validate_names:
                    continue
                if "min" in extra and val < extra["min"]:
                    errors.append(
                        {
                            "type": "value_smaller_than_min",
                            "message": f"Value {val} smaller than min of {extra['min']}",
                            "details": f"{x}",
                            "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                        }
                    )
                    continue
                if "max" in extra and val > extra["max"]:
                    errors.append(
                        {
                            "type": "value_bigger_than_max",
                            "message": f"Value {val} bigger than max of {extra['max']}",
                            "details": f"{x}",
                            "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                        }
                    )
                    continue
                if isinstance(input_type, list) and val not in input_type:
                    list_info = (
                        f"(list of length {len(input_type)})" if len(input_type) > 20 else str(input_type)
                    )
                    errors.append(
                        {
                            "type": "value_not_in_list",
                            "message": "Value not in list",
                            "details": f"{x}: '{val}' not in {list_info}",
                            "extra_info": {
                                "input_name": x,
                                "input_config": None if len(input_type) > 20 else info,
                                "received_value": val,
                            },
                        }
                    )
                    continue
        if node.validate is not None:
            for name in node.validate_names:
                if name in inputs and not isinstance(inputs[name], list):
                    ret = node.validate(self, inputs[name])
                    if ret is not True:
                        details = name if ret is False else f"{name} - {ret}"
                        errors.append(
                            {
                                "type": "custom_validation_failed",
                                "message": "Custom validation failed for node",
                                "details": details,
                                "extra_info": {"input_name": name},
                            }
                        )
        result = (False, errors) if errors or not valid else (True, [])
        validated[unique_id] = result
        return result

    # ---- queue, history, interrupt ----------------------------------------------------------------------------

    async def h_get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue_info())

    async def h_get_queue(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "queue_running": [list(x) for x in self.running.values()],
                "queue_pending": [list(x) for x in self.queue],
            }
        )

    async def h_post_queue(self, request: web.Request) -> web.Response:
        data = json.loads(await request.text() or "{}")
        if data.get("clear"):
            self.queue = []
            await self.queue_updated()
        for pid in data.get("delete", []):
            for i, item in enumerate(self.queue):
                if item[1] == pid:
                    self.queue.pop(i)
                    heapq.heapify(self.queue)
                    await self.queue_updated()
                    break
        return web.Response(status=200)

    async def h_interrupt(self, request: web.Request) -> web.Response:
        try:
            data = json.loads(await request.text() or "{}")
        except ValueError:
            data = {}
        self.interrupt_calls.append(data)
        prompt_id = data.get("prompt_id")
        if prompt_id:
            if any(item[1] == prompt_id for item in self.running.values()):
                self._interrupt = True
        else:
            self._interrupt = True
        return web.Response(status=200)

    async def h_get_history(self, request: web.Request) -> web.Response:
        max_items = request.query.get("max_items")
        offset = int(request.query.get("offset", -1))
        keys = list(self.history)
        if max_items is not None:
            n = int(max_items)
            if offset < 0:
                offset = len(keys) - n
            keys = keys[max(offset, 0) :][:n]
        elif offset > 0:
            keys = keys[offset:]
        return web.json_response({k: self.history[k] for k in keys})

    async def h_get_history_item(self, request: web.Request) -> web.StreamResponse:
        pid = request.match_info["prompt_id"]
        if self.knobs.huge_history_bytes:
            head = json.dumps({pid: {"padding": ""}})[:-3].encode()  # '{"<pid>": {"padding": "'
            return await self._stream(request, head, self.knobs.huge_history_bytes, tail=b'"}}')
        if pid in self.history:
            return web.json_response({pid: copy.deepcopy(self.history[pid])})
        return web.json_response({})

    async def h_post_history(self, request: web.Request) -> web.Response:
        data = json.loads(await request.text() or "{}")
        if data.get("clear"):
            self.history.clear()
        for pid in data.get("delete", []):
            self.history.pop(pid, None)
        return web.Response(status=200)

    async def h_free(self, request: web.Request) -> web.Response:
        data = json.loads(await request.text() or "{}")
        if data.get("free_memory"):
            self._cache.clear()
        return web.Response(status=200)

    # ---- info endpoints ---------------------------------------------------------------------------------------

    async def h_object_info(self, request: web.Request) -> web.Response:
        return web.json_response({name: node.object_info(self) for name, node in self.nodes.items()})

    async def h_object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        node = self.nodes.get(name)
        return web.json_response({name: node.object_info(self)} if node else {})

    async def h_system_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 8 << 30,
                    "ram_free": 4 << 30,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": "1.27.10",
                    "installed_templates_version": "0.1.95",
                    "required_templates_version": "0.1.95",
                    "python_version": "3.11.7",
                    "pytorch_version": "2.8.0+cpu",
                    "embedded_python": False,
                    "argv": ["main.py", "--cpu"],
                },
                "devices": [
                    {
                        "name": "cpu",
                        "type": "cpu",
                        "index": None,
                        "vram_total": 0,
                        "vram_free": 0,
                        "torch_vram_total": 0,
                        "torch_vram_free": 0,
                    }
                ],
            }
        )

    async def h_features(self, request: web.Request) -> web.Response:
        return web.json_response({"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE})

    # ---- files --------------------------------------------------------------------------------------------

    def dir_by_type(self, kind: str | None) -> Path | None:
        return {"output": self.output_dir, "input": self.input_dir, "temp": self.temp_dir}.get(
            kind or "output"
        )

    def _annotated(self, name: str, default: str) -> tuple[str, Path]:
        for kind in ("output", "input", "temp"):
            suffix = f" [{kind}]"
            if name.endswith(suffix):
                return name[: -len(suffix)], self.dir_by_type(kind)  # type: ignore[return-value]
        return name, self.dir_by_type(default)  # type: ignore[return-value]

    async def h_view(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        if "filename" not in q:
            return web.Response(status=404)
        if self.knobs.view_mode == "infinite":
            return await self._stream(request, b"", None)
        if self.knobs.view_mode == "trickle":
            return await self._stream(
                request, b"", self.knobs.trickle_bytes, chunk=b"x", pause=self.knobs.trickle_seconds
            )
        if self.knobs.lenient_view:
            return web.Response(body=png_bytes(2, 2, (1, 2, 3)), content_type="image/png")
        filename = q["filename"]
        annotated_dir = None
        for kind in ("output", "input", "temp"):
            if filename.endswith(f" [{kind}]"):
                filename, annotated_dir = filename[: -len(kind) - 3], self.dir_by_type(kind)
        if not filename or filename[0] == "/" or ".." in filename:
            return web.Response(status=400)
        out_dir = annotated_dir or self.dir_by_type(q.get("type", "output"))
        if out_dir is None:
            return web.Response(status=400)
        out_dir = Path(os.path.abspath(out_dir))
        if "subfolder" in q:
            full = Path(os.path.abspath(os.path.join(out_dir, q["subfolder"])))
            if os.path.commonpath((str(full), str(out_dir))) != str(out_dir):
                return web.Response(status=403)
            out_dir = full
        path = out_dir / os.path.basename(filename)
        if path.is_file():
            return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})
        return web.Response(status=404)

    async def h_upload(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        if image is None or not hasattr(image, "file"):
            return web.Response(status=400)
        kind = str(post.get("type") or "input")
        upload_dir = self.dir_by_type(kind)
        if upload_dir is None:
            return web.Response(status=400)
        upload_dir = Path(os.path.abspath(upload_dir))
        filename = image.filename
        if not filename:
            return web.Response(status=400)
        subfolder = str(post.get("subfolder", ""))
        folder = Path(os.path.join(upload_dir, os.path.normpath(subfolder)))
        filepath = Path(os.path.abspath(os.path.join(folder, filename)))
        if os.path.commonpath((str(upload_dir), str(filepath))) != str(upload_dir):
            return web.Response(status=400)
        folder.mkdir(parents=True, exist_ok=True)
        data = image.file.read()
        duplicate = False
        if str(post.get("overwrite", "")) not in ("true", "1"):
            stem, ext = os.path.splitext(filename)
            i = 1
            while filepath.exists():
                if filepath.read_bytes() == data:
                    duplicate = True
                    break
                filename = f"{stem} ({i}){ext}"
                filepath = folder / filename
                i += 1
        if not duplicate:
            filepath.write_bytes(data)
        return web.json_response({"name": filename, "subfolder": subfolder, "type": kind})

    def _next_counter(self, folder: Path, filename: str) -> int:
        highest = 0
        for p in folder.glob(f"{filename}_*"):
            part = p.name[len(filename) + 1 :].split("_")[0]
            if part.isdigit():
                highest = max(highest, int(part))
        return highest + 1

    def _write_output(self, prefix: str, ext: str, data: bytes, kind: str = "output") -> dict:
        base = self.dir_by_type(kind)
        assert base is not None
        subfolder, _, filename = prefix.rpartition("/")
        folder = base / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        counter = self._next_counter(folder, filename)
        name = f"{filename}_{counter:05}_.{ext}"
        (folder / name).write_bytes(data)
        return {"filename": name, "subfolder": subfolder, "type": kind}

    def _save_pngs(self, ctx: RunContext, images: FakeImage, prefix: str, kind: str) -> list[dict]:
        text = {"prompt": json.dumps(ctx.prompt)}
        workflow = (ctx.extra_data.get("extra_pnginfo") or {}).get("workflow")
        if workflow is not None:
            text["workflow"] = json.dumps(workflow)
        data = png_bytes(images.width, images.height, images.rgb, text)
        return [self._write_output(prefix, "png", data, kind) for _ in range(images.batch)]

    # ---- execution --------------------------------------------------------------------------------------------

    async def _progress_update(self, ctx: RunContext, value: int, total: int, preview: bool) -> None:
        if self._interrupt:
            self._interrupt = False
            raise Interrupt()
        target = ctx.client_id
        await self.send(
            "progress",
            {"value": value, "max": total, "prompt_id": ctx.prompt_id, "node": ctx.node_id},
            target,
        )
        await self.send(
            "progress_state",
            {
                "prompt_id": ctx.prompt_id,
                "nodes": {ctx.node_id: self._node_state(ctx, "running", value, total)},
            },
            target,
        )
        if preview and target is not None:
            image = png_bytes(2, 2, (value % 256, 0, 0))
            if self._flags.get(target, {}).get("supports_preview_metadata"):
                meta = json.dumps(
                    {
                        "node_id": ctx.node_id,
                        "prompt_id": ctx.prompt_id,
                        "display_node_id": ctx.node_id,
                        "parent_node_id": None,
                        "real_node_id": ctx.node_id,
                        "image_type": "image/png",
                    }
                ).encode()
                payload = struct.pack(">I", 4) + struct.pack(">I", len(meta)) + meta + image
            else:
                payload = struct.pack(">I", 1) + struct.pack(">I", 2) + image
            await self.send_bytes(payload, target)

    @staticmethod
    def _node_state(ctx: RunContext, state: str, value: float, total: float) -> dict:
        return {
            "value": value,
            "max": total,
            "state": state,
            "node_id": ctx.node_id,
            "prompt_id": ctx.prompt_id,
            "display_node_id": ctx.node_id,
            "parent_node_id": None,
            "real_node_id": ctx.node_id,
        }

    async def _prompt_worker(self) -> None:
        assert self._queue_event is not None
        while True:
            while not self.queue:
                self._queue_event.clear()
                await self._queue_event.wait()
            if self.knobs.start_delay:
                await asyncio.sleep(self.knobs.start_delay)
                if not self.queue:
                    continue
            item = heapq.heappop(self.queue)
            generation = self.generation
            item_id = self._task_counter
            self._task_counter += 1
            self.running[item_id] = copy.deepcopy(item)
            await self.queue_updated()
            prompt_id = item[1]
            self.last_prompt_id = prompt_id
            try:
                status, messages, outputs, meta = await self._execute(item)
            except Exception:  # noqa: BLE001 - keep the fake alive; surface in logs
                traceback.print_exc()
                status, messages, outputs, meta = ("error", False), [], {}, {}
            if self.knobs.history_delay:
                await asyncio.sleep(self.knobs.history_delay)
            self.running.pop(item_id, None)
            if generation != self.generation:  # restarted meanwhile: this run never happened
                continue
            self.history_written_at[prompt_id] = time.time()
            self.history[prompt_id] = {
                "prompt": list(item),
                "outputs": outputs,
                "status": {"status_str": status[0], "completed": status[1], "messages": messages},
                "meta": meta,
            }
            await self.queue_updated()
            if self.client_id is not None and self.knobs.send_finished_marker:
                await self.send("executing", {"node": None, "prompt_id": prompt_id}, self.client_id)

    def _execution_order(self, prompt: dict, outputs: list[str]) -> list[str]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            for value in prompt[node_id]["inputs"].values():
                if isinstance(value, list) and len(value) == 2:
                    visit(str(value[0]))
            order.append(node_id)

        for o in sorted(outputs, key=lambda x: (len(x), x)):
            visit(o)
        return order

    def _signature(self, prompt: dict, node_id: str, memo: dict) -> str:
        if node_id not in memo:
            node = prompt[node_id]
            parts = {}
            for name, value in sorted(node["inputs"].items()):
                if isinstance(value, list) and len(value) == 2:
                    parts[name] = ["link", self._signature(prompt, str(value[0]), memo), value[1]]
                else:
                    parts[name] = value
            memo[node_id] = json.dumps([node["class_type"], parts], sort_keys=True, default=str)
        return memo[node_id]

    async def _execute(self, item: tuple) -> tuple[tuple[str, bool], list, dict, dict]:
        number, prompt_id, prompt, extra_data, outputs = item
        self._interrupt = False
        self.executions[prompt_id] = self.executions.get(prompt_id, 0) + 1
        self.executed.append((prompt_id, prompt))
        self.execution_generations.append(self.generation)
        client_id = extra_data.get("client_id")
        self.client_id = client_id
        messages: list = []
        await self.add_message(messages, "execution_start", {"prompt_id": prompt_id}, client_id)
        order = self._execution_order(prompt, outputs)
        memo: dict = {}
        signatures = {nid: self._signature(prompt, nid, memo) for nid in order}
        cached = [
            nid
            for nid in prompt
            if nid in signatures
            and self.knobs.caching
            and nid in self._cache
            and self._cache[nid][0] == signatures[nid]
        ]
        await self.add_message(
            messages, "execution_cached", {"nodes": cached, "prompt_id": prompt_id}, client_id
        )
        results: dict[str, tuple] = {}
        ui_outputs: dict[str, dict] = {}
        meta: dict[str, dict] = {}
        executed: list[str] = []
        for node_id in order:
            node_json = prompt[node_id]
            node = self.nodes[node_json["class_type"]]
            if node_id in cached:
                _, out, ui = self._cache[node_id]
                results[node_id] = out
                if ui:
                    ui_outputs[node_id] = ui
                    meta[node_id] = self._meta(node_id)
                if client_id is not None and (ui or node.output_node):
                    await self.send(
                        "executed",
                        {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id},
                        client_id,
                    )
                continue
            ctx = RunContext(self, prompt_id, node_id, client_id, prompt, extra_data)
            try:
                if self._interrupt:
                    self._interrupt = False
                    raise Interrupt()
                await self.send(
                    "progress_state",
                    {"prompt_id": prompt_id, "nodes": {node_id: self._node_state(ctx, "running", 0, 1)}},
                    client_id,
                )
                if client_id is not None:
                    self.last_node_id = node_id
                    await self.send(
                        "executing",
                        {"node": node_id, "display_node": node_id, "prompt_id": prompt_id},
                        client_id,
                    )
                kwargs = {}
                for name, value in node_json["inputs"].items():
                    if isinstance(value, list) and len(value) == 2:
                        value = results[str(value[0])][value[1]]
                    elif isinstance(value, dict) and "__value__" in value:
                        value = value["__value__"]
                    kwargs[name] = value
                for name, kind in node.hidden.items():
                    kwargs[name] = prompt if kind == "PROMPT" else extra_data.get("extra_pnginfo")
                fail = self.knobs.fail_node
                if fail is not None and fail in (node_id, node_json["class_type"]):
                    await ctx.work(self.knobs.node_seconds)
                    raise NodeFailure(self.knobs.fail_message)
                assert node.run is not None
                out, ui = await node.run(ctx, **kwargs)
            except Interrupt:
                await self.add_message(
                    messages,
                    "execution_interrupted",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": node_json["class_type"],
                        "executed": list(executed),
                    },
                    client_id,
                    broadcast=True,
                )
                self.last_node_id = None
                return ("error", False), messages, ui_outputs, meta
            except Exception as ex:  # noqa: BLE001 - a node failure is reported, like ComfyUI does
                exc_type = "ValueError" if isinstance(ex, NodeFailure) else type(ex).__name__
                await self.add_message(
                    messages,
                    "execution_error",
                    {
                        "prompt_id": prompt_id,
                        "node_id": node_id,
                        "node_type": node_json["class_type"],
                        "executed": list(executed),
                        "exception_message": str(ex),
                        "exception_type": exc_type,
                        "traceback": traceback.format_tb(ex.__traceback__) + [f"{exc_type}: {ex}\n"],
                        "current_inputs": {k: [repr(v)] for k, v in node_json["inputs"].items()},
                        "current_outputs": list(results),
                    },
                    client_id,
                )
                self.last_node_id = None
                return ("error", False), messages, ui_outputs, meta
            results[node_id] = out
            executed.append(node_id)
            self._cache[node_id] = (signatures[node_id], out, ui)
            await self.send(
                "progress_state",
                {"prompt_id": prompt_id, "nodes": {node_id: self._node_state(ctx, "finished", 1, 1)}},
                client_id,
            )
            if ui:
                ui_outputs[node_id] = ui
                meta[node_id] = self._meta(node_id)
                if client_id is not None:
                    await self.send(
                        "executed",
                        {"node": node_id, "display_node": node_id, "output": ui, "prompt_id": prompt_id},
                        client_id,
                    )
        await self.add_message(messages, "execution_success", {"prompt_id": prompt_id}, client_id)
        self.last_node_id = None
        return ("success", True), messages, ui_outputs, meta

    @staticmethod
    def _meta(node_id: str) -> dict:
        return {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id}


def _types_match(received: str, expected: Any) -> bool:
    """ComfyUI's link type rule: equal, overlapping comma-unions, or the ANY type ('*')."""
    if isinstance(expected, list):
        return received == "COMBO"
    if received == "*" or expected == "*":
        return True
    if received == expected:
        return True
    r = {t.strip() for t in received.split(",")}
    e = {t.strip() for t in expected.split(",")}
    return bool(r & e)


# ----------------------------------------------------------------------------------------------------------
# Ready-made API-format workflows
# ----------------------------------------------------------------------------------------------------------


async def _lora(ctx: RunContext, model, clip, lora_name, strength_model, strength_clip):
    return (f"{model}+{lora_name}", f"{clip}+{lora_name}"), None


def lora_loader(loras: Any) -> NodeDef:
    """ComfyUI's LoraLoader (its inputs and ranges) for a fake that needs one: `loras` the names it lists, or a
    function of the server returning the input's spec; it hands the model and CLIP on tagged with the LoRA."""
    strength = ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01})
    names = loras if callable(loras) else (list(loras),)
    inputs = {"model": ("MODEL",), "clip": ("CLIP",), "lora_name": names}
    return NodeDef(
        "LoraLoader",
        {**inputs, "strength_model": strength, "strength_clip": strength},
        outputs=("MODEL", "CLIP"),
        category="loaders",
        run=_lora,
    )


def image_workflow(width: int = 32, height: int = 24, batch: int = 1, prefix: str = "test/img") -> dict:
    """EmptyImage -> ImageScale -> SaveImage."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": batch, "color": 0x3366CC},
            "_meta": {"title": "Blank"},
        },
        "2": {
            "class_type": "ImageScale",
            "inputs": {
                "image": ["1", 0],
                "upscale_method": "nearest-exact",
                "width": width,
                "height": height,
                "crop": "disabled",
            },
            "_meta": {"title": "Resize"},
        },
        "3": {
            "class_type": "SaveImage",
            "inputs": {"images": ["2", 0], "filename_prefix": prefix},
            "_meta": {"title": "Save"},
        },
    }


def sampler_workflow(seed: int = 1, steps: int = 4) -> dict:
    """The classic txt2img graph (fake models) ending in SaveImage."""
    return {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
            "_meta": {"title": "Load Checkpoint"},
        },
        "5": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
            "_meta": {"title": "Empty Latent Image"},
        },
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a cat", "clip": ["4", 1]},
            "_meta": {"title": "Positive"},
        },
        "7": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "blurry", "clip": ["4", 1]},
            "_meta": {"title": "Negative"},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
            "_meta": {"title": "KSampler"},
        },
        "8": {
            "class_type": "VAEDecode",
            "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
            "_meta": {"title": "VAE Decode"},
        },
        "9": {
            "class_type": "SaveImage",
            "inputs": {"images": ["8", 0], "filename_prefix": "txt2img"},
            "_meta": {"title": "Save Image"},
        },
    }


def webp_workflow(frames: int = 8) -> dict:
    """EmptyImage(frames) -> SaveAnimatedWEBP."""
    return {
        "1": {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": frames, "color": 255},
            "_meta": {"title": "Frames"},
        },
        "2": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["1", 0],
                "filename_prefix": "anim/clip",
                "fps": 8.0,
                "lossless": True,
                "quality": 80,
                "method": "default",
            },
            "_meta": {"title": "Save WEBP"},
        },
    }


def wait_workflow(seconds: float = 1.0, steps: int = 10, tag: str = "") -> dict:
    """CF_Wait -> CF_ShowText: a cancellable job that reports progress."""
    return {
        "1": {
            "class_type": "CF_Wait",
            "inputs": {"seconds": seconds, "steps": steps},
            "_meta": {"title": "Wait"},
        },
        "2": {
            "class_type": "CF_ShowText",
            "inputs": {"text": f"done {tag}".strip(), "number": ["1", 0]},
            "_meta": {"title": "Show"},
        },
    }


def main(argv: list[str] | None = None) -> None:
    """``python comfy_server.py --listen 127.0.0.1 --port N [--node-seconds S]``: serve until terminated."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--node-seconds", type=float, default=0.0)
    parser.add_argument("--caching", choices=["on", "off"], default="on")
    args, _ = parser.parse_known_args(argv)
    if args.listen != "127.0.0.1":
        raise SystemExit("the fake server only listens on 127.0.0.1")
    server = FakeComfyServer(
        port=args.port, knobs=Knobs(node_seconds=args.node_seconds, caching=args.caching == "on")
    ).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
