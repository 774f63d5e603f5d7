"""A fake ComfyUI for ``charforge tune`` and ``charforge lora bench``: a Train LoRA node whose LoRA quality is
planted, a LoraLoader listing what it trained, and a SaveImage that draws what that LoRA would make.

Quality is a function of the settings with a hidden optimum (:data:`OPTIMUM`): the distance of a trial's
learning rate (in decades) and rank from it sets how much the drawn face is blended from the character's person
(0) towards another person, so identity falls smoothly with the distance. Learning rates above
:data:`BROKEN_LR` give pictures without a face (planted-bad trials, for pruning). Samples show what the
final images will. The scene text and the seed
vary the background noise, so images of a set differ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from fakes.comfy_server import FakeComfyServer, NodeDef, lora_loader
from PIL import Image

from cf_testing.cli import run_charforge as run_cli  # noqa: F401 - the tune tests take it from here
from cf_testing.face_models import blank_image, face_image, use_scoring_models, write_scoring_models

OPTIMUM = {"learning_rate": 3e-4, "rank": 16}
BROKEN_LR = 3e-3
SIZE = 160
OTHER_PERSON = 7
FACE = ((64, 64, 128),)
LORAS = ["downloaded_style.safetensors"]


def distance(settings: dict) -> float:
    """How far settings are from the optimum: decades of learning rate plus 0.6 per rank doubling."""
    lr = float(settings.get("learning_rate") or 1e-4)
    rank = int(settings.get("rank") or 16)
    return abs(math.log10(lr / OPTIMUM["learning_rate"])) + 0.6 * abs(math.log2(rank / OPTIMUM["rank"]))


def blend(distance_value: float) -> float:
    """How much of the other person is in the face (0: the character)."""
    return min(1.0, 0.5 * distance_value)


def draw(alpha: float | None, seed: int, text: str = "", size: int = SIZE) -> bytes:
    noise_seed = int(hashlib.sha256(f"{text}|{seed}".encode()).hexdigest()[:8], 16)
    if alpha is None:
        rgb = blank_image((size, size), value=60 + noise_seed % 120)
    else:
        own = face_image((size, size), faces=FACE, person=0, noise=6, seed=noise_seed).astype(np.float32)
        other = face_image((size, size), faces=FACE, person=OTHER_PERSON, noise=6, seed=noise_seed)
        rgb = ((1.0 - alpha) * own + alpha * other.astype(np.float32)).round().astype(np.uint8)
        x, y, blue = FACE[0]
        rgb[y : y + 16, x : x + 16] = (255, 0, blue)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


class TuneServer(FakeComfyServer):
    """The fake ComfyUI with the planted Train LoRA, LoraLoader and SaveImage (see the module docstring)."""

    def __init__(self, train_seconds: float = 0.0, **kw):
        super().__init__(**kw)
        self.train_seconds = train_seconds
        #: every Train LoRA execution: (output_name, steps, settings)
        self.trainings: list[tuple[str, int, dict]] = []
        #: LoRA file name -> settings it was trained with
        self.trained: dict[str, dict] = {}
        #: every SaveImage: (lora name or None, seed, text)
        self.renders: list[tuple[str | None, int, str]] = []
        int_input = ("INT", {"default": 0, "min": 0, "max": 100000})
        self.nodes["CharForgeTrainLoRA"] = NodeDef(
            "CharForgeTrainLoRA",
            {
                "base_model": (["v1-5-pruned-emaonly.safetensors", "[diffusers] tiny_sd15"],),
                "dataset_folder": ("STRING", {"default": ""}),
                "trigger_word": ("STRING", {"default": "ohwx"}),
                "output_name": ("STRING", {"default": "my_character"}),
                "preset": (["sdxl", "sd15", "fast", "high_quality"],),
                "steps": int_input,
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 0.0, "max": 10.0, "step": 1e-5}),
                "rank": ("INT", {"default": 32, "min": 0, "max": 256}),
                "resolution": int_input,
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
                "seed": int_input,
                "resume": (["auto", "never"],),
                "memory_profile": (["auto", "check", "off"],),
            },
            optional={
                "overrides": ("STRING", {"default": "", "multiline": True}),
                "save_character": ("STRING", {"default": ""}),
                "use_preset_values": ("BOOLEAN", {"default": True}),
            },
            outputs=("STRING", "CHARFORGE_TRAINING_RUN", "IMAGE", "IMAGE"),
            output_node=True,
            category="CharForge/Train",
            run=self._train,
        )
        self.nodes["LoraLoader"] = lora_loader(lambda server: (sorted([*LORAS, *server.trained]),))
        self.nodes["SaveImage"] = dataclasses.replace(self.nodes["SaveImage"], run=self._save)

    # ---- nodes --------------------------------------------------------------------------------------------

    async def _train(
        self,
        ctx,
        base_model,
        dataset_folder,
        trigger_word,
        output_name,
        preset,
        steps,
        learning_rate,
        rank,
        resolution,
        batch_size,
        seed,
        resume,
        memory_profile,
        overrides="",
        save_character="",
        use_preset_values=True,
        **_hidden,
    ):
        settings = {
            "learning_rate": learning_rate,
            "rank": rank,
            "steps": steps,
            **json.loads(overrides or "{}"),
        }
        self.trainings.append((output_name, steps, settings))
        if self.train_seconds:
            await asyncio.sleep(self.train_seconds)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", output_name)
        run = self.output_dir / "charforge" / "train_runs" / name
        (run / "samples").mkdir(parents=True, exist_ok=True)
        lora = f"{name}.safetensors"
        (run / lora).write_bytes(b"fake lora " + json.dumps(settings, sort_keys=True).encode())
        self.trained[lora] = settings
        alpha = None if learning_rate > BROKEN_LR else blend(distance(settings))
        images = []
        prompts = settings.get("sample_prompts") or [trigger_word]
        seeds = settings.get("sample_seeds") or [0]
        index = 0
        for prompt in prompts:
            for sample_seed in seeds:
                file = run / "samples" / f"step_{steps}_{index}.png"
                file.write_bytes(draw(alpha, sample_seed, prompt))
                images.append(
                    {
                        "filename": file.name,
                        "subfolder": f"charforge/train_runs/{name}/samples",
                        "type": "output",
                    }
                )
                index += 1
        text = f"{lora}: {steps} steps, final loss 0.1000; run folder {run}"
        return (lora, None, None, None), {"text": [text], "images": images}

    async def _save(self, ctx, images, filename_prefix, **_hidden):
        nodes = ctx.prompt.values()
        lora = next((n["inputs"]["lora_name"] for n in nodes if n["class_type"] == "LoraLoader"), None)
        seed = next(n["inputs"]["seed"] for n in nodes if n["class_type"] == "KSampler")
        text = next((n["inputs"]["text"] for n in nodes if n["class_type"] == "CLIPTextEncode"), "")
        self.renders.append((lora, seed, text))
        if lora is None:
            alpha = 0.9  # the base model: someone else
        elif lora in self.trained:
            settings = self.trained[lora]
            alpha = None if settings["learning_rate"] > BROKEN_LR else blend(distance(settings))
        else:
            alpha = 0.6  # a downloaded LoRA: half-way
        size = images.width
        return (), {"images": [self._write_output(filename_prefix, "png", draw(alpha, seed, text, size))]}


def write_search(path: Path, **changes) -> Path:
    """A search file for the fake: lr and rank searched around the planted optimum, a small evaluation set."""
    import yaml

    data = {
        "name": "hero_tune",
        "character": "hero",
        "workflow": str(path.parent / "train.json"),
        "fixed": {"schedule": "constant"},
        "space": {"learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}, "rank": [4, 8, 16, 32, 64]},
        "objectives": ["combined"],
        "weights": {"identity": 1.0, "text": 0.0, "diversity": 0.0},
        "budget": {"trials": 8},
        "seed": 3,
        "eval": {"scenes": ["portrait", "walking in a park"], "seeds": [1, 2]},
        "scoring": {"det_size": 160},
    }
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def write_train_workflow(path: Path) -> Path:
    graph = {
        "1": {
            "class_type": "CharForgeTrainLoRA",
            "_meta": {"title": "Train LoRA (CharForge)"},
            "inputs": {
                "base_model": "v1-5-pruned-emaonly.safetensors",
                "dataset_folder": "hero/img",
                "trigger_word": "hero_cf",
                "output_name": "hero",
                "preset": "sd15",
                "steps": 300,
                "learning_rate": 1e-4,
                "rank": 16,
                "resolution": 512,
                "batch_size": 1,
                "seed": 42,
                "resume": "auto",
                "memory_profile": "auto",
                "overrides": "",
                "save_character": "",
                "use_preset_values": False,
            },
        }
    }
    path.write_text(json.dumps(graph))
    return path


# ---- fixtures shared by the tune and bench tests --------------------------------------------------------------


@pytest.fixture(scope="module", name="models")
def models_fixture(tmp_path_factory) -> Path:
    return write_scoring_models(tmp_path_factory.mktemp("tune-models"))


@pytest.fixture(name="env")
def env_fixture(no_comfy, monkeypatch, models, tmp_path) -> Path:
    """Models above, the character 'hero' with reference photos, the training workflow and a loras folder."""
    use_scoring_models(monkeypatch, models, tmp_path)
    refs = tmp_path / "refs"
    refs.mkdir()
    for seed in range(4):
        Image.fromarray(face_image((SIZE, SIZE), faces=FACE, person=0, noise=6, seed=200 + seed)).save(
            refs / f"ref{seed}.png"
        )
    folder = tmp_path / "charforge" / "characters"
    folder.mkdir(parents=True)
    (folder / "hero.yaml").write_text(
        yaml.safe_dump(
            {
                "display_name": "Hero",
                "trigger_words": ["hero_cf"],
                "prompt": "photo of a woman",
                "negative_prompt": "blurry",
                "reference_photos": str(refs),
                "threshold": 0.5,
                "generation": {
                    "steps": 8,
                    "cfg": 5.0,
                    "width": SIZE,
                    "height": SIZE,
                    "sampler": "euler",
                    "scheduler": "normal",
                },
            }
        )
    )
    write_train_workflow(tmp_path / "train.json")
    return tmp_path
