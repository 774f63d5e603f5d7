"""Report: contact sheets (every photo's thumbnail, scores and why it was rejected) plus JSON and HTML.

Written to ``<dataset>/report/``: ``contact_sheet_001.png`` ... (a fixed grid per page, so the pages
stack into one IMAGE batch), ``report.json`` and ``report.html``. The JSON holds counts, rejection
reasons, the bucket histogram, duplicate groups, caption coverage and trigger-word presence, and one
row per photo.
"""

from __future__ import annotations

import functools
import html
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ...deps import require
from .filters import _rule
from .images import read_rgb, write_bytes_atomic
from .manifest import DatasetManifest, ImageEntry
from .parallel import ordered_map

ProgressFn = Callable[[int, int], None]
GREEN, RED, GREY, YELLOW = (46, 160, 67), (214, 55, 55), (110, 110, 110), (250, 204, 21)


def trigger_from_history(manifest: DatasetManifest) -> str:
    for record in reversed(manifest.history):
        if record.stage == "export" and record.settings.get("trigger"):
            return str(record.settings["trigger"])
    return ""


def _has_trigger(caption: str | None, trigger: str) -> bool:
    if not caption:
        return False
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


def _status(entry: ImageEntry) -> str:
    if entry.rejected:
        return "rejected"
    return "augmented" if entry.parent else "accepted"


def build_report(manifest: DatasetManifest, trigger: str = "") -> dict[str, Any]:
    """Everything the report says, as JSON-ready data."""
    trigger = trigger.strip() or trigger_from_history(manifest)
    accepted = manifest.accepted
    originals = [e for e in accepted if not e.parent]
    reasons = Counter(_rule(reason) for entry in manifest.rejected for reason in entry.rejected)
    buckets = Counter(f"{e.bucket[0]}x{e.bucket[1]}" for e in accepted if e.bucket)
    names = {e.id: e.name for e in manifest.entries}
    captioned = [e for e in accepted if e.caption and e.caption.strip()]
    data: dict[str, Any] = {
        "dataset": manifest.name,
        "folder": manifest.folder,
        "face_detector": manifest.detector or "none",
        "counts": {
            "images": len(manifest.entries),
            "accepted": len(accepted),
            "accepted_originals": len(originals),
            "augmented_copies": len(accepted) - len(originals),
            "rejected": len(manifest.rejected),
        },
        "rejection_reasons": dict(reasons.most_common()),
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
        "duplicate_groups": [
            {"kept": names.get(g[0], g[0]), "dropped": [names.get(i, i) for i in g[1:]]}
            for g in manifest.duplicate_groups
        ],
        "captions": {
            "with_caption": len(captioned),
            "without_caption": len(accepted) - len(captioned),
            "coverage": round(len(captioned) / len(accepted), 3) if accepted else 0.0,
        },
        "trigger": {
            "word": trigger,
            "in_captions": sum(_has_trigger(e.caption, trigger) for e in captioned) if trigger else None,
            "missing_from": [e.name for e in captioned if trigger and not _has_trigger(e.caption, trigger)],
        },
        "synthetic": {
            "accepted": sum(1 for e in accepted if e.synthetic),
            "rejected": sum(1 for e in manifest.rejected if e.synthetic),
            "share": round(sum(1 for e in accepted if e.synthetic) / len(accepted), 3) if accepted else 0.0,
            "images": [
                {"name": e.name, "status": _status(e), "source": e.synthesized_from}
                for e in manifest.entries
                if e.synthetic
            ],
        },
        "upscaled": [{"name": e.name, "factor": e.upscaled} for e in manifest.entries if e.upscaled],
        "enhanced": _enhanced(manifest),
        "train_data_dir": manifest.export_dir,
        "history": [asdict(h) for h in manifest.history],
        "images": [
            {
                "id": e.id,
                "name": e.name,
                "status": _status(e),
                "reasons": e.rejected,
                "notes": e.flags,
                "source": e.source,
                "file": e.file,
                "size": [e.width, e.height],
                "bucket": e.bucket,
                "scores": asdict(e.scores),
                "faces": asdict(e.faces) if e.faces else None,
                "duplicate_group": e.duplicate_group,
                "augmentations": e.augmentations,
                "caption": e.caption,
                "synthetic": e.synthetic,
                "synthesized_from": e.synthesized_from,
                "upscaled": e.upscaled,
                "enhanced": e.enhanced,
            }
            for e in manifest.entries
        ],
    }
    return data


