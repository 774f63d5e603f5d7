"""Running ``charforge lora eval``: the grid through the batch runner, each image scored as it arrives."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from charforge.common.characters import join_prompt
from charforge.driver.batch import BatchPlan
from charforge.driver.errors import UsageError

from ..names import ascii_name
from .plan import (
    FORMAT,
    GRID_NAME,
    IMAGE_SUFFIXES,
    LORA,
    RENDERS,
    RESULTS_NAME,
    TABLE_NAME,
    VERSION,
    EvalImage,
    EvalOptions,
    EvalResult,
    _round,
    _unique,
    check_server,
    eval_graph,
    load_character,
    plan_grid,
)
from .scoring import Scoring, summarise
from .sheet import _cell, draw_grid, strength_label, table_text

# --------------------------------------------------------------------------------------------------
# Running


def first_image(files: list[Path]) -> Path | None:
    """The first existing image among a job's downloaded files."""
    return next((f for f in files if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()), None)


def _server_for_batch(client: Any, options: EvalOptions) -> Any:
    config = client.config
    if options.verify_tls is not None and options.verify_tls != config.verify_tls:
        config = dataclasses.replace(config, verify_tls=options.verify_tls)
    return config


def _render(
    plan: BatchPlan, server: Any, out: Path, options: EvalOptions, note: Callable[[str], None]
) -> Iterator[Any]:
    """Run the plan with the batch runner; yields each job's outcome as it ends (earlier runs' first).

    A rerun of the same grid on the same folder resumes: finished images are kept, failed ones are tried again.
    """
    from charforge.driver.batch import Batch

    yield from Batch(plan, base=out).run(
        servers=[server],
        out=out,
        capacity=options.window,
        timeout=options.timeout,
        retry_failed=True,
        contact_sheet=None,
        on_message=note,
    )


def check_resumable(plan: BatchPlan, renders: Path, out_dir: Path) -> None:
    """Refuse a folder that holds the renders of another grid (another LoRA, character setting, strength, prompt
    or seed list): its job folders are named after the axes only and would be taken for this grid's images."""
    from charforge.driver.batch.journal import JOURNAL_NAME, replay
    from charforge.driver.batch.plan import plan_hash

    journal = renders / JOURNAL_NAME
    if not journal.is_file():
        return
    recorded = replay(journal).plan_hash
    if recorded is not None and recorded != plan_hash(plan, renders):
        raise UsageError(
            f"{out_dir} holds the evaluation of a different grid (other LoRA, checkpoint, character "
            f"settings, strengths, prompts or seeds); use another --out, or delete {renders} to "
            f"render this one there"
        )


