"""What the two real-ComfyUI two-character tests share: a base with the characters' LoRAs and face
pictures, and the two identities saved through Build Identity in the running ComfyUI."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import lora_files
from . import real_comfyui as real
from .face_models import blank_image, face_image

#: one planted face per half picture
FACE = ((144, 144, 100),)
#: the input pictures the identities are built from, by the identity name the workflows load
IDENTITY_PICTURES = {"character_a": "ann.png", "character_b": "bob.png"}


def face_pair(left: int | None, right: int | None) -> np.ndarray:
    """Two pictures side by side: test person `left` and `right` (None: no face)."""
    halves = [blank_image() if p is None else face_image(faces=FACE, person=p) for p in (left, right)]
    return np.concatenate(halves, axis=1)


def two_character_base(tmp_path: Path, checkpoint, loras: Sequence[str]) -> tuple[Path, str, Path]:
    """`real.face_checkpoint_base`, plus a random full-size SD1.5 LoRA loras/<name>.safetensors for each of
    `loras` (seeded by position) and input/ann.png (person 0) and input/bob.png (person 1), each on the
    left half."""
    comfy, python, base = real.face_checkpoint_base(tmp_path, checkpoint)
    folder = base / "models" / "loras"
    folder.mkdir(parents=True)
    for seed, name in enumerate(loras):
        lora_files.write(
            lora_files.random_state("sd15", seed=seed, full_size=True), folder / f"{name}.safetensors"
        )
    (base / "input").mkdir(parents=True)
    for person, file in enumerate(IDENTITY_PICTURES.values()):
        Image.fromarray(face_pair(person, None)).save(base / "input" / file)
    return comfy, python, base


def save_identities(server: real.RunningComfyUI, client_id: str) -> None:
    """Build Identity (saved) for character_a from ann.png and character_b from bob.png in `server`."""
    for name, file in IDENTITY_PICTURES.items():
        server.run_prompt(
            {
                "1": {
                    "class_type": "CharForgeLoadFaceModels",
                    "inputs": {"pack": "buffalo_l", "det_size": 640, "provider": "CPU"},
                },
                "2": {"class_type": "LoadImage", "inputs": {"image": file}},
                "3": {
                    "class_type": "CharForgeBuildIdentity",
                    "inputs": {"face_models": ["1", 0], "name": name, "save": True, "images": ["2", 0]},
                },
            },
            client_id,
        )


def fit_node(kind: str, inputs: dict, width: int, height: int, steps: int) -> bool:
    """Fit a node of a two-character workflow to the test: the tiny checkpoint, a `width` x `height` latent
    (the masks' halves at width / 2), `steps` Euler steps, the face models on the CPU. False for kinds it
    leaves alone."""
    if kind == "CheckpointLoaderSimple":
        inputs["ckpt_name"] = "sd15_tiny.safetensors"
    elif kind == "EmptyLatentImage":
        inputs.update(width=width, height=height, batch_size=1)
    elif kind == "SolidMask":
        inputs.update(width=width if inputs["value"] == 0 else width // 2, height=height)
    elif kind == "MaskComposite":
        inputs["x"] = 0 if inputs["x"] == 0 else width // 2
    elif kind == "KSampler":
        inputs.update(steps=steps, sampler_name="euler", scheduler="normal")
    elif kind == "CharForgeLoadFaceModels":
        inputs.update(det_size=640, provider="CPU")
    else:
        return False
    return True
