"""What a search leaves behind: ``report.html`` with its PNGs, ``trials.json``, ``best.yaml``, and the best LoRA
copied into a loras folder with a character preset pointing at it (neither ever replaces a file).

PNGs (``report/``): ``pareto.png`` (identity against text agreement of every finished trial; the Pareto-optimal
ones over the search's objectives - or identity, text and diversity for a one-objective search - ringed and
numbered), ``importances.png`` (Optuna's parameter importances for the first objective: PED-ANOVA, its default),
``history.png`` (each trial's first objective, pruned trials at their last reported value, and the best so far),
``best_grid.png`` (the evaluation images of the best trials, one row each).
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT = "report"
HTML = "report.html"
BEST_YAML = "best.yaml"
TRIALS_JSON = "trials.json"
POINT = (40, 90, 160)
FRONT = (200, 60, 40)
PRUNED = (150, 150, 150)


# ---- picking the best --------------------------------------------------------------------------------------


def finished_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(trials: list[Any], metrics: Sequence[str], directions: Sequence[str]) -> list[Any]:
    """The trials no other trial beats on every metric (read from their scores; 'minimize' metrics negated)."""
    points: list[tuple[Any, list[float]]] = []
    for t in trials:
        scores = t.user_attrs.get("scores") or {}
        values = [scores.get(m) for m in metrics]
        numbers = [float(v) for v in values if isinstance(v, (int, float))]
        if len(numbers) == len(values):
            points.append(
                (t, [v if d == "maximize" else -v for v, d in zip(numbers, directions, strict=True)])
            )
    return [t for t, v in points if not any(_dominates(w, v) for _, w in points if w is not v)]


def best_trial(study: Any, spec: Any) -> Any | None:
    """One-objective: Optuna's best. Several: the Pareto-front trial with the highest combined score."""
    trials = finished_trials(study)
    if not trials:
        return None
    if not spec.multi:
        return study.best_trial
    front = study.best_trials or trials
    return max(
        front, key=lambda t: ((t.user_attrs.get("scores") or {}).get("combined") or float("-inf"), -t.number)
    )


def front_metrics(spec: Any) -> tuple[list[str], list[str]]:
    if spec.multi:
        return list(spec.objectives), list(spec.directions)
    return ["identity", "text", "diversity"], ["maximize"] * 3


# ---- plots ------------------------------------------------------------------------------------------------


