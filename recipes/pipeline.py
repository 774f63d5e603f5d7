"""The end-to-end character pipeline, run headless through the driver: ``charforge pipeline PHOTOS --out out``.

Photos -> dataset -> captions -> LoRA -> scored images -> video, as a chain of the shipped stage workflows
(``workflows/api/*.json``) submitted one after the other to a ComfyUI on this machine. One graph cannot do it:
ComfyUI's LoraLoader takes the LoRA as a choice from the loras folder, which the training node's ``lora_name``
(a STRING) cannot feed, so the LoRA must exist before the generation workflow is queued.

The server: ``--server URL`` (it must run on this machine: the stages read and write local paths), else the
ComfyUI answering on 127.0.0.1:8188 when it has CharForge's nodes and a base checkpoint, else one started from
``$COMFYUI_DIR`` with ``out/comfyui`` as its base directory (outputs, inputs and extra models stay under
``out``), else, when comfy-cli is installed and the network is reachable, a ComfyUI installed with comfy-cli into
``out/ComfyUI``. Models: the real ones in the server's folders when there is an SD1.5/SDXL checkpoint; otherwise
tiny random models of the real architectures (:mod:`charforge.engine.tiny`) written into ``out/comfyui/models``,
and every message says the results come from random weights.

Each finished stage is recorded in ``out/pipeline_state.json``; a rerun skips it. What lands in ``out`` (one
folder per stage, files flat, ``out/README.txt`` saying what each holds) is described in docs/pipeline.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from charforge.common.model_folders import all_model_folders
from charforge.common.transfer import load_model_manifest

from ..driver.client import ComfyClient
from ..driver.client.http import is_loopback
from ..driver.config import RunPodSettings, resolve_runpod, resolve_server
from ..driver.errors import ConfigError, DriverError, ServerUnavailable
from ..driver.local import DEFAULT_LOCAL_URL, LocalComfyUI, find_python, probe
from ..driver.progress import JobView, make_renderer
from ..driver.runpod.pod import PodSession
from ..driver.sync import call, parse_train_summary, provision_tiny
from ..driver.workflow.preflight import nodes_to_run
from .remote import RemoteFiles, ensure_models

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO_ROOT / "workflows" / "api"
STAGES = ("dataset", "captions", "lora", "images", "video")
STATE_FILE = "pipeline_state.json"
TINY_WARNING = (
    "TINY RANDOM MODELS: no base checkpoint was found, so every model is a tiny randomly initialised "
    "one of the real architecture. The chain runs for real, but the captions are arbitrary tags, the "
    "LoRA learns nothing useful and the images and video are noise. Put an SD1.5/SDXL checkpoint into "
    "ComfyUI's models/checkpoints (and an AnimateDiff motion module into models/animatediff_models) "
    "for real results."
)
# In the names of what tiny models made (the LoRA, images, video), so no file passes for a real result.
TINY_MARK = "tiny_random"
# Training, generation and video settings with tiny models: minutes on a CPU.
TINY_TRAIN = {
    "steps": 4,
    "rank": 4,
    "resolution": 64,
    "memory_profile": "off",
    "overrides": json.dumps(
        {
            "sample_steps": 2,
            "sample_size": 64,
            "mixed_precision": "no",
            "bucket_step": 32,
            "min_bucket": 32,
            "sample_every": 0,
        }
    ),
}

Say = Callable[[str], None]


@dataclass
class PipelineOptions:
    photos: Path
    out: Path = Path("out")
    character: str = "my_character"
    trigger: str | None = None  # default: the character's name (one word)
    class_tokens: str = "person"
    face_check: bool = True  # off for drawn / non-human characters: no face rules, CLIP picks the best image
    server: str | None = None
    base_model: str | None = None  # a checkpoint name on the server; default: the first one
    tiny: bool = False  # use tiny random models even when real ones exist
    candidates: int = 4
    port: int | None = None  # port for a ComfyUI the pipeline starts
    install: bool = True  # allow installing ComfyUI with comfy-cli when none is found
    progress: str = "auto"
    stage_timeout: float | None = None
    #: reach the server only over HTTP: photos go up, results come home (docs/remote.md); on by itself for a
    #: server that is not on this machine
    remote: bool = False
    #: a model manifest checked against the server before the first stage (missing models named)
    models_manifest: Path | None = None
    #: let the server download the manifest's missing models from their URLs
    provision: bool = False
    #: train the LoRA on this Replicate trainer (replicate:OWNER/MODEL) into `destination` (recipes/train_stage.py)
    train_on: str | None = None
    destination: str | None = None
    replicate: Any = None  # its resolved ReplicateSettings (the CLI resolves them; else from train_on)

    def __post_init__(self) -> None:
        if not self.trigger:
            self.trigger = default_trigger(self.character)


def default_trigger(character: str) -> str:
    """The trigger word a character gets when none is given: its name as one lower-case word."""
    return re.sub(r"\W+", "_", character.strip().lower()).strip("_") or "my_character"


@dataclass
class Server:
    url: str
    local: LocalComfyUI | None = None  # started by us (stopped at the end)
    base_dir: Path | None = None  # our base directory (models we may write into)
    comfy_dir: Path | None = None
    started_note: str = ""
    pod: PodSession | None = None  # a RunPod pod brought up for this run (stopped/terminated per its profile)


@dataclass
class Models:
    tiny: bool
    checkpoint: str  # for ComfyUI's CheckpointLoaderSimple
    train_base: str  # for CharForge's Train LoRA / Load Video Model
    arch: str  # sd15 / sdxl
    tagger: str  # "" = the first tagger in models/wd14_tagger
    clip: str | None
    motion: str | None
    faces: bool  # identity scoring (InsightFace pack installed and face checks on)
    notes: list[str] = field(default_factory=list)


class PipelineError(DriverError):
    exit_code = 1


# ------------------------------------------------------------------------------------------------------------
# Finding or starting ComfyUI
# ------------------------------------------------------------------------------------------------------------


def _charforge_ready(url: str) -> tuple[bool, bool]:
    """(has CharForge's nodes, has a base checkpoint and a CLIP model for scores) for the server at `url`."""
    try:
        with ComfyClient(resolve_server(url)) as client:
            info = client.object_info()
    except DriverError:
        return False, False
    models = bool(_choices(info, "CheckpointLoaderSimple", "ckpt_name")) and bool(
        _choices(info, "CharForgeLoadClip", "model")
    )
    return "CharForgeTrainLoRA" in info, models


def _choices(info: dict[str, Any], class_type: str, name: str) -> list[str]:
    entry = info.get(class_type) or {}
    for section in ("required", "optional"):
        spec = ((entry.get("input") or {}).get(section) or {}).get(name)
        if spec and isinstance(spec[0], list):
            return [c for c in spec[0] if isinstance(c, str) and not c.startswith("(")]
    return []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _online(host: str = "pypi.org", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _install_with_comfy_cli(out: Path, say: Say) -> Path:
    """Install ComfyUI with comfy-cli into ``out/ComfyUI`` (online only) and return its folder."""
    comfy = shutil.which("comfy")
    target = (out / "ComfyUI").resolve()
    if (target / "main.py").is_file():
        return target
    if comfy is None or not _online():
        raise ServerUnavailable(
            "no ComfyUI found: nothing answers on http://127.0.0.1:8188 and COMFYUI_DIR is not set"
            + ("" if comfy else ", and comfy-cli is not installed")
            + ("" if _online() else " (and this machine is offline, so nothing can be installed)")
            + ".\n"
            "Do one of these, then run the command again:\n"
            "  - point COMFYUI_DIR at a ComfyUI checkout (its Python: COMFYUI_PYTHON or a venv inside it);\n"
            "  - start ComfyUI yourself (python main.py) so it answers on 127.0.0.1:8188, or pass --server URL;\n"
            "  - pip install comfy-cli while online: the pipeline then installs ComfyUI into out/ComfyUI.\n"
            "In every case install CharForge into it: python install.py --comfyui /path/to/ComfyUI"
        )
    gpu = shutil.which("nvidia-smi") is not None
    command = [
        comfy,
        "--skip-prompt",
        "--workspace",
        str(target),
        "install",
        "--skip-manager",
        "--nvidia" if gpu else "--cpu",
    ]
    say(
        "installing ComfyUI with comfy-cli into "
        + str(target)
        + " (downloads ComfyUI and PyTorch"
        + (" for NVIDIA" if gpu else ", CPU build")
        + "; several minutes): "
        + " ".join(command)
    )
    subprocess.run(command, check=True)
    # comfy-cli installs ComfyUI's packages into the Python that runs comfy-cli (unless it made a venv inside).
    shebang = Path(comfy).read_text(errors="replace").splitlines()[0] if Path(comfy).is_file() else ""
    if shebang.startswith("#!") and not any((target / v).is_dir() for v in ("venv", ".venv")):
        os.environ.setdefault("COMFYUI_PYTHON", shebang[2:].strip().split()[0])
    return target


def install_pack(comfy_dir: Path, base_dir: Path, python: str, say: Say) -> None:
    """install.py into the base directory: the pack linked into its custom_nodes, the missing requirements
    installed into ComfyUI's Python (satisfied ones are skipped, so a rerun is quick and works offline)."""
    command = [
        sys.executable,
        str(REPO_ROOT / "install.py"),
        "--comfyui",
        str(comfy_dir),
        "--base-directory",
        str(base_dir),
        "--python",
        python,
    ]
    say("installing CharForge into it: " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(
            "install.py failed:\n" + "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        )


def extra_model_paths(models: Path) -> str:
    """The extra_model_paths.yaml that shows a ComfyUI every model folder CharForge uses in `models` (a ComfyUI
    install's models folder): ComfyUI's own and the pack's, from the one table in charforge.common.model_folders."""
    lines = ["comfyui_install:", f"  base_path: {json.dumps(str(models))}"]
    for key, names in all_model_folders().items():
        if len(names) == 1:
            lines.append(f"  {key}: {names[0]}/")
        else:  # a key ComfyUI fills from several folders (text_encoders: text_encoders/ and clip/)
            lines += [f"  {key}: |", *(f"    {name}/" for name in names)]
    return "\n".join(lines) + "\n"


def start_own_server(comfy_dir: Path, out: Path, say: Say, port: int | None = None) -> Server:
    """Start ComfyUI from `comfy_dir` with ``out/comfyui`` as its base directory (the pack linked into it, the
    ComfyUI folder's own models still found through extra_model_paths)."""
    base = (out / "comfyui").resolve()
    (base / "user").mkdir(parents=True, exist_ok=True)
    (base / "models").mkdir(parents=True, exist_ok=True)
    install_pack(comfy_dir, base, find_python(comfy_dir), say)
    extra = base / "extra_model_paths.yaml"
    extra.write_text(extra_model_paths((comfy_dir / "models").resolve()), encoding="utf-8")
    args = [
        "--base-directory",
        str(base),
        "--extra-model-paths-config",
        str(extra),
        "--database-url",
        f"sqlite:///{base / 'user' / 'comfyui.db'}",
    ]
    if shutil.which("nvidia-smi") is None:
        args.append("--cpu")
    server = LocalComfyUI(
        comfy_dir, port=port or _free_port(), extra_args=args, log_path=base / "comfyui.log"
    )
    say(f"starting ComfyUI from {comfy_dir} on {server.url} (base directory {base}, log {server.log_path})")
    url = server.start(timeout=300)
    return Server(url, server, base, comfy_dir, f"started by the pipeline from {comfy_dir}")


def _bring_up_pod(settings: RunPodSettings, opts: PipelineOptions, say: Say) -> Server:
    """A RunPod pod for the run: created or started per the profile and waited for; the run is remote."""
    if settings.kind != "pod":
        raise ConfigError(
            f"{opts.server} is a serverless endpoint: it returns images only and has no file routes; "
            "run the pipeline on a pod (runpod-pod:ID, or a profile with runpod: {pod: ...})"
        )
    session = PodSession(settings, on_message=say)

    async def start() -> str:
        try:
            return await session.start()
        finally:
            await session.close_api()  # the session is finished from another event loop

    try:
        url = asyncio.run(start())
    except BaseException:
        _finish_pod(session, say)
        raise
    opts.remote = True
    return Server(url.rstrip("/"), pod=session, started_note=f"RunPod pod {session.pod_id}")


def _finish_pod(session: PodSession, say: Say) -> dict[str, Any]:
    """Stop, terminate or keep the pod (its profile's on_finish) and price its time."""
    action = asyncio.run(session.finish())
    seconds, cost = session.wall_seconds(), session.cost()
    record = {
        "id": session.pod_id,
        "finish": action,
        "seconds": round(seconds or 0.0, 1),
        "price_per_hour": session.price_per_hour,
        "cost_usd": None if cost is None else round(cost, 4),
    }
    if cost is not None:
        say(
            f"pod {session.pod_id}: {seconds:.0f} s at ${session.price_per_hour:.3f}/h = ${cost:.4f} "
            f"(boot and idle included); {action}"
        )
    return record


def acquire_server(opts: PipelineOptions, say: Say, env: dict[str, str] | None = None) -> Server:
    env = dict(os.environ if env is None else env)
    if opts.server:
        pod = resolve_runpod(opts.server)
        if pod is not None:
            return _bring_up_pod(pod, opts, say)
        url = str(resolve_server(opts.server).url).rstrip("/")
        # a server on this machine is probed here; a remote one (auth, proxies) answers the client's first call
        if is_loopback(urlsplit(url).netloc) and not probe(url):
            raise ServerUnavailable(f"{opts.server} does not answer")
        return Server(url)
    if probe(DEFAULT_LOCAL_URL):
        nodes, checkpoints = _charforge_ready(DEFAULT_LOCAL_URL)
        if nodes and (checkpoints or not env.get("COMFYUI_DIR")) and not opts.tiny:
            say(f"using the ComfyUI on {DEFAULT_LOCAL_URL}")
            return Server(DEFAULT_LOCAL_URL)
        why = (
            "has no CharForge nodes"
            if not nodes
            else "has no base checkpoint or no CLIP model (clip_vision)"
            if not checkpoints
            else "cannot take the tiny models (--tiny)"
        )
        if env.get("COMFYUI_DIR"):
            say(f"the ComfyUI on {DEFAULT_LOCAL_URL} {why}; starting a separate one from COMFYUI_DIR")
        else:
            raise ServerUnavailable(
                f"the ComfyUI on {DEFAULT_LOCAL_URL} {why}; install CharForge into it "
                "(python install.py --comfyui /path/to/ComfyUI) and restart it, or set "
                "COMFYUI_DIR so the pipeline starts its own"
            )
    comfy_dir = env.get("COMFYUI_DIR")
    if comfy_dir:
        path = Path(comfy_dir).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise ConfigError(f"COMFYUI_DIR={path} does not contain ComfyUI's main.py")
    elif opts.install:
        path = _install_with_comfy_cli(opts.out, say)
    else:
        raise ServerUnavailable("no ComfyUI answers on 127.0.0.1:8188 and COMFYUI_DIR is not set")
    if not env.get("COMFYUI_PYTHON"):
        os.environ.setdefault("COMFYUI_PYTHON", find_python(path, env))
    return start_own_server(path, opts.out, say, port=opts.port)


# ------------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------------


def _model_dirs(server: Server, kind: str) -> list[Path]:
    dirs = []
    if server.base_dir is not None:
        dirs.append(server.base_dir / "models" / kind)
    if server.comfy_dir is not None:
        dirs.append(server.comfy_dir / "models" / kind)
    return [d for d in dirs if d.is_dir()]


def _has_tagger(server: Server) -> bool:
    return any(
        any(f.with_suffix(".csv").is_file() for f in d.glob("*.onnx"))
        for d in _model_dirs(server, "wd14_tagger")
    )


def _has_face_pack(server: Server) -> bool:
    return any((d / "models" / "buffalo_l").is_dir() for d in _model_dirs(server, "insightface"))


def checkpoint_arch(server: Server, checkpoint: str) -> str:
    """``sd15`` or ``sdxl`` for a checkpoint the server lists: from its tensor names when the file is local
    (the safetensors header only, no torch; SDXL has a second text encoder, ``conditioner.embedders.1``), else
    from its name (many SDXL fine-tunes have "xl" in it; Pony and others do not, hence the header first)."""
    for folder in _model_dirs(server, "checkpoints"):
        path = folder / checkpoint
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            continue
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                keys = json.loads(f.read(size)) if 0 < size < 200_000_000 else {}
        except (OSError, ValueError):
            continue
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            return "sdxl"
        if any(k.startswith("model.diffusion_model.") for k in keys):
            return "sd15"
    return "sdxl" if re.search(r"xl", checkpoint, re.IGNORECASE) else "sd15"


def _tiny_listed(info: dict[str, Any], part: str) -> bool:
    """Whether the server's choices already hold the tiny model `part` (engine/tiny.py names)."""
    from charforge.engine import tiny

    where = {
        "sd15": ("CheckpointLoaderSimple", "ckpt_name", tiny.CHECKPOINT),
        "motion": ("CharForgeLoadVideoModel", "motion_module", tiny.MOTION_MODULE),
        "clip": ("CharForgeLoadClip", "model", tiny.CLIP_FOLDER),
    }.get(part)
    return where is not None and where[2] in _choices(info, where[0], where[1])


def choose_models(client: ComfyClient, server: Server, opts: PipelineOptions, say: Say) -> Models:
    """Real models where the server has them; tiny ones (written into our base directory) where it has none."""
    from charforge.engine import tiny

    info = client.object_info(refresh=True)
    checkpoints = [
        c for c in _choices(info, "CheckpointLoaderSimple", "ckpt_name") if not c.startswith(tiny.TINY_PREFIX)
    ]
    use_tiny = opts.tiny or not checkpoints
    need: list[str] = []
    notes: list[str] = []
    if use_tiny:
        need += ["sd15", "motion"]
    # A server we did not start says itself what is missing (its Caption node), except in the demo: the tiny
    # tagger is written there with the other tiny models.
    local_without_tagger = server.base_dir is not None and not _has_tagger(server)
    if local_without_tagger or (server.base_dir is None and use_tiny):
        need.append("tagger")
    clips = [c for c in _choices(info, "CharForgeLoadClip", "model") if not c.startswith(tiny.TINY_PREFIX)]
    if not clips:
        need.append("clip")
    if need and server.base_dir is None:  # a server reached over HTTP: it writes the tiny models itself
        missing = [part for part in need if not _tiny_listed(info, part)]
        if missing:
            say(f"writing tiny random models ({', '.join(missing)}) on {server.url} - a minute or two")
            try:
                call(client, provision_tiny, missing)
            except DriverError as exc:
                raise PipelineError(
                    f"the server {server.url} lacks {', '.join(missing)} models and could not write "
                    f"the tiny ones ({exc}): install them, or update CharForge on it"
                ) from None
            info = client.object_info(refresh=True)
    elif need and server.base_dir is not None:
        fresh = [part for part in need if part not in tiny.written_parts(server.base_dir / "models")]
        if fresh:
            say(
                "writing tiny random models ("
                + ", ".join(fresh)
                + ") into "
                + str(server.base_dir / "models")
                + " - a minute or two"
            )
        tiny.write_tiny_models(server.base_dir / "models", parts=need, say=say)
        info = client.object_info(refresh=True)
    if "tagger" in need and not use_tiny:
        notes.append("captions come from a tiny random tagger (no WD14 tagger in models/wd14_tagger)")
    if "clip" in need and not use_tiny:
        notes.append("CLIP scores come from a tiny random CLIP (no CLIP folder in models/clip_vision)")
    tagger = tiny.TAGGER if "tagger" in need else ""
    clip = tiny.CLIP_FOLDER if "clip" in need else clips[0]
    if use_tiny:
        return Models(
            True,
            tiny.CHECKPOINT,
            f"[diffusers] {tiny.DIFFUSERS}",
            "sd15",
            tagger,
            clip,
            tiny.MOTION_MODULE,
            faces=False,
            notes=notes,
        )
    checkpoint = opts.base_model or checkpoints[0]
    if checkpoint not in checkpoints:
        raise PipelineError(
            f"base model {checkpoint!r} is not among the server's checkpoints: {', '.join(checkpoints)}"
        )
    arch = checkpoint_arch(server, checkpoint)
    motions = [
        m
        for m in _choices(info, "CharForgeLoadVideoModel", "motion_module")
        if not m.startswith(tiny.TINY_PREFIX) and ("xl" in m.lower()) == (arch == "sdxl")
    ]
    if not motions:
        notes.append(
            "no AnimateDiff motion module for this base model in models/animatediff_models: the video "
            "stage is skipped"
        )
    faces = opts.face_check and _has_face_pack(server)
    if opts.face_check and not faces:
        notes.append(
            "no InsightFace pack (models/insightface/models/buffalo_l): images are picked by CLIP score, "
            "not by identity, and the video has no identity-drift check"
        )
    return Models(
        False, checkpoint, checkpoint, arch, tagger, clip, motions[0] if motions else None, faces, notes
    )


# ------------------------------------------------------------------------------------------------------------
# Running one stage workflow
# ------------------------------------------------------------------------------------------------------------


def load_stage_workflow(name: str) -> dict[str, Any]:
    path = WORKFLOWS / f"{name}.json"
    if not path.is_file():
        raise ConfigError(
            f"{path} not found: charforge pipeline runs from a checkout of the CharForge repository"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _texts(result) -> dict[str, str]:
    """Each node's UI text, joined."""
    out = {}
    for values in result.values:
        text = values.values.get("text")
        if text:
            out[values.node_id] = "\n".join(str(t) for t in text)
    return out


class Runner:
    """Submits stage workflows to one server, shows their progress, downloads their outputs."""

    #: the server's files over HTTP when the pipeline runs remotely (recipes/remote.py)
    remote: RemoteFiles | None = None

    def __init__(self, client: ComfyClient, opts: PipelineOptions, say: Say, stderr: IO[str] | None = None):
        self.client = client
        self.opts = opts
        self.say = say
        self.stderr = stderr or sys.stderr

    def run(
        self, prompt: dict[str, Any], out_dir: Path | None, previews: str | None = None
    ) -> tuple[Any, dict[str, str], list[Path]]:
        """Run one stage workflow; its saved files land flat in `out_dir` (none when it is None).

        ComfyUI's temporary previews (Preview Image and the nodes' own previews) mostly show what is saved
        anyway: they are left on the server, unless `previews` names them (``score_table`` -> score_table.png)."""
        info = self.client.object_info(refresh=True)  # earlier stages add files (the LoRA) to the choices
        prepared = self.client.prepare_run(prompt, preflight=True, upload=False)
        view = JobView(prepared.prompt, nodes_to_run(prepared.prompt, info))
        renderer = make_renderer(self.opts.progress, view, stderr=self.stderr)
        job = self.client.submit(prepared.workflow)
        renderer.start()
        watch = self.client.watch(job, timeout=self.opts.stage_timeout)
        try:
            for event in watch:
                renderer.handle(event)
        except KeyboardInterrupt:
            renderer.close()
            self.say(f"cancelling job {job.prompt_id} ...")
            self.client.cancel(job.prompt_id)
            raise
        finally:
            renderer.close()
        result = watch.result
        files = self.collect(result, out_dir, previews) if out_dir is not None else []
        return result, _texts(result), files

    def collect(self, result: Any, out_dir: Path, previews: str | None = None) -> list[Path]:
        """Download a finished job's files into `out_dir`, flat (see :meth:`run`); returns their paths."""
        staging = out_dir / ".download"
        shutil.rmtree(staging, ignore_errors=True)
        downloads = self.client.download_outputs(result, staging, include_temp=previews is not None)
        files = [
            _place(d.path, out_dir, f"{previews}{d.path.suffix}" if d.source.type == "temp" else None)
            for d in downloads
        ]
        shutil.rmtree(staging, ignore_errors=True)
        return files


def _place(path: Path, folder: Path, name: str | None = None) -> Path:
    """Move a downloaded file into `folder` (flat) under its own name or `name`; a taken name gets -1, -2..."""
    target = folder / (name or path.name)
    number = 1
    while target.exists():
        target = folder / f"{Path(name or path.name).stem}-{number}{path.suffix}"
        number += 1
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.move(str(path), str(target)))


# ------------------------------------------------------------------------------------------------------------
# The stages
# ------------------------------------------------------------------------------------------------------------


def _match(pattern: str, text: str, what: str) -> str:
    found = re.search(pattern, text)
    if not found:
        raise PipelineError(f"could not find {what} in the node's message: {text[:300]}")
    return found.group(1).strip()


def stage_dataset(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    prompt = load_stage_workflow("dataset_prep")
    remote = _remote(runner)
    photos = remote.upload_photos(opts.photos, opts.character) if remote else str(opts.photos.resolve())
    prompt["1"]["inputs"].update(folder=photos, name=opts.character)
    if not opts.face_check:
        prompt["2"]["inputs"]["face_detector"] = "none"
        prompt["3"]["inputs"]["require_face"] = False
    prompt["5"]["inputs"]["buckets"] = models.arch
    prompt["6"]["inputs"].update(trigger=opts.trigger, class_tokens=opts.class_tokens, export_name="kohya")
    prompt["7"]["inputs"]["trigger"] = opts.trigger
    _, texts, files = runner.run(prompt, opts.out / "dataset" / "selection")
    subject = _match(r"exported to (.+?) \(\d+ written", texts.get("6", ""), "the export folder")
    report = _match(r"report: (\S+report\.html)", texts.get("7", ""), "the report")
    accepted = int(_match(r"^(\d+) image\(s\) exported", texts.get("6", ""), "the number of photos"))
    if accepted == 0:
        raise PipelineError(
            "no photo passed the dataset filters: "
            + texts.get("7", "")
            + (" (drawn or non-human characters: pass --no-face-check)" if opts.face_check else "")
        )
    return {
        "train_data_dir": str(Path(subject).parent),
        "accepted": accepted,
        "report_html": _copy_report(report, opts.out / "dataset" / "selection", remote),
        "server_report_html": report,
        "contact_sheets": [str(f) for f in files],
        "summary": texts.get("7", ""),
    }


def _remote(runner: Any) -> RemoteFiles | None:
    return getattr(runner, "remote", None)


def _copy_report(report_html: str, folder: Path, remote: RemoteFiles | None = None) -> str:
    """Copy a Dataset Report's report.html and report.json (its contact sheets are downloaded next to them, the
    names it links to) into `folder`; returns the copy's path, or the server's path when it is not local."""
    if remote is not None:
        source = remote.local(report_html)
        report_html = str(source)
    source = Path(report_html)
    if not source.is_file():
        return report_html
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("report.html", "report.json", *(p.name for p in source.parent.glob("contact_sheet_*.png"))):
        if (source.parent / name).is_file():
            shutil.copy2(source.parent / name, folder / name)
    return str(folder / "report.html")


def _manifest_entries(export_dir: Path) -> list[dict[str, Any]]:
    """The entries of a kohya export's manifest.json (``[]`` when there is none)."""
    try:
        return json.loads((export_dir / "manifest.json").read_text(encoding="utf-8")).get("entries") or []
    except (OSError, ValueError, AttributeError):
        return []


def caption_names(
    captioned_export: Path, first_export: Path, to_local: Callable[[str], Path] | None = None
) -> dict[Path, str]:
    """Each caption file of the captioned export -> the name of the photo it belongs to (``pip_11.txt``).

    The chain renumbers files: the dataset stage exports the photos as 0001.jpg, ... and the caption stage loads
    that export as a new dataset and exports it again, numbered anew. The two exports' manifests lead back:
    a captioned file's source is a file of the first export, whose source is the photo. `to_local` maps a
    server path in a manifest to its downloaded twin (remote runs)."""
    photo_of = {
        str((first_export / e["file"]).resolve()): e.get("source")
        for e in _manifest_entries(first_export)
        if e.get("file")
    }
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for entry in _manifest_entries(captioned_export):
        if not entry.get("file"):
            continue
        caption = (captioned_export / entry["file"]).with_suffix(".txt")
        source = entry.get("source") or ""
        photo = photo_of.get(str(Path(_twin(to_local, source)).resolve())) or source
        stem = Path(photo).stem or caption.stem
        name = stem if stem not in taken else f"{stem}_{entry.get('id', len(taken))}"
        taken.add(name)
        names[caption] = f"{name}.txt"
    return names


def _twin(to_local: Callable[[str], Path] | None, source: str) -> str:
    if to_local is None or not source:
        return source
    try:
        return str(to_local(source))
    except DriverError:
        return source


def stage_captions(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    prompt = load_stage_workflow("caption_dataset")
    prompt["1"]["inputs"].update(
        folder=state["dataset"]["train_data_dir"], name=f"{opts.character}_captioned"
    )
    prompt["2"]["inputs"].update(
        backend="wd14", model=models.tagger, trigger=opts.trigger, class_tokens=opts.class_tokens
    )
    prompt["3"]["inputs"].update(
        trigger=opts.trigger, class_tokens=opts.class_tokens, export_name="captioned"
    )
    prompt["4"]["inputs"]["trigger"] = opts.trigger
    _, texts, _ = runner.run(prompt, None)
    subject = _match(r"exported to (.+?) \(\d+ written", texts.get("3", ""), "the export folder")
    remote = _remote(runner)
    export = remote.local(subject) if remote else Path(subject)  # remote: the dataset folders come home
    first = (
        remote.local(state["dataset"]["train_data_dir"])
        if remote
        else Path(state["dataset"]["train_data_dir"])
    )
    captions = sorted(export.glob("*.txt"))
    names = caption_names(export.parent.parent, first.parent, remote.twin if remote else None)
    target = opts.out / "captions"
    shutil.rmtree(target, ignore_errors=True)  # a rerun must not leave the names of an earlier run
    target.mkdir(parents=True)
    for caption in captions:
        shutil.copy2(caption, target / names.get(caption, caption.name))
    report = _match(r"report: (\S+report\.html)", texts.get("4", ""), "the report")
    return {
        "train_data_dir": str(Path(subject).parent),
        "captions_dir": str(target),
        "count": len(captions),
        "report_html": _copy_report(report, opts.out / "dataset", remote),
        "server_report_html": report,
        "summary": texts.get("2", ""),
    }


def stage_lora(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    if opts.train_on:  # on a hosted Replicate trainer instead of the server
        from .train_stage import stage_lora_replicate

        return stage_lora_replicate(runner, opts, models, state)
    prompt = load_stage_workflow("train_lora_sdxl" if models.arch == "sdxl" else "train_lora_sd15")
    inputs = prompt["1"]["inputs"]
    inputs.update(
        base_model=models.train_base,
        dataset_folder=state["captions"]["train_data_dir"],
        trigger_word=opts.trigger,
        output_name=_marked(opts.character, models, suffix=True),
    )
    if models.tiny:
        inputs.update(TINY_TRAIN)
    _, texts, files = runner.run(prompt, opts.out / "lora")
    summary = texts.get("1", "")
    trained = parse_train_summary(
        summary
    )  # the same reading as `charforge batch run`'s (driver/sync/training.py)
    if trained is None:
        raise PipelineError(
            f"could not find the LoRA's name and run folder in the node's message: {summary[:300]}"
        )
    lora_name, run_dir = trained.lora, trained.run_dir
    remote = _remote(runner)
    if (
        remote is not None
    ):  # the LoRA (checked against the server's sha256) and the whole run folder come home
        home = remote.fetch_lora(lora_name, opts.out / "lora")
        run_files = remote.fetch(run_dir, opts.out / "lora" / "run")
        return {
            "lora_name": lora_name,
            "lora_path": home["path"],
            "lora_sha256": home["sha256"],
            "run_dir": run_dir,
            "run_copy": str(opts.out / "lora" / "run"),
            "run_files": len(run_files),
            "summary": summary,
            "files": [str(f) for f in files],
        }
    lora_path = None
    for folder in runner_server_models(runner) or []:
        candidate = folder / "loras" / lora_name
        if candidate.is_file():
            lora_path = candidate
            target = opts.out / "lora" / lora_name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(candidate, target)
            lora_path = target
    return {
        "lora_name": lora_name,
        "lora_path": str(lora_path) if lora_path else f"models/loras/{lora_name} on the server",
        "run_dir": run_dir,
        "summary": summary,
        "files": [str(f) for f in files],
    }


def runner_server_models(runner: Runner) -> list[Path]:
    server: Server | None = getattr(runner, "server", None)
    if server is None:
        return []
    return [
        p
        for p in ([server.base_dir / "models"] if server.base_dir else [])
        + ([server.comfy_dir / "models"] if server.comfy_dir else [])
        if p.is_dir()
    ]


def _marked(name: str, models: Models, suffix: bool = False) -> str:
    """`name` with :data:`TINY_MARK` (before it, or after it with `suffix`) when tiny models made the file."""
    if not models.tiny:
        return name
    return f"{name}_{TINY_MARK}" if suffix else f"{TINY_MARK}_{name}"


def _prefix(opts: PipelineOptions, models: Models, kind: str) -> str:
    """A SaveImage / Save Video filename_prefix: the character's folder under ComfyUI's output folder."""
    return f"charforge/{opts.character}/{_marked(kind, models)}"


def _positive(opts: PipelineOptions) -> str:
    return (
        f"photo of {opts.trigger} {opts.class_tokens}, head and shoulders portrait, looking at the camera, "
        "natural light, sharp focus"
    )


def stage_images(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    lora = state["lora"]["lora_name"]
    size = 128 if models.tiny else (1024 if models.arch == "sdxl" else 512)
    steps = 4 if models.tiny else 25
    if models.faces:
        identity = load_stage_workflow("build_identity")
        identity["2"]["inputs"].update(name=opts.character, folder=state["captions"]["train_data_dir"])
        runner.run(identity, opts.out / "images" / "identity", previews="identity_table")
        prompt = load_stage_workflow("score_best_of_n")
        prompt["9"]["inputs"]["name"] = opts.character
        prompt["11"]["inputs"]["group_size"] = opts.candidates
        prompt["13"]["inputs"]["filename_prefix"] = _prefix(opts, models, "best")
        report_node, score_node = "11", "10"
    else:
        prompt = load_stage_workflow("generate_best_of_n_clip")
        prompt["9"]["inputs"]["model"] = models.clip
        prompt["10"]["inputs"]["prompt"] = _positive(opts).replace(f"{opts.trigger} ", "")
        prompt["11"]["inputs"]["group_size"] = opts.candidates
        prompt["8"]["inputs"]["filename_prefix"] = _prefix(opts, models, "candidate")
        prompt["12"]["inputs"]["filename_prefix"] = _prefix(opts, models, "best")
        report_node, score_node = "11", "10"
    prompt["1"]["inputs"]["ckpt_name"] = models.checkpoint
    prompt["2"]["inputs"]["lora_name"] = lora
    prompt["3"]["inputs"]["text"] = _positive(opts)
    prompt["5"]["inputs"].update(width=size, height=size, batch_size=opts.candidates)
    prompt["6"]["inputs"].update(steps=steps)
    _, texts, files = runner.run(prompt, opts.out / "images", previews="score_table")
    scores = opts.out / "images" / "scores.txt"
    scores.parent.mkdir(parents=True, exist_ok=True)
    scores.write_text(
        f"scored by {'identity (InsightFace)' if models.faces else 'CLIP score'}\n\n"
        + texts.get(score_node, "")
        + "\n\n"
        + texts.get(report_node, "")
        + "\n",
        encoding="utf-8",
    )
    return {
        "files": [str(f) for f in files],
        "scores": str(scores),
        "by": "identity" if models.faces else "clip",
    }


def stage_video(
    runner: Runner, opts: PipelineOptions, models: Models, state: dict[str, Any]
) -> dict[str, Any]:
    if models.motion is None:
        return {"skipped": "no motion module"}
    prompt = load_stage_workflow("video_animatediff")
    prompt["1"]["inputs"].update(base_model=models.train_base, motion_module=models.motion)
    prompt["2"]["inputs"]["lora_name"] = state["lora"]["lora_name"]
    prompt["3"]["inputs"]["prompt"] = (
        f"0: {_positive(opts)}\n8: {opts.trigger} {opts.class_tokens} smiling, turning the head"
    )
    if models.tiny:
        prompt["3"]["inputs"].update(
            frames=8, width=64, height=64, steps=2, context_length=8, context_overlap=2
        )
    else:
        prompt["3"]["inputs"].update(frames=16, context_length=16)
    prompt["4"]["inputs"]["filename_prefix"] = _prefix(opts, models, "video")
    if models.faces:
        prompt["6"]["inputs"]["name"] = opts.character
    else:  # no identity to compare with: drop the drift check
        for node_id in ("5", "6", "7", "8"):
            prompt.pop(node_id, None)
    _, texts, files = runner.run(
        prompt, opts.out / "video", previews="identity_drift" if models.faces else None
    )
    videos = [str(f) for f in files if f.suffix in (".mp4", ".webm", ".gif", ".webp")]
    return {
        "files": [str(f) for f in files],
        "video": videos[0] if videos else None,
        "drift": texts.get("7", "") if models.faces else "no identity (drift check skipped)",
    }


STAGE_FUNCTIONS = {
    "dataset": stage_dataset,
    "captions": stage_captions,
    "lora": stage_lora,
    "images": stage_images,
    "video": stage_video,
}
STAGE_TITLES = {
    "dataset": "dataset (load, analyse, filter, dedup, crop, export, report)",
    "captions": "captions (WD14 tagger on the exported dataset)",
    "lora": "LoRA training",
    "images": "images with the LoRA, best of N by score",
    "video": "AnimateDiff video with the LoRA",
}


# ------------------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------------------


def load_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    return {}


def save_state(out: Path, state: dict[str, Any]) -> None:
    path = out / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _settings(opts: PipelineOptions, models: Models) -> dict[str, Any]:
    return {
        "photos": str(opts.photos.resolve()),
        "character": opts.character,
        "trigger": opts.trigger,
        "class_tokens": opts.class_tokens,
        "face_check": opts.face_check,
        "tiny": models.tiny,
        "checkpoint": models.checkpoint,
    }


def summary_lines(state: dict[str, Any], out: Path) -> list[str]:
    def shown(path: str | Path | None) -> str:
        if not path:
            return "-"
        try:
            return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(path)

    stages = state.get("stages", {})
    lines = ["", "WHERE TO LOOK"]
    if state.get("tiny"):
        lines.append(
            f"  (tiny random models: the files are real, their content is noise; names carry '{TINY_MARK}', "
            f"see {shown(out / README_FILE)})"
        )
    d, c = stages.get("dataset", {}), stages.get("captions", {})
    lines.append(
        f"  dataset report : {shown(c.get('report_html'))}  (the dataset as trained: photos, captions, "
        "trigger word, buckets)"
    )
    lines.append(
        f"  photo selection: {shown(d.get('report_html'))}  ({d.get('accepted', '?')} photos kept, why the "
        "others were not, duplicates)"
    )
    lines.append(
        f"  captions       : {shown(c.get('captions_dir'))}/  ({c.get('count', '?')} .txt files named after "
        "the photos)"
    )
    lines.append(f"  training folder: {shown(c.get('train_data_dir'))}")
    lo = stages.get("lora", {})
    lines.append(
        f"  LoRA           : {shown(lo.get('lora_path'))}  (loss curve and samples next to it; run folder: "
        f"{shown(lo.get('run_dir'))})"
    )
    im = stages.get("images", {})
    lines.append(
        f"  scored images  : {shown(out / 'images')}/  (scores: {shown(im.get('scores'))}, picked by "
        f"{im.get('by', '?')})"
    )
    v = stages.get("video", {})
    lines.append(f"  video          : {shown(v.get('video')) if v.get('video') else v.get('skipped', '-')}")
    lines.append(
        f"  state          : {shown(out / STATE_FILE)} (a rerun skips finished stages; delete it to "
        "start over)"
    )
    pod = state.get("pod")
    if pod:
        cost = f"${pod['cost_usd']:.4f}" if pod.get("cost_usd") is not None else "price unknown"
        lines.append(
            f"  RunPod pod     : {pod['id']}: {pod.get('seconds', 0):.0f} s, {cost} (boot and idle included); "
            f"{pod.get('finish')}"
        )
    return lines


README_FILE = "README.txt"


def out_readme(state: dict[str, Any]) -> str:
    """The text of ``out/README.txt``: what each folder of a pipeline run holds."""
    settings = state.get("settings", {})
    character = settings.get("character", "<character>")
    text = []
    if state.get("tiny"):
        text += [
            "TINY RANDOM MODELS - THE PICTURES, CAPTIONS, LoRA AND VIDEO HERE ARE NOISE",
            "",
            "No base checkpoint was found, so this run used tiny randomly initialised models of the real",
            "architectures (in comfyui/models). Every stage ran for real, through ComfyUI's own loaders,",
            "but the tagger's captions are arbitrary tags, the LoRA learned nothing useful and the images and",
            f"video are noise. Files made by these models carry '{TINY_MARK}' in their names. Put an SD1.5 or",
            "SDXL checkpoint into ComfyUI's models/checkpoints (and an AnimateDiff motion module into",
            "models/animatediff_models) and run the command again for real results.",
            "",
        ]
    text += [
        f"CharForge pipeline output for '{character}' (trigger word '{settings.get('trigger', '?')}',",
        f"photos from {settings.get('photos', '?')}).",
        "",
        "dataset/      the dataset report (report.html, written after captioning: every photo trained on",
        "              with its caption, trigger word, buckets) and its contact sheets; selection/ holds",
        "              the report of the photo selection (which photos were kept, why the others were not)",
        "captions/     one caption per photo, named after it (trigger word first)",
        "lora/         the LoRA (.safetensors), its loss curve and training samples",
        "images/       the generated candidates, the best one(s), scores.txt and the score table",
        "video/        the AnimateDiff clip (.mp4); with face checks also identity_drift.png",
        "comfyui/      the ComfyUI base directory when the pipeline started its own ComfyUI (its output,",
        "              models, log); the datasets and the training run folder are in comfyui/output/charforge",
        f"{STATE_FILE}  what finished, with every path; a rerun skips finished stages",
        "",
    ]
    return "\n".join(text)


def write_out_readme(out: Path, state: dict[str, Any]) -> None:
    (out / README_FILE).write_text(out_readme(state), encoding="utf-8")


def run_pipeline(opts: PipelineOptions, say: Say, stderr: IO[str] | None = None) -> dict[str, Any]:
    """Run every stage that is not finished yet; returns the state (also written to ``out/pipeline_state.json``)."""
    if not opts.photos.is_dir():
        raise ConfigError(f"{opts.photos} is not a folder of photos")
    opts.out.mkdir(parents=True, exist_ok=True)
    opts.out = opts.out.resolve()
    state = load_state(opts.out)
    started = time.monotonic()
    server = acquire_server(opts, say)
    try:
        with ComfyClient(resolve_server(server.url)) as client:
            info = client.object_info()
            if "CharForgeTrainLoRA" not in info:
                raise PipelineError(
                    f"the ComfyUI at {server.url} has no CharForge nodes; install the pack into it: "
                    "python install.py --comfyui /path/to/ComfyUI"
                    + (f" (log: {server.local.log_path})" if server.local else "")
                )
            if opts.models_manifest is not None:  # before anything is queued: missing models are named
                ensure_models(client, load_model_manifest(opts.models_manifest), opts.provision)
            remote = None
            if opts.remote or not is_loopback(urlsplit(server.url).netloc):
                remote = RemoteFiles(client, opts.out, say)
                say(f"remote server {server.url}: photos go up, results come home (mirror: {remote.mirror})")
            models = choose_models(client, server, opts, say)
            if models.tiny:
                say(TINY_WARNING)
            for note in models.notes:
                say(f"note: {note}")
            settings = _settings(opts, models)
            if state.get("settings") and state["settings"] != settings:
                say("the settings differ from the previous run in this folder: running every stage again")
                state = {}
            state.update(settings=settings, tiny=models.tiny, server=server.url, remote=remote is not None)
            write_out_readme(opts.out, state)
            stages = state.setdefault("stages", {})
            runner = Runner(client, opts, say, stderr)
            runner.server = server  # type: ignore[attr-defined]
            runner.remote = remote
            for number, stage in enumerate(STAGES, 1):
                title = f"[{number}/{len(STAGES)}] {STAGE_TITLES[stage]}"
                if stages.get(stage, {}).get("done"):
                    say(f"{title}: finished in an earlier run, skipped")
                    continue
                say(f"{title} ...")
                t0 = time.monotonic()
                try:
                    result = STAGE_FUNCTIONS[stage](runner, opts, models, stages)
                except DriverError as exc:
                    raise PipelineError(f"stage '{stage}' failed: {exc}") from exc
                result.update(done=True, seconds=round(time.monotonic() - t0, 1))
                stages[stage] = result
                save_state(opts.out, state)
                write_out_readme(opts.out, state)
                say(f"{title}: done in {result['seconds']:.0f} s")
    finally:
        if server.local is not None:
            say("stopping the ComfyUI the pipeline started")
            server.local.stop()
        if server.pod is not None:
            state["pod"] = _finish_pod(server.pod, say)
    state["seconds"] = round(time.monotonic() - started, 1)
    save_state(opts.out, state)
    return state
