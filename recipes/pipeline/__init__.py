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

The package: :mod:`.options` (options, server, models, stage list), :mod:`.server` (finding or starting the
ComfyUI), :mod:`.models` (choosing the models), :mod:`.stages` (the stage runners), :mod:`.summary` (state file,
summary, README); :func:`run_pipeline` (here) runs them in order. Its public names are importable from here.
"""

from __future__ import annotations

import time
from typing import IO, Any
from urllib.parse import urlsplit

from charforge.common.transfer import load_model_manifest

from ...driver.client import ComfyClient
from ...driver.client.http import is_loopback
from ...driver.config import resolve_server
from ...driver.errors import ConfigError, DriverError
from ..remote import RemoteFiles, ensure_models
from .models import checkpoint_arch, choose_models
from .options import (
    REPO_ROOT,
    STAGES,
    STATE_FILE,
    TINY_MARK,
    TINY_TRAIN,
    TINY_WARNING,
    WORKFLOWS,
    Models,
    PipelineError,
    PipelineOptions,
    Say,
    Server,
    default_trigger,
)
from .server import _finish_pod, acquire_server, extra_model_paths, install_pack, start_own_server
from .stages import (
    STAGE_FUNCTIONS,
    STAGE_TITLES,
    Runner,
    caption_names,
    load_stage_workflow,
    runner_server_models,
    stage_captions,
    stage_dataset,
    stage_images,
    stage_lora,
    stage_video,
)
from .summary import (
    README_FILE,
    _settings,
    load_state,
    out_readme,
    save_state,
    summary_lines,
    write_out_readme,
)


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


__all__ = [
    "REPO_ROOT",
    "WORKFLOWS",
    "STAGES",
    "STATE_FILE",
    "TINY_WARNING",
    "TINY_MARK",
    "TINY_TRAIN",
    "Say",
    "PipelineOptions",
    "default_trigger",
    "Server",
    "Models",
    "PipelineError",
    "install_pack",
    "extra_model_paths",
    "start_own_server",
    "acquire_server",
    "checkpoint_arch",
    "choose_models",
    "load_stage_workflow",
    "Runner",
    "stage_dataset",
    "caption_names",
    "stage_captions",
    "stage_lora",
    "runner_server_models",
    "stage_images",
    "stage_video",
    "STAGE_FUNCTIONS",
    "STAGE_TITLES",
    "load_state",
    "save_state",
    "summary_lines",
    "README_FILE",
    "out_readme",
    "write_out_readme",
    "run_pipeline",
]
