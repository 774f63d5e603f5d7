"""``charforge lora eval`` against the loopback fake ComfyUI, scored locally with tiny face models and a tiny CLIP.

The fake server gets ComfyUI's LoraLoader and a SaveImage whose picture depends on the LoRA strength in the graph
it runs: a face of the character's own person at one strength (the planted best), faces of other persons at
others, no face at all at the lowest. So the identity scores, and with them the best strength, are known in
advance, while the CLIP scores come from a real (tiny, random) CLIP model.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fakes.comfy_server import FakeComfyServer, NodeFailure, lora_loader
from PIL import Image

from cf_testing.cli import run_charforge as run_cli
from cf_testing.face_models import blank_image, face_image, use_scoring_models, write_scoring_models
from charforge.driver.workflow import apply_overrides, parse_set
from charforge.engine.library.characters import load_character
from charforge.recipes.lora_eval import (
    GENERATION_NODES,
    EvalImage,
    eval_graph,
    grid_layout,
    plan_grid,
    summarise,
    table_text,
)

pytest.importorskip("insightface")

# strength -> person rendered (0 is the character's own person; None: no face in the picture)
PLANTED = {0.4: None, 0.6: 3, 0.8: 0, 1.0: 1}
PLANTED_BEST = 0.8
SIZE = 320
LORAS = ["hero.safetensors", "styles/film_grain.safetensors"]


async def _save_planted(ctx, images, filename_prefix, **_hidden):
    """SaveImage that draws the person PLANTED for the graph's LoRA strength (noise varies with the seed)."""
    nodes = ctx.prompt.values()
    strength = next(n["inputs"]["strength_model"] for n in nodes if n["class_type"] == "LoraLoader")
    seed = next(n["inputs"]["seed"] for n in nodes if n["class_type"] == "KSampler")
    if ctx.server.fail_strength == strength:
        raise NodeFailure(f"planted failure at strength {strength}")
    person = PLANTED[round(float(strength), 3)]
    size = (images.width, images.height)
    rgb = (
        blank_image(size)
        if person is None
        else face_image(size, faces=((144, 144, 128),), person=person, noise=2, seed=seed)
    )
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return (), {"images": [ctx.server._write_output(filename_prefix, "png", buffer.getvalue())]}


class EvalServer(FakeComfyServer):
    """The fake ComfyUI plus LoraLoader (with LORAS in its list) and the planted SaveImage."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.fail_strength: float | None = None  # SaveImage raises for graphs with this LoRA strength
        self.nodes["LoraLoader"] = lora_loader(LORAS)
        self.nodes["SaveImage"] = dataclasses.replace(self.nodes["SaveImage"], run=_save_planted)

    def graphs(self) -> list[dict]:
        return [prompt for _, prompt in self.executed]

    def prompt_posts(self) -> int:
        return sum(1 for r in self.requests if r.method == "POST" and r.path.endswith("/prompt"))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder with a tiny InsightFace pack (models/insightface) and a tiny CLIP (models/clip_vision)."""
    return write_scoring_models(tmp_path_factory.mktemp("eval-models"))


@pytest.fixture
def env(no_comfy, monkeypatch, models, tmp_path):
    """Plain Python with the models above; characters in tmp_path/charforge/characters; reference photos."""
    use_scoring_models(monkeypatch, models, tmp_path)
    refs = tmp_path / "refs"
    refs.mkdir()
    for seed in range(3):
        Image.fromarray(
            face_image((SIZE, SIZE), faces=((144, 144, 128),), person=0, noise=2, seed=100 + seed)
        ).save(refs / f"ref{seed}.png")
    (refs / "notes.txt").write_text("not a photo")
    write_character(tmp_path, "hero", reference_photos=str(refs))
    return tmp_path


def write_character(base: Path, name: str, **fields) -> Path:
    import yaml

    data = {
        "display_name": name.title(),
        "trigger_words": ["hero_cf"],
        "loras": [{"name": "hero.safetensors", "weight": 0.9}],
        "prompt": "photo of a woman",
        "negative_prompt": "blurry, deformed",
        "threshold": 0.5,
        "generation": {
            "steps": 12,
            "cfg": 5.5,
            "width": SIZE,
            "height": SIZE,
            "sampler": "dpmpp_2m",
            "scheduler": "karras",
        },
        **fields,
    }
    folder = base / "charforge" / "characters"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


