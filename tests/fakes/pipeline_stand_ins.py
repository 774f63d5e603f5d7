"""Stand-ins for ``charforge pipeline`` runs whose stages go to a fake server: a Runner answering each prompt
with what the nodes would show (and one output file), a client whose server has CharForge, tiny models, and
the dataset and caption stages writing what those nodes write (kohya exports with manifests and reports)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fakes.charforge_routes import tiny_models


class DatasetStages:
    """What the dataset and caption nodes write under ``output/charforge/datasets`` and the texts they show;
    no prompt may train on this server (training happens elsewhere)."""

    def __init__(self, output_dir: Path):
        self.root = output_dir / "charforge" / "datasets"
        self.prompts: list[dict[str, Any]] = []

    def __call__(self, prompt: dict[str, Any]) -> dict[str, str]:
        classes = {n["class_type"] for n in prompt.values()}
        self.prompts.append(prompt)
        assert "CharForgeTrainLoRA" not in classes  # training happens on the remote trainer
        if "CharForgeLoadDataset" in classes:
            captioning = "CharForgeCaptionDataset" in classes
            source = Path(prompt["1"]["inputs"]["folder"])
            name = "pip_captioned" if captioning else "pip"
            export = self.root / name / ("captioned" if captioning else "kohya")
            img = export / "img" / "10_zqx cartoon boy"
            img.mkdir(parents=True, exist_ok=True)
            entries = []
            for i, picture in enumerate(sorted(source.rglob("*.png")), 1):
                (img / f"{i:04d}.png").write_bytes(picture.read_bytes())
                if captioning:
                    (img / f"{i:04d}.txt").write_text(f"zqx, cartoon boy, tag{i}")
                entries.append(
                    {"id": f"{i:04d}", "source": str(picture), "file": f"img/{img.name}/{i:04d}.png"}
                )
            (export / "manifest.json").write_text(json.dumps({"entries": entries}))
            report = self.root / name / "report"
            report.mkdir(parents=True, exist_ok=True)
            (report / "report.html").write_text("<p>report</p>")
            exported = f"{len(entries)} image(s) exported to {img} ({len(entries)} written)"
            if captioning:
                return {"2": "captioned", "3": exported, "4": f"report: {report / 'report.html'}"}
            return {"6": exported, "7": f"report: {report / 'report.html'}"}
        return {"10": "scored", "11": "kept 1"}


def use_stand_ins(
    monkeypatch: Any, answer: Callable[[dict[str, Any]], dict[str, str]], server: Any = None
) -> None:
    """Patch the pipeline: each prompt's node texts come from `answer` (one file.png per output folder), the
    server has CharForge, the models are tiny; with `server`, the pipeline runs on that ``pipeline.Server``."""
    from charforge.driver.client import ComfyClient
    from charforge.recipes import pipeline

    class Runner(pipeline.Runner):
        def run(self, prompt, out_dir, previews=None):
            texts = answer(prompt)
            files = []
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                files = [out_dir / "file.png"]
                files[0].write_bytes(b"png")
            return None, texts, files

    class Client(ComfyClient):
        def object_info(self, refresh: bool = False):
            return {"CharForgeTrainLoRA": {}}

    monkeypatch.setattr(pipeline, "ComfyClient", Client)
    monkeypatch.setattr(pipeline, "Runner", Runner)
    monkeypatch.setattr(pipeline, "choose_models", lambda *a: tiny_models(pipeline))
    if server is not None:
        monkeypatch.setattr(pipeline, "acquire_server", lambda opts, say: server)


def pipeline_argv(photos: Path, out: Path, url: str, *extra: str) -> list[str]:
    """``charforge pipeline`` for character 'pip' (trigger zqx, class cartoon boy) on the server at `url`, no face
    check, nothing installed, plain progress, then `extra`."""
    return [
        "pipeline",
        str(photos),
        "--out",
        str(out),
        "--server",
        url,
        "--character",
        "pip",
        "--trigger",
        "zqx",
        "--class",
        "cartoon boy",
        "--no-face-check",
        "--no-install",
        "--progress",
        "plain",
        *extra,
    ]