def _enhanced(manifest: DatasetManifest) -> dict[str, Any]:
    """Enhanced photos (kept or refused by the identity check) and how they were checked."""
    check = None
    for record in reversed(manifest.history):
        if record.stage == "crop":
            check = record.settings.get("identity_check")
            break
    images = [
        {"name": e.name, "status": _status(e), **e.enhanced}
        for e in manifest.entries
        if e.enhanced is not None
    ]
    return {
        "check": check,  # how enhanced images were scored, or why they were not (None: nothing enhanced)
        "kept": sum(1 for image in images if image["kept"]),
        "refused": sum(1 for image in images if not image["kept"]),
        "images": images,
    }


def _enhanced_text(image: dict[str, Any]) -> str:
    text = f"{image['factor']:g}x with {image['by']}, from {Path(image['source']).name}"
    if image.get("similarity") is not None:
        text += f", identity {image['similarity']:.3f}"
    return f"kept, {text}" if image["kept"] else f"refused ({image.get('reason', '')}), {text}"


# ------------------------------------------------------------------------------------------ contact sheet


# Fonts with accented Latin (and more) tried before Pillow's built-in one, which has ASCII only.
FONT_CANDIDATES = (
    "DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "Arial.ttf",
    "arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial Unicode.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
)


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """(font, can show non-ASCII text)."""
    from PIL import ImageFont

    for candidate in FONT_CANDIDATES:
        try:
            return ImageFont.truetype(candidate, size), True
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size), False
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default(), False


def visible(text: str) -> str:
    """`text` with control and invisible formatting characters shown as escapes (``\\n``, ``\\u202e``).

    File names may hold a newline, a tab or a right-to-left override: drawn or shown as they are, they
    break the contact sheet's one-line labels (Pillow refuses to measure multi-line text) or reorder
    what the reader sees. The JSON keeps the real names; what is drawn and the HTML show escapes.
    """
    out = []
    for char in str(text):
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(char)
            out.append(
                {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char)
                or (
                    f"\\x{code:02x}"
                    if code < 0x100
                    else f"\\u{code:04x}"
                    if code < 0x10000
                    else f"\\U{code:08x}"
                )
            )
        else:
            out.append(char)
    return "".join(out)


def _printable(text: str, unicode_ok: bool) -> str:
    text = visible(text)
    if unicode_ok:
        return text
    # The built-in font has ASCII only: "Élodie_été" -> "Elodie_ete", other scripts -> "?".
    folded = unicodedata.normalize("NFKD", text)
    return "".join(c if ord(c) < 128 else ("" if unicodedata.combining(c) else "?") for c in folded)


def _fit_text(draw, text: str, font, width: int) -> str:
    font, unicode_ok = font
    text = _printable(text, unicode_ok)
    if draw.textlength(text, font=font) <= width:
        return text
    ellipsis = "…" if unicode_ok else "..."
    while text and draw.textlength(text + ellipsis, font=font) > width:
        text = text[:-1]
    return text + ellipsis


def _wrap(draw, text: str, font, width: int, lines: int) -> list[str]:
    words, out, line = _printable(text, font[1]).split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font[0]) <= width or not line:
            line = candidate
        else:
            out.append(line)
            line = word
    if line:
        out.append(line)
    if len(out) > lines:
        out = out[: lines - 1] + [" ".join(out[lines - 1 :])]
    return [_fit_text(draw, line, font, width) for line in out]


def _thumbnail(entry: ImageEntry, size: int):
    try:
        decoded = read_rgb(entry.file, max_side=size)
    except Exception:  # noqa: BLE001 - an unreadable photo gets an empty cell with its reason
        return None, 1.0
    ratio = decoded.rgb.shape[1] / entry.width if entry.width else 1.0
    return decoded.rgb, ratio