SCENES = ["portrait, looking at the camera", "walking in a park"]


def lora_eval(lora: str, character: str, *options: str) -> tuple[int, str, str]:
    """``charforge lora eval LORA --character CHARACTER OPTIONS`` in this process."""
    return run_cli("lora", "eval", lora, "--character", character, *options)


def eval_args(server: FakeComfyServer, out: Path, *extra: str) -> list[str]:
    args = [
        "lora",
        "eval",
        "hero.safetensors",
        "--character",
        "hero",
        "--server",
        server.url,
        "--strengths",
        "1.0,0.4,0.8,0.6",
        "--seeds",
        "7,8",
        "--checkpoint",
        "v1-5-pruned-emaonly.safetensors",
        "--out",
        str(out),
        "--cell",
        "96",
        "--det-size",
        "320",
    ]
    for scene in SCENES:
        args += ["--prompt", scene]
    return args + list(extra)


# ---- the whole command -------------------------------------------------------------------------------------


def test_eval_renders_the_grid_scores_it_and_picks_the_planted_best(env):
    out = env / "eval"
    with EvalServer() as server:
        code, stdout, stderr = run_cli(*eval_args(server, out))
        graphs = server.graphs()
        assert code == 0, stderr

        # --- what was rendered: one graph per cell, ComfyUI's own nodes, the preset's settings ---
        assert len(graphs) == 4 * 2 * 2
        cells: dict[float, set] = {}
        for graph in graphs:
            assert {n["class_type"] for n in graph.values()} == set(GENERATION_NODES)
            by_class = {
                n["class_type"]: n["inputs"] for n in graph.values() if n["class_type"] != "CLIPTextEncode"
            }
            lora, sampler = by_class["LoraLoader"], by_class["KSampler"]
            assert lora["lora_name"] == "hero.safetensors" and lora["strength_model"] == lora["strength_clip"]
            assert by_class["CheckpointLoaderSimple"]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
            assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
                12,
                5.5,
                "dpmpp_2m",
                "karras",
            )
            assert (by_class["EmptyLatentImage"]["width"], by_class["EmptyLatentImage"]["height"]) == (
                SIZE,
                SIZE,
            )
            texts = {n["inputs"]["text"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"}
            positive = graph[sampler["positive"][0]]["inputs"]["text"]
            assert graph[sampler["negative"][0]]["inputs"]["text"] == "blurry, deformed" and positive in texts
            assert positive.startswith("hero_cf, photo of a woman, ")
            cells.setdefault(lora["strength_model"], set()).add((positive, sampler["seed"]))
        # every strength renders the same prompts with the same seeds
        assert sorted(cells) == [0.4, 0.6, 0.8, 1.0]
        expected = {(f"hero_cf, photo of a woman, {scene}", seed) for scene in SCENES for seed in (7, 8)}
        assert all(found == expected for found in cells.values())

        # --- results.json ---
        results = json.loads((out / "results.json").read_text())
        assert results["strengths"] == [0.4, 0.6, 0.8, 1.0] and results["seeds"] == [7, 8]
        assert results["best_strength"] == PLANTED_BEST
        assert results["scoring"]["face_models"] == "insightface:buffalo_l" and results["scoring"]["clip"]
        assert [p["scene"] for p in results["prompts"]] == SCENES
        assert results["prompts"][0]["scored_text"] == f"photo of a woman, {SCENES[0]}"  # no trigger word
        images = results["images"]
        assert len(images) == 16 and all(i["state"] == "done" and (out / i["file"]).is_file() for i in images)
        assert [(i["strength"], i["prompt_index"], i["seed"]) for i in images[:4]] == [
            (0.4, 1, 7),
            (0.4, 1, 8),
            (0.4, 2, 7),
            (0.4, 2, 8),
        ]
        for image in images:
            person = PLANTED[image["strength"]]
            assert isinstance(image["text"], float)
            if person is None:
                assert image["identity"] is None and image["identity_note"] == "no face found"
            elif person == 0:
                assert image["identity"] > 0.99 and image["identity_passed"]
            else:
                assert image["identity"] < 0.9
        # the per-strength combined score is the documented formula over the per-image scores
        for row in results["per_strength"]:
            mine = [i for i in images if i["strength"] == row["strength"]]
            identity = sum(i["identity"] or 0.0 for i in mine) / len(mine)
            text = sum(i["text"] for i in mine) / len(mine)
            assert row["combined"] == pytest.approx((identity + 0.5 * 2.5 * max(text, 0.0)) / 1.5, abs=2e-3)
            assert row["images"] == 4 and row["faces"] == (0 if PLANTED[row["strength"]] is None else 4)

        # --- the table, printed and saved ---
        assert "best strength: 0.8" in stdout and "| 0.8 " in stdout and "best" in stdout
        table = (out / "table.md").read_text()
        assert "| strength |" in table and "best strength: 0.8" in table and "P2: hero_cf" in table

        # --- the grid: rows = strengths, columns = prompt x seed, each cell the image of that cell ---
        layout = grid_layout(4, 4, (SIZE, SIZE), 96, legend_lines=len(SCENES) + 1)
        with Image.open(out / "grid.png") as grid:
            grid = grid.convert("RGB")
        assert grid.size == layout.size
        for image in images:
            row = results["strengths"].index(image["strength"])
            column = (image["prompt_index"] - 1) * 2 + [7, 8].index(image["seed"])
            cell = np.asarray(grid.crop(layout.image_box(row, column)), dtype=np.float32)
            with Image.open(out / image["file"]) as picture:
                source = np.asarray(
                    picture.convert("RGB").resize(layout.thumb, Image.Resampling.LANCZOS), dtype=np.float32
                )
            assert np.abs(cell - source).mean() < 2.0, (row, column)
        blank = np.asarray(grid.crop(layout.image_box(0, 0)), dtype=np.float32)
        face = np.asarray(grid.crop(layout.image_box(2, 0)), dtype=np.float32)
        assert np.abs(blank - face).mean() > 20  # the check above can tell cells apart

        # --- rerunning resumes: nothing is rendered again, the answer is the same ---
        code, stdout, stderr = run_cli(*eval_args(server, out, "--json"))
        assert code == 0, stderr
        assert len(server.executed) == 16
        record = json.loads(stdout.strip().splitlines()[-1])
        assert (
            record["event"] == "result" and record["best_strength"] == PLANTED_BEST and record["failed"] == 0
        )


def test_identity_only_with_a_saved_identity(env, tmp_path):
    """--clip none scores identity only (combined = identity mean); the identity may be a saved .json."""
    from charforge.engine.faces import FaceAnalyzer
    from charforge.engine.score import build_identity, save_identity

    analyzer = FaceAnalyzer.load("buffalo_l", det_size=320)
    photos = [
        (p.name, np.asarray(Image.open(p).convert("RGB"))) for p in sorted((env / "refs").glob("*.png"))
    ]
    saved = save_identity(build_identity("hero", analyzer, photos), tmp_path / "identities")
    write_character(env, "hero", identity=str(saved))
    out = env / "eval"
    with EvalServer() as server:
        code, stdout, stderr = lora_eval(
            "hero.safetensors",
            "hero",
            "--server",
            server.url,
            "--strengths",
            "0.6,0.8",
            "--seeds",
            "3",
            "--clip",
            "none",
            "--prompt",
            "portrait",
            "--out",
            str(out),
            "--cell",
            "64",
            "--det-size",
            "320",
        )
    assert code == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert (
        results["scoring"]["clip"] is None
        and results["scoring"]["identity_source"] == "saved identity 'hero'"
    )
    assert results["best_strength"] == 0.8 and "v1-5-pruned-emaonly" in stderr  # default checkpoint, noted
    for row in results["per_strength"]:
        image = next(i for i in results["images"] if i["strength"] == row["strength"])
        assert image["text"] is None and row["combined"] == pytest.approx(image["identity"], abs=1e-3)


def test_failed_renders_are_reported_left_out_and_retried_on_rerun(env):
    out = env / "eval"
    args = [
        "lora",
        "eval",
        "hero.safetensors",
        "--character",
        "hero",
        "--strengths",
        "0.6,0.8",
        "--seeds",
        "5",
        "--prompt",
        "portrait",
        "--out",
        str(out),
        "--cell",
        "64",
        "--det-size",
        "320",
    ]
    with EvalServer() as server:
        server.fail_strength = 0.8
        code, stdout, stderr = run_cli(*args, "--server", server.url)
        assert code == 1 and "1 of 2 render(s) failed" in stdout and "planted failure" in stderr
        results = json.loads((out / "results.json").read_text())
        failed = next(i for i in results["images"] if i["strength"] == 0.8)
        assert failed["state"] == "failed" and "planted failure" in failed["error"] and failed["file"] is None
        row = next(r for r in results["per_strength"] if r["strength"] == 0.8)
        assert row["images"] == 0 and row["combined"] is None
        assert results["best_strength"] == 0.6 and results["failed"] == 1
        with Image.open(out / "grid.png") as grid:
            cell = np.asarray(
                grid.convert("RGB").crop(grid_layout(2, 1, (SIZE, SIZE), 64, 2).image_box(1, 0))
            )
        assert (cell.reshape(-1, 3)[:50] == cell.reshape(-1, 3)[0]).all()  # a plain grey "failed" cell

        server.fail_strength = None
        runs = len(server.executed)
        code, stdout, stderr = run_cli(*args, "--server", server.url)
        assert code == 0, stderr
        assert len(server.executed) == runs + 1  # only the failed cell is rendered again
        assert json.loads((out / "results.json").read_text())["best_strength"] == PLANTED_BEST

        # another grid in the same folder is refused (its job folders would be taken for this grid's images)
        code, _, stderr = run_cli(
            *[a if a != "0.6,0.8" else "0.6,0.8,1.0" for a in args], "--server", server.url
        )
        assert code == 2 and "holds the evaluation of a different grid" in stderr
        assert len(server.executed) == runs + 1


# ---- the graph and the sweep ---------------------------------------------------------------------------------


def test_plan_keeps_seeds_and_prompts_fixed_across_strengths(env):
    character = load_character("hero")
    graph = eval_graph(
        character,
        lora="hero.safetensors",
        checkpoint="base.safetensors",
        strength=1.0,
        prompt="p",
        seed=0,
        save_prefix="x",
    )
    plan = plan_grid(graph, [0.5, 1.0, 1.5], ["a", "b"], [11, 12, 13])
    assert len(plan.jobs) == 18 and len({job.id for job in plan.jobs}) == 18
    seen: dict[float, list] = {}
    for job in plan.jobs:
        applied, _ = apply_overrides(graph, [parse_set(o) for o in job.overrides])
        lora = applied["2"]["inputs"]
        assert lora["strength_model"] == lora["strength_clip"] == job.axes["strength"]
        seen.setdefault(job.axes["strength"], []).append(
            (applied["3"]["inputs"]["text"], applied["6"]["inputs"]["seed"])
        )
    assert list(seen) == [0.5, 1.0, 1.5]  # rows in order: strength, then prompt, then seed
    assert seen[0.5] == seen[1.0] == seen[1.5] == [(p, s) for p in "ab" for s in (11, 12, 13)]


def _image(
    strength: float, identity: float | None, text: float | None, job: str, state: str = "done"
) -> EvalImage:
    return EvalImage(
        strength,
        0,
        1,
        "p",
        "p",
        job,
        state=state,
        identity=identity,
        identity_passed=identity is not None and identity >= 0.5,
        text=text,
    )


def test_best_strength_ties_go_to_the_lower_strength_and_no_face_counts_zero():
    images = [
        _image(1.0, 0.7, 0.2, "a"),
        _image(1.0, 0.7, 0.2, "b"),
        _image(0.6, 0.7, 0.2, "c"),
        _image(0.6, 0.7, 0.2, "d"),
        _image(0.8, 0.9, 0.2, "e"),
        _image(0.8, None, 0.2, "f"),
        _image(0.4, None, None, "g", state="failed"),
    ]
    summaries, best = summarise(images, [1.0, 0.6, 0.8, 0.4], 1.0, 0.5, 0.5)
    by = {s.strength: s for s in summaries}
    assert by[1.0].combined == by[0.6].combined == pytest.approx((0.7 + 0.5 * 2.5 * 0.2) / 1.5, abs=1e-4)
    assert by[0.8].combined == pytest.approx((0.45 + 0.5 * 2.5 * 0.2) / 1.5, abs=1e-4)  # no face = 0
    assert by[0.8].identity_mean == 0.9 and by[0.8].faces == 1 and by[0.8].identity_pass_rate == 0.5
    assert by[0.4].images == 0 and by[0.4].combined is None  # failed renders are left out
    assert best is by[0.6]  # a tie: the lower strength
    assert images[5].combined is None and images[0].combined == pytest.approx(by[1.0].combined, abs=1e-4)
    table = table_text(summaries, best)
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["1.0", "0.6", "0.8", "0.4"]
    assert table.splitlines()[3].rstrip(" |").endswith("best")
    # text agreement below zero adds nothing (CLIPScore floors it)
    _, best = summarise([_image(0.5, 0.6, -0.3, "h"), _image(0.7, 0.6, 0.0, "i")], [0.5, 0.7], 1.0, 0.5, None)
    assert best.strength == 0.5 and best.combined == pytest.approx(0.4, abs=1e-4)


# ---- clear errors, before anything is rendered -----------------------------------------------------------------


def test_unknown_character(env):
    with EvalServer() as server:
        code, _, stderr = lora_eval(
            "hero.safetensors", "nobody", "--server", server.url, "--out", str(env / "o")
        )
        assert code == 2 and "character 'nobody'" in stderr and "Saved characters: hero" in stderr
        assert server.prompt_posts() == 0


def test_lora_missing_on_the_server(env):
    with EvalServer() as server:
        code, _, stderr = lora_eval(
            "heroine.safetensors", "hero", "--server", server.url, "--out", str(env / "o")
        )
        assert code == 2 and "LoRA 'heroine.safetensors' is not in the loras folder" in stderr
        assert "did you mean 'hero.safetensors'" in stderr and "styles/film_grain.safetensors" in stderr
        assert server.prompt_posts() == 0 and not (env / "o").exists()
        # a path to the file is matched by its name
        code, _, stderr = lora_eval(
            "/somewhere/film_grain.safetensors",
            "hero",
            "--server",
            server.url,
            "--checkpoint",
            "nope.safetensors",
            "--out",
            str(env / "o"),
        )
        assert code == 2 and "using the server's 'styles/film_grain.safetensors'" in stderr
        assert "checkpoint 'nope.safetensors' is not on the server" in stderr and server.prompt_posts() == 0


def test_missing_scoring_models_and_references(env, monkeypatch, models):
    empty = env / "empty-models"
    empty.mkdir()
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(empty))
    with EvalServer() as server:
        base = [
            "lora",
            "eval",
            "hero.safetensors",
            "--character",
            "hero",
            "--server",
            server.url,
            "--out",
            str(env / "o"),
        ]
        code, _, stderr = run_cli(*base)
        assert code == 2 and "InsightFace pack 'buffalo_l' not found" in stderr and "--face-models" in stderr
        # the face pack from the flag; then CLIP is what is missing
        code, _, stderr = run_cli(*base, "--face-models", str(models / "insightface"))
        assert code == 2 and "no CLIP model for text agreement" in stderr and "--clip none" in stderr
        code, _, stderr = run_cli(
            *base, "--face-models", str(models / "insightface"), "--clip", str(env / "nope")
        )
        assert code == 2 and "CLIP model" in stderr and "not found" in stderr
        # a character without identity or photos
        write_character(env, "faceless")
        code, _, stderr = lora_eval(
            "hero.safetensors",
            "faceless",
            "--server",
            server.url,
            "--out",
            str(env / "o"),
            "--face-models",
            str(models / "insightface"),
            "--clip",
            "none",
        )
        assert code == 2 and "has no identity and no reference_photos" in stderr and "--reference" in stderr
        # packages that are not installed are named with the install command
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "insightface" else real(name, *a)
        )
        code, _, stderr = run_cli(*base)
        assert (
            code == 2 and "needs insightface" in stderr and 'pip install "charforge[nodes,faces]"' in stderr
        )
        assert server.prompt_posts() == 0


def test_bad_lists_are_usage_errors(env):
    code, _, stderr = lora_eval(
        "hero.safetensors",
        "hero",
        "--strengths",
        "0.5,x",
        "--server",
        "http://127.0.0.1:9",
        "--out",
        str(env / "o"),
    )
    assert code == 2 and "--strengths: 'x' is not a number" in stderr
    (env / "prompts.txt").write_text("# only a comment\n\n")
    code, _, stderr = lora_eval(
        "hero.safetensors",
        "hero",
        "--prompts",
        str(env / "prompts.txt"),
        "--server",
        "http://127.0.0.1:9",
        "--out",
        str(env / "o"),
    )
    assert code == 2 and "no prompt in the file" in stderr
