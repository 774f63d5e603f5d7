"""Replicate server strings for ``charforge run/wait/status/cancel`` and ``charforge batch run``.

``--server replicate:OWNER/MODEL[:VERSION]`` (or a profile with a ``replicate:`` section) makes ``run`` send the
workflow to a Replicate model that runs ComfyUI workflows, follow the prediction (status and log lines) and
download its output files with a manifest; ``wait``/``status``/``cancel`` take a prediction id. :func:`register` installs
this routing on the existing sub-commands; :func:`batch_target` is what ``charforge batch run`` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from ..config import ReplicateSettings, resolve_replicate
from ..errors import ConfigError
from .common import report_cancel
from .hosted import Command, finish_job, route_commands, run_job, run_main


def register(sub: Any, *, server: argparse.ArgumentParser, output: Any) -> None:
    """Add ``charforge replicate predictions`` and route Replicate server strings of run/wait/status/cancel (the
    other commands need a ComfyUI server)."""
    replicate = sub.add_parser(
        "replicate",
        help="Replicate: recent predictions (what runs and bills)",
        description="Look at your Replicate account. Needs REPLICATE_API_TOKEN (or "
        "replicate.token_env in the config file).",
    )
    rep = replicate.add_subparsers(dest="replicate_command", metavar="REPLICATE_COMMAND", required=True)
    predictions = rep.add_parser(
        "predictions",
        parents=[server],
        help="recent predictions, newest first: status, run time, CharForge job id",
    )
    predictions.add_argument("--limit", type=int, default=20, help="how many (default: 20)")
    predictions.add_argument("--model", metavar="OWNER/NAME", help="only this model's")
    predictions.set_defaults(func=cmd_predictions)
    route_commands(sub, resolve_replicate, _dispatch)


def _dispatch(
    name: str, original: Command, args: argparse.Namespace, settings: ReplicateSettings, out: Any
) -> int:
    handler = {
        "run": replicate_run,
        "wait": replicate_wait,
        "status": replicate_status,
        "cancel": replicate_cancel,
    }.get(name)
    if handler is None:
        raise ConfigError(
            f"'charforge {name}' does not work with a Replicate model (no ComfyUI API there); "
            "use run, wait, status or cancel"
        )
    return handler(args, settings, out)


def replicate_run(args: argparse.Namespace, settings: ReplicateSettings, out: Any) -> int:
    """``charforge run --server replicate:OWNER/MODEL``: create the prediction, follow it, download its files."""
    from ..replicate import ReplicateTarget

    started = time.monotonic()
    target = ReplicateTarget(settings, preflight=not args.no_preflight)

    def submitted(prediction_id: str) -> None:
        out.note(
            f"created prediction {prediction_id} on {settings.model} (if this command dies, follow it "
            f"with: charforge wait --server {settings.server} {prediction_id} --out {args.out})"
        )
        if out.json:
            out.record("submitted", prediction_id=prediction_id, model=settings.model, version=target.version)

    async def main() -> int:
        return await run_job(
            target,
            args,
            out,
            noun="prediction",
            submitted=submitted,
            follow=lambda prediction_id: _follow(
                target, prediction_id, args, out, started, str(args.workflow)
            ),
        )

    return run_main(main)


def replicate_wait(args: argparse.Namespace, settings: ReplicateSettings, out: Any) -> int:
    """``charforge wait --server replicate:... PREDICTION_ID``: follow a prediction made elsewhere and download
    its files (nothing is canceled when this command stops: the prediction is not ours to stop)."""
    from ..replicate import ReplicateTarget

    target = ReplicateTarget(settings)

    async def main() -> int:
        try:
            return await _follow(target, args.prompt_id, args, out, time.monotonic(), None)
        finally:
            await target.close()

    return run_main(main)


async def _follow(
    target: Any,
    prediction_id: str,
    args: argparse.Namespace,
    out: Any,
    started: float,
    workflow_source: str | None,
) -> int:
    """Wait for the prediction (status and log lines as notes), download its files with the manifest."""
    settings = target.settings

    def on_update(prediction: Any, lines: list[str]) -> None:
        for line in lines[-20:]:
            out.note(f"  {line}")
        if prediction.status in ("starting", "processing") and not lines:
            out.note(f"prediction {prediction.id}: {prediction.status}")

    result = await target.wait(prediction_id, args.timeout, on_update=on_update)
    prediction_id = result.prompt_id
    return await finish_job(
        target,
        settings,
        result,
        prediction_id,
        args,
        out,
        started=started,
        workflow_source=workflow_source,
        service="replicate",
        service_fields={"prediction_id": prediction_id, "model": settings.model, "version": target.version},
        summary=lambda times: (
            f"done: prediction {prediction_id}, ran {times['execution_seconds'] or 0:.1f} s"
        ),
        nothing="the model returned no files",
        id_field="prediction_id",
    )


def replicate_status(args: argparse.Namespace, settings: ReplicateSettings, out: Any) -> int:
    from ..replicate import ReplicateTarget

    if not args.prompt_id:
        raise ConfigError("charforge status --server replicate:...: name the prediction id to look up")

    async def main() -> int:
        target = ReplicateTarget(settings)
        try:
            prediction = await target.prediction(args.prompt_id)
        finally:
            await target.close()
        if prediction is None:
            out.result(
                f"prediction {args.prompt_id}: unknown", prediction_id=args.prompt_id, status="unknown"
            )
            return 1
        ran = prediction.predict_time
        detail = f", ran {ran:.1f} s" if ran is not None else ""
        out.result(
            f"prediction {prediction.id}: {prediction.status}{detail}",
            prediction_id=prediction.id,
            status=prediction.status,
            predict_time=ran,
            error=prediction.error,
        )
        return 0

    return asyncio.run(main())


def replicate_cancel(args: argparse.Namespace, settings: ReplicateSettings, out: Any) -> int:
    from ..replicate import ReplicateTarget

    async def main() -> str:
        target = ReplicateTarget(settings)
        try:
            return await target.cancel(args.prompt_id)
        finally:
            await target.close()

    texts = {
        "removed": "canceled before it started",
        "interrupted": "canceled while running",
        "not_active": "already finished (or unknown)",
    }
    return report_cancel(
        out, "prediction", args.prompt_id, asyncio.run(main()), texts, id_field="prediction_id"
    )


def cmd_predictions(args: argparse.Namespace, out: Any) -> int:
    """List recent predictions with the CharForge job id each carries (after a crash: what is still running)."""
    from ..replicate import ReplicateAPI, workflow_tag

    config = getattr(args, "config", None)
    # Only the token and the API address matter here: any model name resolves them.
    settings = resolve_replicate(args.server, profile=args.profile, config_path=config) or resolve_replicate(
        "replicate:any/model", config_path=config
    )
    assert settings is not None
    out.secrets = [*out.secrets, *settings.secrets()]

    async def main() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        url = None
        async with ReplicateAPI(settings.token, base_url=settings.api_url) as api:
            while len(rows) < args.limit:
                page, url = await api.list_page("predictions", url)
                rows += [r for r in page if not args.model or r.get("model") == args.model]
                if url is None:
                    break
        return rows[: args.limit]

    rows = asyncio.run(main())
    table = []
    for row in rows:
        ran = (row.get("metrics") or {}).get("predict_time")
        table.append(
            {
                "id": row.get("id"),
                "model": row.get("model"),
                "status": row.get("status"),
                "created_at": row.get("created_at"),
                "predict_time": ran,
                "charforge_job": workflow_tag(row.get("input")),
            }
        )
    lines = [
        f"{r['id']}  {r['status']:<10}  {r['model']}  {r['created_at']}"
        + (f"  ran {r['predict_time']:.1f} s" if isinstance(r["predict_time"], (int, float)) else "")
        + (f"  job {r['charforge_job']}" if r["charforge_job"] else "")
        for r in table
    ]
    out.result("\n".join(lines) or "no predictions", predictions=table)
    return 0


def batch_target(server: str | None, profile: str | None, args: argparse.Namespace, out: Any) -> Any | None:
    """The batch target for a Replicate ``--server``/``--profile`` of ``charforge batch run``, or None."""
    from ..replicate import ReplicateTarget

    settings = resolve_replicate(server, profile=profile, config_path=getattr(args, "config", None))
    if settings is None:
        return None
    out.secrets = [*out.secrets, *settings.secrets()]
    return ReplicateTarget(
        settings, capacity=getattr(args, "window", None), preflight=not getattr(args, "no_preflight", False)
    )