class LoraEval:
    """One ``charforge lora eval`` run: check, render the grid, score, write grid.png, results.json, table.md."""

    def __init__(
        self,
        client: Any,
        character: Any,
        lora: str,
        options: EvalOptions,
        out_dir: str | Path,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.client, self.character, self.lora, self.options = client, character, lora, options
        self.out_dir = Path(out_dir)
        self.note = note or (lambda text: None)
        self.strengths = sorted(_unique([float(s) for s in options.strengths]))
        self.scenes = _unique([s.strip() for s in options.scenes if s.strip()])
        self.seeds = _unique([int(s) for s in options.seeds])
        if not self.strengths or not self.scenes or not self.seeds:
            raise UsageError("lora eval needs at least one strength, one prompt and one seed")
        bad = [s for s in self.seeds if not 0 <= s < 2**64]
        if bad:
            raise UsageError(f"--seeds must be 0 .. 2^64-1, got {bad[0]}")
        if (
            options.identity_weight < 0
            or options.text_weight < 0
            or options.identity_weight + options.text_weight <= 0
        ):
            raise UsageError("--identity-weight and --text-weight must be >= 0 and not both 0")

    def prompt_texts(self) -> list[tuple[str, str]]:
        """(full prompt sent, text CLIP scores against) per scene."""
        return [
            (self.character.prompt_text(scene), join_prompt(self.character.prompt, scene))
            for scene in self.scenes
        ]

    def run(self) -> EvalResult:
        scoring = Scoring.check(self.character, self.options)
        info = self.client.object_info()
        lora, checkpoint = check_server(info, self.lora, self.options.checkpoint, self.client.url, self.note)
        texts = self.prompt_texts()
        prefix = (
            f"charforge_eval/{ascii_name(self.character.name, 'lora')}_{ascii_name(Path(lora).stem, 'lora')}"
        )
        graph = eval_graph(
            self.character,
            lora=lora,
            checkpoint=checkpoint,
            strength=self.strengths[-1],
            prompt=texts[0][0],
            seed=self.seeds[0],
            save_prefix=prefix,
        )
        # The driver's preflight against /object_info (sampler and scheduler names, sizes, the strength range)
        # before anything is queued; the lowest and highest strength bound the others.
        for strength in {self.strengths[0], self.strengths[-1]}:
            self.client.prepare_run(
                graph,
                sets=[f"{LORA}.strength_model={strength!r}", f"{LORA}.strength_clip={strength!r}"],
                preflight=True,
                upload=False,
            )
        fulls = [full for full, _ in texts]
        if len(set(fulls)) < len(fulls):
            raise UsageError(f"two prompts give the same text once the character's prompt is added: {fulls}")
        plan = plan_grid(
            graph, self.strengths, fulls, self.seeds, name=f"lora eval {lora} on {self.character.name}"
        )
        renders = self.out_dir / RENDERS
        check_resumable(plan, renders, self.out_dir)
        scoring.load(self.note)
        self.note(
            f"identity reference: {scoring.identity_source} ({scoring.analyzer.name}, threshold "
            f"{scoring.threshold:.3f}); text agreement: {scoring.clip_name or 'not scored'}"
        )
        index = {full: i for i, (full, _) in enumerate(texts)}
        images: dict[str, EvalImage] = {}
        for job in plan.jobs:
            full = job.axes["prompt"]
            images[job.id] = EvalImage(
                float(job.axes["strength"]),
                index[full],
                int(job.axes["seed"]),
                full,
                texts[index[full]][1],
                job.id,
            )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        total = len(plan.jobs)
        self.note(
            f"rendering {total} image(s): {len(self.strengths)} strength(s) x {len(self.scenes)} prompt(s) x "
            f"{len(self.seeds)} seed(s) of {lora} on {checkpoint} ({self.client.url}); folder {renders}"
        )
        finished = 0
        for outcome in _render(
            plan, _server_for_batch(self.client, self.options), renders, self.options, self.note
        ):
            image = images.get(outcome.job.id)
            if image is None:
                continue
            finished += 1
            self._collect(image, outcome, scoring)
            where = f"[{finished}/{total}] strength {strength_label(image.strength)}, P{image.prompt_index + 1}, seed {image.seed}"
            if image.state != "done":
                self.note(
                    f"{where}: {image.state} ({(image.error or '').splitlines()[0] if image.error else ''})"
                )
            else:
                self.note(
                    f"{where}: identity {_cell(image.identity)}"
                    + (f" ({image.identity_note})" if image.identity is None else "")
                    + f", text {_cell(image.text)}"
                    + (" (earlier run)" if outcome.skipped else "")
                )
        ordered = [images[job.id] for job in plan.jobs]
        return self._write(ordered, scoring, lora, checkpoint)

    def _collect(self, image: EvalImage, outcome: Any, scoring: Scoring) -> None:
        image.state = outcome.state
        if not outcome.ok:
            image.error = outcome.reason or outcome.state
            return
        image.file = first_image(list(outcome.files))
        if image.file is None:
            image.state, image.error = "failed", "the job wrote no image"
            return
        try:
            scoring.score(image)
        except (OSError, ValueError) as exc:  # an unreadable download
            image.state, image.error = "failed", f"cannot score {image.file.name}: {exc}"

    def _write(self, images: list[EvalImage], scoring: Scoring, lora: str, checkpoint: str) -> EvalResult:
        options = self.options
        weights = (options.identity_weight, options.text_weight if scoring.clip is not None else 0.0)
        summaries, best = summarise(images, self.strengths, weights[0], weights[1], scoring.threshold)
        if scoring.clip is not None and weights[1] > 0:
            combined = (
                f"combined = ({weights[0]:g} x identity + {weights[1]:g} x 2.5 x max(text, 0)) / "
                f"{weights[0] + weights[1]:g}, means over the row; images without a face count 0 identity"
            )
        else:
            combined = (
                "combined = mean identity over the row, images without a face counting 0; text not scored"
            )
        failed = sum(1 for image in images if image.state != "done")
        gen = self.character.generation
        title = (
            f"LoRA {lora} on {self.character.display_name or self.character.name} ({checkpoint}, "
            f"{gen.steps} steps, cfg {gen.cfg:g}, {gen.sampler}/{gen.scheduler})"
        )
        if best is not None:
            title += f" - best strength {strength_label(best.strength)}"
        grid = draw_grid(
            images,
            self.strengths,
            self.scenes,
            self.seeds,
            summaries,
            best,
            title,
            (gen.width, gen.height),
            options.cell,
            combined,
        )
        grid_path = self.out_dir / GRID_NAME
        grid.save(grid_path)
        table = table_text(summaries, best)
        verdict = (
            f"best strength: {strength_label(best.strength)} (combined {best.combined:.4f})"
            if best is not None
            else "no strength could be scored (no image was rendered)"
        )
        table_path = self.out_dir / TABLE_NAME
        prompts = "\n".join(f"- P{i + 1}: {full}" for i, (full, _) in enumerate(self.prompt_texts()))
        table_path.write_text(
            f"# {title}\n\n{table}\n\n{verdict}\n\n{combined}; ties go to the lower strength.\n\n"
            f"Prompts (seeds {', '.join(map(str, self.seeds))}):\n{prompts}\n",
            encoding="utf-8",
        )
        results_path = self.out_dir / RESULTS_NAME
        data = {
            "format": FORMAT,
            "version": VERSION,
            "lora": lora,
            "character": self.character.name,
            "checkpoint": checkpoint,
            "server": self.client.url,
            "strengths": self.strengths,
            "seeds": self.seeds,
            "prompts": [
                {"index": i + 1, "scene": scene, "prompt": full, "scored_text": text}
                for i, (scene, (full, text)) in enumerate(zip(self.scenes, self.prompt_texts(), strict=True))
            ],
            "negative_prompt": self.character.negative_prompt,
            "generation": gen.to_dict(),
            "scoring": {
                "face_models": scoring.analyzer.name,
                "identity": scoring.identity.name,
                "identity_source": scoring.identity_source,
                "threshold": _round(scoring.threshold),
                "clip": scoring.clip_name,
                "identity_weight": weights[0],
                "text_weight": weights[1],
                "combined": combined,
                "ties": "lower strength",
            },
            "best_strength": best.strength if best is not None else None,
            "per_strength": [s.to_dict() for s in summaries],
            "images": [image.to_dict(self.out_dir) for image in images],
            "grid": GRID_NAME,
            "table": TABLE_NAME,
            "renders": RENDERS,
            "failed": failed,
        }
        tmp = results_path.with_name(results_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, results_path)
        return EvalResult(
            self.out_dir,
            lora,
            self.character.name,
            checkpoint,
            images,
            summaries,
            best,
            grid_path,
            results_path,
            table_path,
            f"{table}\n{verdict}",
            failed,
        )


def evaluate_lora(
    client: Any,
    character: str | Any,
    lora: str,
    out_dir: str | Path,
    options: EvalOptions | None = None,
    note: Callable[[str], None] | None = None,
) -> EvalResult:
    """Render and score `lora` on `character` (a preset name or a loaded preset) through `client`'s server.

    Raises :class:`~charforge.driver.errors.UsageError` for a bad request (unknown character, LoRA or checkpoint
    not on the server, scoring models or packages missing) before anything is rendered.
    """
    if isinstance(character, (str, os.PathLike)):
        character = load_character(str(character))
    return LoraEval(client, character, lora, options or EvalOptions(), out_dir, note).run()
