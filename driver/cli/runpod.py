"""``charforge runpod ...`` commands, and RunPod server strings for ``charforge run/wait/status/cancel``.

Commands: ``runpod gpus`` (GPU types and prices), ``runpod pods`` (state, $/h, uptime), ``runpod pod
create|start|stop|terminate``, ``runpod endpoint status ENDPOINT_ID`` (workers and jobs).

``--server runpod-serverless:ENDPOINT_ID`` makes ``run``/``status``/``cancel`` talk to a serverless endpoint;
``--server runpod-pod:POD_ID`` (or a profile with a ``runpod:`` section) makes them wait until the pod's
ComfyUI answers (starting the pod, and stopping/terminating it afterwards, when the profile says so) before
doing what they do for any ComfyUI. :func:`register` installs this routing on the existing sub-commands.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..config import RunPodSettings, resolve_runpod
from ..errors import ConfigError
from .common import report_cancel
from .hosted import Command, finish_job, route_commands, run_job, run_main


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    """Add ``charforge runpod ...`` and route RunPod server strings of run/wait/status/cancel/validate."""
    runpod = sub.add_parser(
        "runpod",
        help="RunPod: GPU types and prices, pods, serverless endpoints",
        description="Manage RunPod pods and look at serverless endpoints. Needs RUNPOD_API_KEY "
        "(or runpod.api_key_env in the config file).",
    )
    rp = runpod.add_subparsers(dest="runpod_command", metavar="RUNPOD_COMMAND", required=True)

    gpus = rp.add_parser("gpus", parents=[server], help="GPU types with memory and price per hour")
    gpus.set_defaults(func=cmd_gpus)

    pods = rp.add_parser("pods", parents=[server], help="your pods: state, GPU, $/h, uptime")
    pods.set_defaults(func=cmd_pods)

    pod = rp.add_parser("pod", help="create, start, stop or terminate a pod")
    pod_sub = pod.add_subparsers(dest="pod_command", metavar="POD_COMMAND", required=True)
    create = pod_sub.add_parser("create", parents=[server], help="create (and start) a pod running ComfyUI")
    create.add_argument("--gpu", required=True, help="GPU type id, see 'charforge runpod gpus'")
    what = create.add_mutually_exclusive_group()
    what.add_argument("--image", help="container image (default: runpod/comfyui:latest)")
    what.add_argument("--template", help="a template id instead of an image")
    create.add_argument("--name", default="charforge")
    create.add_argument("--gpu-count", type=int, default=1)
    create.add_argument("--cloud", choices=["SECURE", "COMMUNITY"], default="SECURE")
    create.add_argument("--disk-gb", type=int, default=50)
    create.add_argument("--volume-gb", type=int)
    create.add_argument(
        "--tcp", action="store_true", help="also expose 8188/tcp (direct TCP, no proxy limits)"
    )
    create.set_defaults(func=cmd_pod_create)
    for action, text in (
        ("start", "start (resume) a stopped pod"),
        ("stop", "stop a pod (its volume is kept; stopped pods bill only storage)"),
        ("terminate", "terminate a pod (deleted for good)"),
    ):
        p = pod_sub.add_parser(action, parents=[server], help=text)
        p.add_argument("pod_id")
        p.set_defaults(func=cmd_pod_action, action=action)

    endpoint = rp.add_parser("endpoint", help="serverless endpoints")
    ep_sub = endpoint.add_subparsers(dest="endpoint_command", metavar="ENDPOINT_COMMAND", required=True)
    health = ep_sub.add_parser("status", parents=[server], help="workers and jobs of an endpoint (/health)")
    health.add_argument("endpoint_id")
    health.set_defaults(func=cmd_endpoint_status)

    route_commands(sub, resolve_runpod, _dispatch)


# ------------------------------------------------------------------------------------------------------------
# Routing of RunPod server strings
# ------------------------------------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> RunPodSettings | None:
    return resolve_runpod(
        getattr(args, "server", None),
        profile=getattr(args, "profile", None),
        config_path=getattr(args, "config", None),
    )


def _dispatch(
    name: str, original: Command, args: argparse.Namespace, settings: RunPodSettings, out: Any
) -> int:
    if settings.kind == "serverless":
        handler = {"run": serverless_run, "status": serverless_status, "cancel": serverless_cancel}.get(name)
        if handler is None:
            raise ConfigError(
                f"'charforge {name}' does not work with a serverless endpoint (no ComfyUI API "
                "there); use run, status or cancel"
            )
        return handler(args, settings, out)
    return pod_command(name, original, args, settings, out)


def pod_command(
    name: str, original: Command, args: argparse.Namespace, settings: RunPodSettings, out: Any
) -> int:
    """Run ``original`` against the pod's ComfyUI. For ``run`` the pod is brought up first (started when
    stopped, created when the profile says so) and stopped/terminated afterwards per ``on_finish``."""
    from ..runpod.pod import PodSession, pod_address

    async def address() -> str:
        from ..runpod.api import RunPodAPI

        if str(settings.options.get("connect", "proxy")) != "tcp" or not settings.api_key:
            return await pod_address(settings)
        async with RunPodAPI(settings.api_key, base_url=settings.api_url) as api:
            return await pod_address(settings, api=api)

    if name != "run":
        args.server = asyncio.run(address())
        return original(args, out)
    session = PodSession(settings, on_message=out.note)

    async def start() -> str:
        try:
            return await session.start()
        finally:
            await session.close_api()  # the next asyncio.run is another event loop

    try:
        args.server = asyncio.run(start())
        args.profile = None
        return original(args, out)
    finally:
        out.secrets = [*out.secrets, *settings.secrets()]  # connect() replaced the list with the server's
        if session.started_at is not None:
            asyncio.run(session.finish())
            cost = session.cost()
            if cost is not None:
                out.note(
                    f"pod {session.pod_id}: {session.wall_seconds():.0f} s at ${session.price_per_hour:.3f}/h "
                    f"= ${cost:.4f} (boot and idle included)"
                )


def serverless_run(args: argparse.Namespace, settings: RunPodSettings, out: Any) -> int:
    """``charforge run --server runpod-serverless:ID``: submit, follow /status, download the images."""
    from ..runpod.serverless import ServerlessTarget

    started = time.monotonic()
    target = ServerlessTarget(settings)
    target.training_home = True  # a trained LoRA comes home with the files (a batch runner does it itself)

    def submitted(job_id: str) -> None:
        out.note(
            f"submitted serverless job {job_id} (if this command dies, look it up with: charforge status "
            f"--server {settings.server} {job_id})"
        )
        if out.json:
            out.record("submitted", job_id=job_id, endpoint=settings.id)

    async def follow(job_id: str) -> int:
        timeout = args.timeout

        def on_status(status: Any) -> None:
            text = status.status
            if status.delay_ms is not None and status.status != "IN_QUEUE":
                text += f" (waited {status.delay_ms / 1000:.1f} s in the queue)"
            out.note(f"job {job_id}: {text}")

        result = await target.wait(job_id, timeout, on_status=on_status)
        return await finish_job(
            target,
            settings,
            result,
            job_id,
            args,
            out,
            started=started,
            workflow_source=str(args.workflow),
            service="runpod",
            service_fields={"job_id": job_id, "endpoint": settings.id},
            summary=lambda times: (
                f"done: job {job_id}, queue {times['queue_seconds'] or 0:.1f} s, ran "
                f"{times['execution_seconds'] or 0:.1f} s"
            ),
            nothing="the worker returned no images",
            id_field="job_id",
        )

    async def main() -> int:
        return await run_job(target, args, out, noun="job", submitted=submitted, follow=follow)

    return run_main(main)


def serverless_status(args: argparse.Namespace, settings: RunPodSettings, out: Any) -> int:
    from ..runpod.serverless import ServerlessClient

    async def main() -> int:
        client = ServerlessClient(settings.id, settings.api_key, base_url=settings.endpoint_url)
        try:
            if args.prompt_id:
                status = await client.status(args.prompt_id)
                detail = ""
                if status.delay_ms is not None:
                    detail += f", queue {status.delay_ms / 1000:.1f} s"
                if status.execution_ms is not None:
                    detail += f", ran {status.execution_ms / 1000:.1f} s"
                out.result(
                    f"job {args.prompt_id}: {status.status} ({status.state}{detail})",
                    job_id=args.prompt_id,
                    status=status.status,
                    state=status.state,
                    delay_ms=status.delay_ms,
                    execution_ms=status.execution_ms,
                )
                return 0 if status.status != "GONE" else 1
            return _print_health(settings.id, await client.health(), out)
        finally:
            await client.close()

    return asyncio.run(main())


def serverless_cancel(args: argparse.Namespace, settings: RunPodSettings, out: Any) -> int:
    from ..runpod.serverless import ServerlessTarget

    async def main() -> int:
        target = ServerlessTarget(settings)
        try:
            outcome = await target.cancel(args.prompt_id)
        finally:
            await target.close()
        texts = {
            "removed": "removed from the queue",
            "interrupted": "stopped while running",
            "not_active": "already finished (or unknown)",
        }
        return report_cancel(out, "job", args.prompt_id, outcome, texts)

    return asyncio.run(main())


def _print_health(endpoint_id: str, health: dict[str, Any], out: Any) -> int:
    jobs = health.get("jobs") or {}
    workers = health.get("workers") or {}
    text = (
        f"endpoint {endpoint_id}: workers {workers.get('running', 0)} running, {workers.get('idle', 0)} idle; "
        f"jobs {jobs.get('inQueue', 0)} queued, {jobs.get('inProgress', 0)} in progress, "
        f"{jobs.get('completed', 0)} completed, {jobs.get('failed', 0)} failed"
    )
    out.result(text, endpoint=endpoint_id, jobs=jobs, workers=workers)
    return 0


# ------------------------------------------------------------------------------------------------------------
# charforge runpod ...
# ------------------------------------------------------------------------------------------------------------


def _api_settings(args: argparse.Namespace) -> RunPodSettings:
    settings = _settings(args)
    if settings is None:  # no pod/endpoint named: only the key and URLs matter
        settings = resolve_runpod("runpod-pod:_", config_path=getattr(args, "config", None))
    assert settings is not None
    return settings


def _with_api(args: argparse.Namespace, out: Any, work: Callable[[Any], Any]) -> Any:
    from ..runpod.api import RunPodAPI

    settings = _api_settings(args)
    out.secrets = list(out.secrets) + settings.secrets()

    async def main() -> Any:
        async with RunPodAPI(settings.api_key, base_url=settings.api_url) as api:
            return await work(api)

    return asyncio.run(main())


def _table(rows: Sequence[tuple[str, ...]], heads: tuple[str, ...]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _money(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"${value:.{digits}f}"


def cmd_gpus(args: argparse.Namespace, out: Any) -> int:
    gpus = _with_api(args, out, lambda api: api.gpu_types())
    gpus.sort(key=lambda g: (g.hourly_price() is None, g.hourly_price() or 0.0))
    rows = [
        (
            g.id,
            g.display_name,
            f"{g.memory_gb:g} GB" if g.memory_gb else "-",
            _money(g.secure_price),
            _money(g.community_price),
        )
        for g in gpus
    ]
    out.result(
        _table(rows, ("ID", "NAME", "MEMORY", "SECURE $/H", "COMMUNITY $/H")),
        gpus=[
            {
                "id": g.id,
                "name": g.display_name,
                "memory_gb": g.memory_gb,
                "secure_price": g.secure_price,
                "community_price": g.community_price,
            }
            for g in gpus
        ],
    )
    return 0


def _uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def cmd_pods(args: argparse.Namespace, out: Any) -> int:
    pods = _with_api(args, out, lambda api: api.list_pods())
    now = time.time()
    rows = [
        (p.id, p.name, p.status, p.gpu_id or "-", _money(p.cost_per_hr, 3), _uptime(p.uptime(now)))
        for p in pods
    ]
    text = _table(rows, ("ID", "NAME", "STATE", "GPU", "$/H", "UPTIME")) if rows else "no pods"
    out.result(
        text,
        pods=[
            {
                "id": p.id,
                "name": p.name,
                "status": p.status,
                "gpu": p.gpu_id,
                "cost_per_hr": p.cost_per_hr,
                "uptime_seconds": p.uptime(now),
            }
            for p in pods
        ],
    )
    return 0


def cmd_pod_create(args: argparse.Namespace, out: Any) -> int:
    # A template brings its own ports; an image gets ComfyUI's and SSH.
    ports = (
        None
        if args.template and not args.tcp
        else ["8188/http", "22/tcp"] + (["8188/tcp"] if args.tcp else [])
    )
    image = args.image or (None if args.template else "runpod/comfyui:latest")
    pod = _with_api(
        args,
        out,
        lambda api: api.create_pod(
            name=args.name,
            gpu=args.gpu,
            image=image,
            template=args.template,
            gpu_count=args.gpu_count,
            cloud=args.cloud,
            disk_gb=args.disk_gb,
            volume_gb=args.volume_gb,
            ports=ports,
        ),
    )
    out.result(
        f"created pod {pod.id} ({pod.status}, {_money(pod.cost_per_hr, 3)}/h); use it with "
        f"--server runpod-pod:{pod.id}; it bills until stopped: charforge runpod pod stop {pod.id}",
        pod_id=pod.id,
        status=pod.status,
        cost_per_hr=pod.cost_per_hr,
    )
    return 0


def cmd_pod_action(args: argparse.Namespace, out: Any) -> int:
    _with_api(args, out, lambda api: api.pod_action(args.pod_id, args.action))
    done = {"start": "start requested", "stop": "stopped", "terminate": "terminated"}[args.action]
    out.result(f"pod {args.pod_id}: {done}", pod_id=args.pod_id, action=args.action)
    return 0


def cmd_endpoint_status(args: argparse.Namespace, out: Any) -> int:
    from ..runpod.serverless import ServerlessClient

    settings = _api_settings(args)
    out.secrets = list(out.secrets) + settings.secrets()

    async def main() -> dict[str, Any]:
        client = ServerlessClient(args.endpoint_id, settings.api_key, base_url=settings.endpoint_url)
        try:
            return await client.health()
        finally:
            await client.close()

    return _print_health(args.endpoint_id, asyncio.run(main()), out)


# ------------------------------------------------------------------------------------------------------------
# Batch integration (used by ``charforge batch run``)
# ------------------------------------------------------------------------------------------------------------


def batch_target(server: str | None, profile: str | None, args: argparse.Namespace, out: Any) -> Any | None:
    """The batch target for a RunPod ``--server``/``--profile`` of ``charforge batch run``, or None when it names
    an ordinary ComfyUI server. Pods get readiness, keepalive and their lifecycle; serverless endpoints the
    worker-comfyui transport."""
    from ..runpod import PodTarget, ServerlessTarget

    settings = resolve_runpod(server, profile=profile, config_path=getattr(args, "config", None))
    if settings is None:
        return None
    out.secrets = [*out.secrets, *settings.secrets()]
    window = getattr(args, "window", None)
    if settings.kind == "pod":
        return PodTarget(
            settings, capacity=window, preflight=not getattr(args, "no_preflight", False), on_message=out.note
        )
    return ServerlessTarget(settings, capacity=window)


def batch_pool(targets: list[Any], args: argparse.Namespace) -> list[Any]:
    """Wrap a batch pool with the shared ``--max-cost`` budget and ``costs.json`` in the batch folder
    (targets without a price are recorded but never limit anything)."""
    from ..runpod.cost import with_budget

    if not any(hasattr(t, "job_cost") or hasattr(t, "session_cost") for t in targets):
        return targets
    return with_budget(targets, getattr(args, "max_cost", None), out=getattr(args, "out", None))
