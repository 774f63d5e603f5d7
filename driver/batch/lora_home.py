"""Trained LoRAs home (``RunOptions.lora_home``): a job whose outputs show a Train LoRA run is ``done`` only once
the LoRA and its run folder are in ``<job>/lora/`` too; see :mod:`~charforge.driver.batch.runner`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..config import redact
from ..errors import DriverError
from ..sync import NoTransferRoutes, TrainedLoRA, trained_loras
from .plan import Job
from .run_types import _reason, _Retryable
from .targets import Target


def _training(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's training entries (``state``: pending / home / not_home); a manifest written before they
    existed gets them from its Train LoRA texts, pending."""
    entries = manifest.get("training")
    if isinstance(entries, list):
        return [e for e in entries if isinstance(e, dict)]
    return [
        {"node_id": t.node_id, "lora": t.lora, "run_dir": t.run_dir, "state": "pending"}
        for t in trained_loras(manifest.get("values") or {})
    ]


def _pending_training(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and any(e.get("state") == "pending" for e in _training(manifest))


def _write_manifest_over(path: Path, manifest: dict[str, Any]) -> None:
    """Replace a job's manifest in one step (a reader sees the old one or the new one, never half)."""
    text = redact(json.dumps(manifest, indent=2, ensure_ascii=False, default=str), [])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class _Runner(Protocol):
    """What :class:`LoraHome` uses of the runner it is mixed into (:class:`~.runner.BatchRunner`)."""

    _no_files: set[str]
    note: Callable[[str], None]

    async def _retrying(self, job: Job, what: str, fn: Callable[[], Any]) -> Any: ...

    def _fail(
        self,
        job: Job,
        ev: str,
        kind: str,
        reason: str,
        target: Target | None = None,
        prompt_id: str | None = None,
    ) -> None: ...


class LoraHome:
    """The batch runner's LoRA-home step (mixed into :class:`~.runner.BatchRunner`)."""

    async def _bring_home(
        self: _Runner, job: Job, target: Target, final: Path, prompt_id: str | None
    ) -> bool:
        """The LoRAs the job trained and their run folders into ``final/lora/``, the manifest rewritten with
        them; False (journaled ``failed``, kind ``home``: the next run downloads again) when that failed."""
        manifest_path = final / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True  # not a manifest this runner wrote: nothing it knows to bring home
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            return True
        entries = _training(manifest)
        pending = [e for e in entries if e.get("state") == "pending"]
        if not pending:
            return True
        fetch = getattr(target, "fetch_training", None)
        why = None
        if fetch is None:
            why = "this kind of server cannot send files (no CharForge file routes)"
            if target.name not in self._no_files:
                self._no_files.add(target.name)
                self.note(f"trained LoRAs stay on {target.name}: {why}")
        elif target.name in self._no_files:
            why = f"{target.name} has no CharForge transfer routes"
        else:
            trained = [
                TrainedLoRA(str(e["lora"]), str(e["run_dir"]), str(e.get("node_id") or "")) for e in pending
            ]
            try:
                got = await self._retrying(job, "bringing the LoRA home", lambda: fetch(trained, final))
            except NoTransferRoutes as exc:
                self._no_files.add(target.name)
                why = _reason(exc)
                self.note(f"trained LoRAs stay on {target.name}: {why}")
            except _Retryable as exc:
                self._fail(
                    job,
                    "failed",
                    "home",
                    f"{exc}; the outputs are here, rerun to bring the LoRA home (the job is not run again)",
                    target,
                    prompt_id,
                )
                return False
            except (DriverError, OSError, ValueError, KeyError) as exc:
                self._fail(
                    job,
                    "failed",
                    "home",
                    f"bringing the LoRA home: {_reason(exc)}; rerun to try again (the job is not run again)",
                    target,
                    prompt_id,
                )
                return False
            else:
                by_key = {(g["node_id"], g["lora"]): g for g in got}
                for entry in pending:
                    home = by_key.get((entry["node_id"], entry["lora"]))
                    if home is not None:
                        entry.update(
                            {k: v for k, v in home.items() if k != "files"}, files=len(home["files"])
                        )
                        title = ((manifest.get("values") or {}).get(entry["node_id"]) or {}).get("title")
                        for f in home["files"]:
                            f["title"] = title
                        known = {f["path"] for f in manifest["files"]}
                        manifest["files"] += [
                            {k: v for k, v in f.items() if k != "downloaded"}
                            for f in home["files"]
                            if f["path"] not in known
                        ]
        if why is not None:
            for entry in pending:
                entry.update(state="not_home", reason=why)
        manifest["training"] = entries
        _write_manifest_over(manifest_path, manifest)
        return True
