"""Edit the captions of a dataset in bulk: find/replace, prepend, append, remove.

Edits apply to the accepted photos' captions (the manifest's, else the sidecar's) and are written to the
dataset's own sidecars (`sidecars.sidecar_path`: inside the dataset folder, never next to the source
photos). A dry run computes the same changes and writes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..dataset.manifest import DatasetManifest
from .postprocess import _tidy
from .sidecars import existing_caption, sidecar_path, write_sidecar

OPERATIONS = ("find and replace", "prepend", "append", "remove")


@dataclass
class CaptionEdit:
    entry_id: str
    name: str
    before: str
    after: str


@dataclass
class EditRun:
    manifest: DatasetManifest
    changes: list[CaptionEdit] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # entry id: why
    dry_run: bool = True

    def summary(self, preview: int = 10) -> str:
        verb = "would change" if self.dry_run else "changed"
        lines = [
            f"{verb} {len(self.changes)} caption(s), {self.unchanged} unchanged"
            + (f", {len(self.skipped)} skipped" if self.skipped else "")
        ]
        for edit in self.changes[:preview]:
            lines.append(f"{edit.name}: {edit.before!r} -> {edit.after!r}")
        if len(self.changes) > preview:
            lines.append(f"... and {len(self.changes) - preview} more")
        lines += self.skipped[:preview]
        return "\n".join(lines)


def _pattern(find: str, regex: bool, case_sensitive: bool) -> re.Pattern[str]:
    flags = 0 if case_sensitive else re.IGNORECASE
    if regex:
        try:
            return re.compile(find, flags)
        except re.error as exc:
            raise ValueError(f"find is not a valid regular expression ({find!r}): {exc}") from None
    words = [re.escape(w) for w in find.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", flags)


def edit_caption(
    caption: str,
    operation: str,
    find: str = "",
    text: str = "",
    regex: bool = False,
    case_sensitive: bool = False,
) -> str:
    """One caption after the edit (tidied: one line, clean commas)."""
    if operation not in OPERATIONS:
        raise ValueError(f"caption edit {operation!r} is not one of {', '.join(OPERATIONS)}")
    caption = caption or ""
    text = " ".join((text or "").split())
    if operation in ("find and replace", "remove"):
        if not find.strip():
            raise ValueError(f"{operation} needs something to find")
        out = _pattern(find, regex, case_sensitive).sub(
            text if operation == "find and replace" else " ", caption
        )
    elif operation == "prepend":
        key = text.lower()
        out = caption if not text or caption.lower().startswith(key) else f"{text}, {caption}"
    else:
        key = text.lower()
        out = caption if not text or caption.lower().rstrip(" ,.").endswith(key) else f"{caption}, {text}"
    return _tidy(out)


def edit_captions(
    manifest: DatasetManifest,
    operation: str,
    find: str = "",
    text: str = "",
    regex: bool = False,
    case_sensitive: bool = False,
    dry_run: bool = True,
) -> EditRun:
    """Apply the edit to every accepted photo's caption; returns the (copied) manifest and the changes."""
    manifest = manifest.copy()
    run = EditRun(manifest, dry_run=dry_run)
    for entry in manifest.accepted:
        before = existing_caption(manifest, entry) or ""
        after = edit_caption(before, operation, find, text, regex, case_sensitive)
        if after == before:
            run.unchanged += 1
            continue
        if not after:
            run.skipped.append(f"{entry.name}: the edit would leave an empty caption; left as it was")
            continue
        run.changes.append(CaptionEdit(entry.id, entry.name, before, after))
        if not dry_run:
            write_sidecar(sidecar_path(manifest, entry), after)
            entry.caption = after
    return run