def _scores_line(entry: ImageEntry) -> str:
    parts = []
    if entry.width:
        parts.append(f"{entry.width}x{entry.height}")
    if entry.scores.sharpness is not None:
        parts.append(f"sharp {entry.scores.sharpness:.0f}")
    if entry.faces is not None:
        parts.append(f"faces {entry.faces.count}")
    if entry.scores.identity_distance is not None:
        parts.append(f"id {entry.scores.identity_distance:.2f}")
    if entry.upscaled:
        parts.append(f"upscaled {entry.upscaled:g}x")
    if entry.enhanced and not entry.enhanced["kept"]:
        parts.append("upscale refused")
    if entry.synthetic and entry.rejected:
        parts.append("synthetic")
    return "  ".join(parts)


def _draw_cell(sheet, draw, entry: ImageEntry, thumb, ratio: float, x: int, y: int, size: int, fonts) -> None:
    from PIL import Image

    status = _status(entry)
    colour = RED if status == "rejected" else (GREEN if status == "accepted" else GREY)
    draw.rectangle([x, y, x + size + 7, y + size + 7 + 4 * fonts[1] + 10], outline=colour, width=3)
    ox, oy = x + 4, y + 4
    if thumb is not None:
        img = Image.fromarray(thumb)
        px, py = ox + (size - img.width) // 2, oy + (size - img.height) // 2
        sheet.paste(img, (px, py))
        if entry.faces and entry.faces.box:
            x1, y1, x2, y2 = (v * ratio for v in entry.faces.box)
            draw.rectangle([px + x1, py + y1, px + x2, py + y2], outline=YELLOW, width=2)
    else:
        draw.rectangle([ox, oy, ox + size, oy + size], fill=(40, 40, 40))
        draw.text((ox + 8, oy + size // 2 - 8), "cannot be read", fill=(230, 230, 230), font=fonts[0][0])
    tx, ty, width = x + 5, y + size + 10, size
    font, line_h = fonts[0], fonts[1]
    draw.text(
        (tx, ty), _fit_text(draw, f"{entry.id}  {entry.name}", font, width), fill=(20, 20, 20), font=font[0]
    )
    if entry.rejected:
        lines = _wrap(draw, "; ".join(entry.rejected), font, width, 2)
        text_colour = RED
    else:
        label = "accepted" if not entry.parent else "augmented: " + ", ".join(entry.augmentations)
        if entry.synthetic:
            label = f"synthetic, from {Path(entry.synthesized_from or '?').name}"
        lines = [_fit_text(draw, label, font, width)]
        text_colour = GREEN if not entry.parent else GREY
    for i, line in enumerate(lines):
        draw.text((tx, ty + line_h * (1 + i)), line, fill=text_colour, font=font[0])
    draw.text(
        (tx, ty + line_h * 3),
        _fit_text(draw, _scores_line(entry), font, width),
        fill=(60, 60, 60),
        font=font[0],
    )


def contact_sheets(
    manifest: DatasetManifest,
    thumb_size: int = 192,
    per_sheet: int = 48,
    columns: int = 8,
    workers: int = 0,
    on_image: ProgressFn | None = None,
):
    """Yield contact-sheet pages (PIL images, all the same size), one thumbnail decoded at a time."""
    from PIL import Image, ImageDraw

    entries = manifest.entries
    per_sheet = max(1, per_sheet)
    columns = max(1, min(columns, per_sheet))
    rows = -(-min(per_sheet, max(len(entries), 1)) // columns)
    font_size = max(10, thumb_size // 14)
    fonts = (_font(font_size), font_size + 3)
    cell_w, cell_h = thumb_size + 12, thumb_size + 12 + 4 * fonts[1] + 12
    header = font_size * 2 + 12
    page_size = (columns * cell_w + 8, rows * cell_h + header + 8)
    pages = max(1, -(-len(entries) // per_sheet))
    summary = f"{manifest.name}: {manifest.summary()}  |  face detector: {manifest.detector or 'none'}"

    def new_page(number: int):
        page = Image.new("RGB", page_size, (250, 250, 250))
        draw = ImageDraw.Draw(page)
        title = f"{summary}  |  page {number} of {pages}"
        title_font = _font(font_size + 2)
        draw.text(
            (8, 6), _fit_text(draw, title, title_font, page_size[0] - 16), fill=(0, 0, 0), font=title_font[0]
        )
        return page, draw

    def report(index: int, _thumb) -> None:
        if on_image is not None:
            on_image(index + 1, len(entries))

    number = 1
    page, draw = new_page(number)
    slot = 0
    for entry, (thumb, ratio) in zip(
        entries, ordered_map(lambda e: _thumbnail(e, thumb_size), entries, workers, report), strict=True
    ):
        if slot == per_sheet:
            yield page
            number += 1
            page, draw = new_page(number)
            slot = 0
        row, col = divmod(slot, columns)
        _draw_cell(
            page, draw, entry, thumb, ratio, 4 + col * cell_w, header + row * cell_h, thumb_size, fonts
        )
        slot += 1
    yield page


# ------------------------------------------------------------------------------------------------ files


def _html(data: dict[str, Any], sheets: list[str]) -> str:
    def e(text: Any) -> str:
        return html.escape(visible(str(text)))

    counts = data["counts"]

    def table(rows: list[tuple[str, Any]], head: tuple[str, str]) -> str:
        body = "".join(f"<tr><td>{e(str(k))}</td><td>{e(str(v))}</td></tr>" for k, v in rows)
        return f"<table><tr><th>{e(head[0])}</th><th>{e(head[1])}</th></tr>{body}</table>"

    trig = data["trigger"]
    trigger_text = (
        f"{trig['in_captions']} of {data['captions']['with_caption']} captions contain “{trig['word']}”"
        if trig["word"]
        else "no trigger word given"
    )
    groups = (
        "".join(
            f"<li><b>{e(g['kept'])}</b> kept; dropped {e(', '.join(g['dropped']))}</li>"
            for g in data["duplicate_groups"]
        )
        or "<li>none</li>"
    )
    rows = "".join(
        f"<tr class='{e(img['status'])}'><td>{e(img['id'])}</td><td>{e(img['name'])}</td><td>{e(img['status'])}</td>"
        f"<td>{e('; '.join(img['reasons']))}</td><td>{e(str(img['size'][0]))}x{e(str(img['size'][1]))}</td>"
        f"<td>{'' if img['scores']['sharpness'] is None else round(img['scores']['sharpness'], 1)}</td>"
        f"<td>{'' if img['faces'] is None else img['faces']['count']}</td>"
        f"<td>{e(str(img['bucket'] or ''))}</td><td>{e(img['caption'] or '')}</td>"
        f"<td>{e(Path(img['synthesized_from']).name) if img['synthetic'] else ''}</td></tr>"
        for img in data["images"]
    )
    images = "".join(
        f"<p><img src='{e(name)}' alt='contact sheet {i + 1}'></p>" for i, name in enumerate(sheets)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(data["dataset"])}: dataset report</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;margin:.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}} tr.rejected td{{color:#b32}}
tr.augmented td{{color:#666}} img{{max-width:100%}}</style></head><body>
<h1>Dataset “{e(data["dataset"])}”</h1>
<p>{counts["accepted"]} accepted ({counts["augmented_copies"]} augmented copies), {counts["rejected"]} rejected,
{counts["images"]} in all. Face detector: {e(data["face_detector"])}.
{("Train with train_data_dir = <code>" + e(data["train_data_dir"]) + "</code>.") if data["train_data_dir"] else ""}</p>
<h2>Why photos were rejected</h2>{table(list(data["rejection_reasons"].items()), ("reason", "photos"))}
<h2>Buckets</h2>{table(list(data["buckets"].items()), ("bucket", "photos"))}
<h2>Duplicate groups</h2><ul>{groups}</ul>
<h2>Synthetic and upscaled images</h2><p>{data["synthetic"]["accepted"]} accepted synthetic image(s)
({data["synthetic"]["share"]:.0%} of the accepted), {data["synthetic"]["rejected"]} rejected.</p>
{table([(s["name"], f"{s['status']}, from {s['source']}") for s in data["synthetic"]["images"]], ("synthetic", "source"))}
{table([(u["name"], f"{u['factor']:g}x") for u in data["upscaled"]], ("upscaled", "by"))}
<p>Identity check of enhanced images: {e(data["enhanced"]["check"] or "nothing was enhanced")};
{data["enhanced"]["kept"]} kept, {data["enhanced"]["refused"]} refused (the un-enhanced crop kept).</p>
{table([(x["name"], _enhanced_text(x)) for x in data["enhanced"]["images"]], ("enhanced", "result"))}
<h2>Captions</h2><p>{data["captions"]["with_caption"]} of {counts["accepted"]} accepted photos have a caption
(coverage {data["captions"]["coverage"]:.0%}); {e(trigger_text)}.</p>
<h2>Contact sheets</h2>{images}
<h2>Every photo</h2><table><tr><th>id</th><th>file</th><th>status</th><th>reasons</th><th>size</th>
<th>sharpness</th><th>faces</th><th>bucket</th><th>caption</th><th>synthetic from</th></tr>{rows}</table>
</body></html>
"""


def write_report(
    manifest: DatasetManifest,
    trigger: str = "",
    thumb_size: int = 192,
    per_sheet: int = 48,
    columns: int = 8,
    workers: int = 0,
    on_image: ProgressFn | None = None,
) -> dict[str, Any]:
    """Write the contact sheets, ``report.json`` and ``report.html``; return their paths and the data.

    Returns ``{"folder", "sheets": [paths], "json", "html", "data"}``.
    """
    np = require("numpy")
    folder = Path(manifest.folder) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("contact_sheet_*.png"):
        old.unlink()
    sheets = []
    arrays: list[Any] = []
    for number, page in enumerate(
        contact_sheets(manifest, thumb_size, per_sheet, columns, workers, on_image), 1
    ):
        path = folder / f"contact_sheet_{number:03d}.png"
        page.save(path, compress_level=3)
        sheets.append(str(path))
        if len(arrays) < 16:  # the IMAGE output shows the first pages; every page is on disk
            arrays.append(np.asarray(page))
    data = build_report(manifest, trigger)
    data["contact_sheets"] = [Path(p).name for p in sheets]
    json_path = folder / "report.json"
    html_path = folder / "report.html"
    write_bytes_atomic(json_path, (json.dumps(data, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    write_bytes_atomic(html_path, _html(data, data["contact_sheets"]).encode("utf-8"))
    return {
        "folder": str(folder),
        "sheets": sheets,
        "json": str(json_path),
        "html": str(html_path),
        "data": data,
        "pages": arrays,
    }


# ------------------------------------------------------------------------------------------------ listing


def list_datasets(root: str | Path) -> list[dict[str, Any]]:
    """Every dataset folder under `root` (one ``<name>/manifest.json`` each), newest first: counts,
    rejection reasons and, when the report stage ran, its contact sheets and HTML report (paths relative to
    the dataset folder). Without a report the counts come from the manifest itself."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        manifest_path = folder / "manifest.json"
        if folder.name.startswith((".", "_")) or not manifest_path.is_file():
            continue
        report_json = folder / "report" / "report.json"
        entry: dict[str, Any] = {
            "name": folder.name,
            "updated_at": manifest_path.stat().st_mtime,
            "report": None,
            "contact_sheets": [],
        }
        try:
            if report_json.is_file():
                data = json.loads(report_json.read_text(encoding="utf-8"))
                entry["updated_at"] = max(entry["updated_at"], report_json.stat().st_mtime)
                if (folder / "report" / "report.html").is_file():
                    entry["report"] = "report/report.html"
                entry["contact_sheets"] = [
                    f"report/{name}"
                    for name in data.get("contact_sheets", [])
                    if (folder / "report" / name).is_file()
                ]
            else:
                data = build_report(DatasetManifest.load(manifest_path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            entry["error"] = f"cannot read {folder.name}: {exc}"
            found.append(entry)
            continue
        entry.update(
            {
                "counts": data.get("counts", {}),
                "rejection_reasons": data.get("rejection_reasons", {}),
                "captions": data.get("captions", {}),
                "trigger": (data.get("trigger") or {}).get("word"),
                "train_data_dir": data.get("train_data_dir"),
            }
        )
        found.append(entry)
    return sorted(found, key=lambda d: -d["updated_at"])