class _Plot:
    def __init__(self, title: str, size: tuple[int, int] = (760, 420), x_label: str = "", y_label: str = ""):
        from PIL import Image, ImageDraw

        from charforge.engine.score.render import BACKGROUND, INK, load_font

        self.image = Image.new("RGB", size, BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.ink = load_font(12), INK
        self.left, self.right, self.top, self.bottom = 64, size[0] - 20, 44, size[1] - 46
        self.draw.text((8, 6), title, fill=INK, font=load_font(15))
        self.draw.text(((self.left + self.right) // 2 - 30, size[1] - 20), x_label, fill=INK, font=self.font)
        self.draw.text((8, 26), y_label, fill=INK, font=self.font)
        self.x_range = self.y_range = (0.0, 1.0)

    def axes(self, xs: Sequence[float], ys: Sequence[float], whole_x: bool = False) -> None:
        from charforge.engine.score.render import GRID, MUTED

        def span(values: Sequence[float]) -> tuple[float, float]:
            low, high = (min(values), max(values)) if values else (0.0, 1.0)
            pad = (high - low) * 0.08 or max(abs(high) * 0.1, 0.05)
            return low - pad, high + pad

        self.x_range, self.y_range = span(xs), span(ys)
        for k in range(5):
            y = self.top + (self.bottom - self.top) * k / 4
            value = self.y_range[1] - (self.y_range[1] - self.y_range[0]) * k / 4
            self.draw.line([(self.left, y), (self.right, y)], fill=GRID)
            self.draw.text((8, y - 7), f"{value:.3g}", fill=MUTED, font=self.font)
            if not whole_x:
                x = self.left + (self.right - self.left) * k / 4
                value = self.x_range[0] + (self.x_range[1] - self.x_range[0]) * k / 4
                self.draw.text((x - 10, self.bottom + 6), f"{value:.3g}", fill=MUTED, font=self.font)
        if whole_x:  # trial numbers
            first, last = math.ceil(self.x_range[0]), math.floor(self.x_range[1])
            every = max(1, (last - first) // 10 + 1)
            for number in range(first, last + 1, every):
                self.draw.text(
                    (self.at(number, self.y_range[0])[0] - 4, self.bottom + 6),
                    str(number),
                    fill=MUTED,
                    font=self.font,
                )
        self.draw.rectangle([self.left, self.top, self.right, self.bottom], outline=self.ink)

    def at(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return (
            self.left + (x - x0) / ((x1 - x0) or 1) * (self.right - self.left),
            self.bottom - (y - y0) / ((y1 - y0) or 1) * (self.bottom - self.top),
        )

    def point(
        self, x: float, y: float, color: tuple[int, int, int], r: int = 4, label: str = "", ring: bool = False
    ) -> None:
        px, py = self.at(x, y)
        self.draw.ellipse([px - r, py - r, px + r, py + r], fill=color)
        if ring:
            self.draw.ellipse([px - r - 3, py - r - 3, px + r + 3, py + r + 3], outline=color, width=2)
        if label:
            self.draw.text((px + r + 3, py - 7), label, fill=color, font=self.font)


def pareto_png(trials: list[Any], front: list[Any], path: Path) -> None:
    points = [(t, (t.user_attrs.get("scores") or {})) for t in trials]
    points = [(t, s) for t, s in points if s.get("identity") is not None and s.get("text") is not None]
    plot = _Plot(
        "Trials: identity vs text agreement (ringed: Pareto front)",
        x_label="identity (ArcFace)",
        y_label="text (CLIP)",
    )
    plot.axes([s["identity"] for _, s in points], [s["text"] for _, s in points])
    on_front = {t.number for t in front}
    for t, s in points:
        chosen = t.number in on_front
        plot.point(
            s["identity"],
            s["text"],
            FRONT if chosen else POINT,
            label=str(t.number) if chosen else "",
            ring=chosen,
        )
    if not points:
        plot.draw.text(
            (plot.left + 10, plot.top + 10),
            "no finished trial with identity and text scores",
            fill=plot.ink,
            font=plot.font,
        )
    plot.image.save(path)


def history_png(study: Any, spec: Any, path: Path) -> None:
    from optuna.trial import TrialState

    metric, direction = spec.objectives[0], spec.directions[0]
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE:
            rows.append((t.number, t.values[0], False))
        elif t.state == TrialState.PRUNED and t.intermediate_values:
            rows.append((t.number, t.intermediate_values[max(t.intermediate_values)], True))
    plot = _Plot(
        f"{metric} over trials (grey: pruned, at its last sample score; line: best so far)",
        x_label="trial",
        y_label=metric,
    )
    plot.axes(
        [float(n) for n, _, _ in rows] or [0.0, 1.0], [v for _, v, _ in rows] or [0.0, 1.0], whole_x=True
    )
    best, previous = None, None
    for number, value, pruned in rows:
        plot.point(number, value, PRUNED if pruned else POINT)
        if pruned:
            continue
        if best is None or (value > best if direction == "maximize" else value < best):
            best = value
        here = plot.at(number, best)
        if previous is not None:
            plot.draw.line([previous, (here[0], previous[1]), here], fill=FRONT, width=2)
        previous = here
    plot.image.save(path)


def importances_png(study: Any, spec: Any, path: Path) -> dict[str, float]:
    """Parameter importances for the first objective (empty when too few trials differ)."""
    import optuna

    importances: dict[str, float] = {}
    with contextlib.suppress(Exception):  # fewer than two finished trials, or one value everywhere
        # Optuna's default evaluator (PED-ANOVA in 4.x/5.x: no scikit-learn needed); with a target it looks for
        # low values, so a maximised objective is negated.
        sign = -1.0 if spec.directions[0] == "maximize" else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "low target values" reminder: handled by the sign above
            importances = optuna.importance.get_param_importances(
                study, target=(lambda t: sign * t.values[0]) if spec.multi else None
            )
    plot = _Plot(
        f"parameter importance for {spec.objectives[0]} (Optuna's evaluator)",
        size=(760, 60 + 28 * max(1, len(importances))),
    )
    if not importances:
        plot.draw.text(
            (plot.left, 40),
            "not enough finished trials with different settings",
            fill=plot.ink,
            font=plot.font,
        )
    width = plot.right - 220
    for row, (name, value) in enumerate(importances.items()):
        y = 44 + row * 28
        plot.draw.text((10, y + 3), name[:28], fill=plot.ink, font=plot.font)
        plot.draw.rectangle([200, y, 200 + max(1, int(width * value)), y + 18], fill=POINT)
        plot.draw.text((206 + int(width * value), y + 3), f"{value:.2f}", fill=plot.ink, font=plot.font)
    plot.image.save(path)
    return {k: float(v) for k, v in importances.items()}


def best_grid_png(out: Path, ranked: list[Any], path: Path, cell: int = 160) -> None:
    """The evaluation images of the best trials side by side, one row per trial (best first)."""
    rows = []
    for place, t in enumerate(ranked):
        settings = t.user_attrs.get("settings") or {}
        lines = [
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(settings.items())[:5]
        ]
        rows.append(
            (
                f"#{place + 1}: trial {t.number}",
                t.user_attrs.get("scores") or {},
                lines,
                out / str(t.user_attrs.get("folder") or "") / "eval",
            )
        )
    best_grid_png_rows(rows, path, "best trials (rows), evaluation images (columns: scene x seed)", cell)


def best_grid_png_rows(
    rows: Sequence[tuple[str, dict[str, Any], list[str], Path]], path: Path, title: str, cell: int = 160
) -> None:
    """A sheet with one row per (label, scores, extra lines, folder holding images.json) and its images."""
    from PIL import Image, ImageDraw, ImageOps

    from charforge.engine.score.render import BACKGROUND, INK, load_font

    loaded = []
    for label, scores, lines, folder in rows:
        files: list[Path] = []
        with contextlib.suppress(OSError, ValueError):
            files = [folder / f for f in json.loads((folder / "images.json").read_text(encoding="utf-8"))]
        loaded.append((label, scores, lines, files))
    columns = max((len(files) for *_, files in loaded), default=1) or 1
    label_width = 230
    sheet = Image.new(
        "RGB", (label_width + columns * (cell + 6) + 6, 40 + max(1, len(loaded)) * (cell + 8)), BACKGROUND
    )
    draw = ImageDraw.Draw(sheet)
    font = load_font(12)
    draw.text((8, 10), title, fill=INK, font=load_font(15))
    for r, (label, scores, lines, files) in enumerate(loaded):
        y = 40 + r * (cell + 8)
        text = [
            label,
            *(
                f"{k} {scores[k]:.3f}"
                for k in ("combined", "identity", "text", "diversity", "cmmd")
                if isinstance(scores.get(k), (int, float))
            ),
            *lines,
        ]
        for i, line in enumerate(text[:10]):
            draw.text((8, y + i * 15), line[:34], fill=INK, font=font)
        for c, file in enumerate(files):
            with contextlib.suppress(OSError):
                with Image.open(file) as picture:
                    tile = ImageOps.contain(
                        picture.convert("RGB"), (cell, cell)
                    )  # small renders scaled up too
                sheet.paste(tile, (label_width + c * (cell + 6), y))
    sheet.save(path)


# ---- the files ----------------------------------------------------------------------------------------------


def _trial_row(t: Any) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name.lower(),
        "values": list(t.values) if t.values else None,
        "params": dict(t.params),
        **{
            k: t.user_attrs.get(k)
            for k in (
                "settings",
                "scores",
                "server",
                "lora",
                "folder",
                "cost",
                "seconds",
                "error",
                "pruned_at",
                "grid",
            )
        },
        "intermediate": {str(k): v for k, v in t.intermediate_values.items()},
    }


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `name_2`, `name_3`, ... when taken (nothing is replaced)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, n = folder / name, 2
    while candidate.exists():
        candidate, n = folder / f"{stem}_{n}{suffix}", n + 1
    return candidate


def default_loras_dir() -> Path | None:
    """``$CHARFORGE_MODELS_DIR/loras`` or ``$COMFYUI_DIR/models/loras`` (None when neither is set)."""
    if os.environ.get("CHARFORGE_MODELS_DIR"):
        return Path(os.environ["CHARFORGE_MODELS_DIR"]).expanduser() / "loras"
    if os.environ.get("COMFYUI_DIR"):
        return Path(os.environ["COMFYUI_DIR"]).expanduser() / "models" / "loras"
    return None


def fetch_lora(server: Any, run: str, lora: str, dest_dir: Path) -> Path:
    """Download a trained LoRA from its server's run folder (``output/charforge/train_runs/<run>/``)."""
    from charforge.driver.client import ComfyClient
    from charforge.driver.outputs import OutputFile

    staging = dest_dir / ".charforge_download"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        with ComfyClient(server.config) as client:
            got = client.download(
                OutputFile("", "lora", 0, f"{run}.safetensors", f"charforge/train_runs/{run}", "output"),
                staging,
            )
        target = _free_name(dest_dir, lora)
        os.replace(got.path, target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _earlier_best(path: Path) -> dict[str, Any]:
    import yaml

    with contextlib.suppress(OSError, yaml.YAMLError):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
    return {}


def save_best(tuner: Any, best: Any, character: Any) -> tuple[Path | None, str | None, list[str]]:
    """Copy the best LoRA into the loras folder and write a preset for it; (LoRA path, preset line, notes)."""
    import dataclasses

    from charforge.common.characters import CharacterLora
    from charforge.engine.library.characters import save_character

    notes: list[str] = []
    earlier = _earlier_best(tuner.out / BEST_YAML)
    if (
        earlier.get("trial") == best.number
        and earlier.get("copied_to")
        and Path(earlier["copied_to"]).is_file()
    ):
        return (
            Path(earlier["copied_to"]),
            earlier.get("preset"),
            notes,
        )  # an earlier run saved this one already
    folder = Path(tuner.loras_dir).expanduser() if tuner.loras_dir else default_loras_dir()
    lora, run, home = best.user_attrs.get("lora"), best.user_attrs.get("run"), best.user_attrs.get("server")
    server = next((s for s in tuner.servers if s.name == home), None)
    if folder is None:
        return (
            None,
            None,
            ["the best LoRA was not copied: give --loras-dir (or set CHARFORGE_MODELS_DIR / COMFYUI_DIR)"],
        )
    if not lora or not run or server is None or server.config is None:
        return (
            None,
            None,
            [f"the best LoRA stays on {home} as {lora} (it can be downloaded from ComfyUI servers only)"],
        )
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = fetch_lora(server, run, lora, folder)
    except Exception as exc:  # noqa: BLE001 - a report is still written
        return None, None, [f"the best LoRA could not be downloaded from {home}: {exc}"]
    base = f"{character.name}_tuned"
    name, n = base, 2
    preset = dataclasses.replace(
        character,
        name=name,
        display_name=f"{character.display_name or character.name} (tuned, trial {best.number})",
        loras=[CharacterLora(path.name, tuner.spec.eval.strength)],
    )
    while True:
        try:
            written = save_character(preset, folder=tuner.characters_dir)
            break
        except FileExistsError:
            name, n = f"{base}_{n}", n + 1
            preset = dataclasses.replace(preset, name=name)
    return path, f"character {name!r} saved to {written}", notes


def write_outputs(tuner: Any, study: Any, result: Any, character: Any, runner: Any) -> None:
    """Write everything listed in the module docstring into the search folder and fill in `result`."""
    import yaml

    spec, out = tuner.spec, tuner.out
    folder = out / REPORT
    folder.mkdir(parents=True, exist_ok=True)
    trials = finished_trials(study)
    metrics, directions = front_metrics(spec)
    front = pareto_front(trials, metrics, directions)
    pareto_png(trials, front, folder / "pareto.png")
    history_png(study, spec, folder / "history.png")
    importances = importances_png(study, spec, folder / "importances.png")
    best = best_trial(study, spec)
    first = spec.objectives[0]
    sign = -1 if spec.directions[0] == "maximize" else 1
    ranked = sorted(
        trials, key=lambda t: (sign * ((t.user_attrs.get("scores") or {}).get(first) or 0.0), t.number)
    )
    if best is not None:
        ranked = [best, *[t for t in ranked if t.number != best.number]]
    best_grid_png(out, ranked[:4], folder / "best_grid.png")
    rows = [_trial_row(t) for t in study.get_trials(deepcopy=False)]
    _write_text(
        out / TRIALS_JSON,
        json.dumps(
            {
                "study": spec.name,
                "objectives": spec.objectives,
                "directions": spec.directions,
                "importances": importances,
                "pareto_front": [t.number for t in front],
                "trials": rows,
            },
            indent=1,
            default=str,
        )
        + "\n",
    )
    if best is not None:
        lora_path, preset, notes = save_best(tuner, best, character)
        result.best_lora, result.preset = lora_path, preset
        result.notes += notes
        data = {
            "study": spec.name,
            "trial": best.number,
            "settings": best.user_attrs.get("settings"),
            "scores": best.user_attrs.get("scores"),
            "lora": best.user_attrs.get("lora"),
            "server": best.user_attrs.get("server"),
            "copied_to": str(lora_path) if lora_path else None,
            "preset": preset,
            "objectives": spec.objectives,
        }
        _write_text(
            out / BEST_YAML, yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)
        )
        result.best_yaml = out / BEST_YAML
    _write_text(out / HTML, _html(spec, result, rows, best, front, importances))
    result.report = out / HTML


def _html(
    spec: Any,
    result: Any,
    rows: list[dict[str, Any]],
    best: Any,
    front: list[Any],
    importances: dict[str, float],
) -> str:
    e = html.escape
    front_numbers = {t.number for t in front}
    score_keys = ["combined", "identity", "text", "diversity", "cmmd", "kid", "copying", "fid"]
    params = [p.name for p in spec.space]
    head = "".join(
        f"<th>{e(h)}</th>"
        for h in ["trial", "state", "server", *params, *score_keys, "seconds", "cost", "note"]
    )
    body = []
    for row in rows:
        scores = row.get("scores") or {}
        settings = row.get("settings") or {}
        mark = " class='front'" if row["number"] in front_numbers else ""
        cells = [
            str(row["number"]) + (" ★" if best is not None and row["number"] == best.number else ""),
            row["state"],
            row.get("server") or "",
            *[_fmt(settings.get(p)) for p in params],
            *[_fmt(scores.get(k)) for k in score_keys],
            _fmt(row.get("seconds")),
            _fmt(row.get("cost")),
            (
                row.get("error")
                or (
                    f"pruned after segment {max(map(int, row['intermediate']))}"
                    if row["state"] == "pruned" and row["intermediate"]
                    else ""
                )
            )[:160],
        ]
        grid = row.get("grid")
        if grid:
            cells[0] = f"<a href='{e(grid)}'>{cells[0]}</a>"
            rest = "".join(f"<td>{e(c)}</td>" for c in cells[1:])
            body.append(f"<tr{mark}><td>{cells[0]}</td>{rest}</tr>")
        else:
            body.append(f"<tr{mark}>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    best_text = "no trial finished yet"
    if best is not None:
        best_text = (
            f"trial {best.number}: "
            + ", ".join(f"{k}={_fmt(v)}" for k, v in (best.user_attrs.get("settings") or {}).items())
            + f" &mdash; LoRA {e(str(best.user_attrs.get('lora')))}"
        )
    space = "".join(f"<li><b>{e(p.name)}</b>: {e(p.describe())}</li>" for p in spec.space)
    notes = "".join(f"<li>{e(n)}</li>" for n in result.notes)
    imp = ", ".join(f"{e(k)} {v:.2f}" for k, v in importances.items()) or "not enough trials"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>charforge tune: {e(spec.name)}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}} tr.front{{background:#fff3e0}}
img{{max-width:100%;border:1px solid #ddd;margin:6px 0}}</style></head><body>
<h1>charforge tune: {e(spec.name)}</h1>
<p>character <b>{e(spec.character)}</b>; objectives {e(", ".join(f"{o} ({d})" for o, d in zip(spec.objectives, spec.directions, strict=True)))};
sampler {e(spec.sampler)}; {result.trials} trial(s) finished ({result.complete} complete, {result.pruned} pruned,
{result.failed} failed); {e(result.stopped)}.</p>
<h2>Best</h2><p>{best_text}</p><p>settings: <code>{BEST_YAML}</code>; every trial: <code>{TRIALS_JSON}</code></p>
<h2>Search space</h2><ul>{space}</ul>
<h2>Pareto front</h2><img src="{REPORT}/pareto.png" alt="Pareto front">
<h2>Score over trials</h2><img src="{REPORT}/history.png" alt="history">
<h2>Parameter importances</h2><p>{imp}</p><img src="{REPORT}/importances.png" alt="importances">
<h2>Best trials' images</h2><img src="{REPORT}/best_grid.png" alt="best trials">
<h2>Trials</h2><p>Rows on the Pareto front are shaded; ★ is the best; a trial number links to its evaluation grid.</p>
<table><tr>{head}</tr>{"".join(body)}</table>
<h2>Notes</h2><ul>{notes or "<li>none</li>"}</ul>
<p>What the scores mean and their limits on small sets: docs/tune.md.</p>
</body></html>
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
