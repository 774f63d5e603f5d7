"""What the trainer tests share: a patterned picture, a two-picture kohya folder, the tiny run settings, a stop.

The trainers (U-Net loop, Flux.1, SD3) are tested on the same small set-up: 64 px patterned pictures (smooth,
so a few steps measurably learn them) in one ``2_sks person`` concept folder, rank-4 LoRA, fp32, no samples
or checkpoints unless a test asks.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from charforge.engine.control import Control
from charforge.engine.train.config import TrainConfig, with_overrides

#: the settings every tiny training test starts from (a test's own keys go on top)
TINY_TRAIN: dict[str, Any] = {
    "steps": 4,
    "resolution": 64,
    "bucket_step": 32,
    "min_bucket": 32,
    "rank": 4,
    "alpha": 4.0,
    "mixed_precision": "no",
    "learning_rate": 1e-3,
    "warmup_steps": 0,
    "sample_every": 0,
    "checkpoint_every": 0,
}


#: a whole job's extras on top: 2-step samples, a checkpoint every 2 steps, progress (so a stop) every step
TINY_JOB: dict[str, Any] = {
    "schedule": "constant",
    "sample_steps": 2,
    "checkpoint_every": 2,
    "trigger_word": "sks",
    "loss_every": 1,
}


def pattern_image(path: Path, size: tuple[int, int] = (64, 64), shift: int = 0) -> Path:
    """Write a smooth RGB pattern (``shift`` moves the red ramp) to ``path``, making its folder."""
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    rgb = np.stack([(xx * 4 + shift) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def kohya_folder(root: Path, captions: Sequence[str], concept: str = "2_sks person") -> Path:
    """A kohya dataset below ``root``: ``root/<concept>/a.png, a.txt, b.png, ...`` (patterns shifted by 40
    per picture), one caption per picture. Returns ``root``."""
    for index, caption in enumerate(captions):
        name = chr(ord("a") + index)
        pattern_image(root / concept / f"{name}.png", shift=40 * index)
        (root / concept / f"{name}.txt").write_text(caption)
    return root


def tiny_train_config(**overrides: Any) -> TrainConfig:
    """``TrainConfig`` with :data:`TINY_TRAIN` and then ``overrides``."""
    return with_overrides(TrainConfig(), {**TINY_TRAIN, **overrides})


def tiny_job_config(**overrides: Any) -> TrainConfig:
    """``TrainConfig`` with :data:`TINY_TRAIN`, :data:`TINY_JOB` and then ``overrides``."""
    return tiny_train_config(**{**TINY_JOB, **overrides})


def stop_after(steps: int) -> Control:
    """A Control that asks to stop once progress has reported ``steps`` done."""
    seen = {"step": 0}

    def on_progress(done, total, text):
        seen["step"] = done

    return Control(on_progress=on_progress, should_stop=lambda: seen["step"] >= steps)


#: everything random at once, for the resume tests: LoRA dropout (global RNG), flips, caption dropout, two
#: micro-batches per step, a warm-up + cosine schedule
RESUME_SETTINGS: dict[str, Any] = {
    "steps": 4,
    "dropout": 0.1,
    "flip": True,
    "caption_dropout": 0.3,
    "grad_accumulation": 2,
    "warmup_steps": 1,
    "schedule": "cosine",
}


def straight_and_resumed(make_trainer: Callable[[], Any]) -> tuple[Any, Any]:
    """(a run trained straight through, a run stopped after 2 steps whose state went through bytes into a fresh
    trainer, with the global RNG reseeded meanwhile, and then finished); `make_trainer` sets one up."""
    import torch

    straight = make_trainer()
    straight.train()
    first = make_trainer()
    first.train(until=2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    torch.manual_seed(999)  # whatever happened to the global RNG meanwhile must not matter
    second = make_trainer()
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert second.step == 2
    second.train()
    return straight, second


def assert_same_lora(expected: Any, got: Any) -> None:
    """Two LoRA networks hold bit-identical tensors under the same names."""
    import torch

    want, have = expected.state_dict(), got.state_dict()
    assert set(want) == set(have)
    for key in want:
        assert torch.equal(have[key], want[key]), key


def assert_lora_grads_close(ours: Any, theirs: Any) -> set[str]:
    """The LoRA parameters of two modules have the same names and gradients (to float32 accumulation order);
    returns the names."""
    import torch

    mine = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
    other = {n: p.grad for n, p in theirs.named_parameters() if "lora_" in n}
    assert set(mine) == set(other)
    for key in mine:
        torch.testing.assert_close(mine[key], other[key], rtol=1e-5, atol=1e-7)
    return set(mine)


def cancel_then_resume(request: Any) -> Any:
    """Run the training job `request` stopped after step 2 (it says so, and its status is "cancelled" at 2),
    then again: it resumes at step 2, finishes the 4 steps of :data:`TINY_JOB`-style settings and carries the
    preflight's estimate. Returns the second run's result."""
    import json

    import pytest

    from charforge.engine.control import Cancelled
    from charforge.engine.train.job import train

    with pytest.raises(Cancelled, match="cancelled at step 2"):
        train(request, stop_after(2))
    status = json.loads((Path(request.runs_dir) / request.name / "status.json").read_text())
    assert status["state"] == "cancelled" and status["step"] == 2, status
    result = train(request)
    assert result.resumed_from == 2 and result.step == 4
    assert result.estimate is not None and result.estimate["flops_per_step"] > 0
    return result


def assert_one_sample(result: Any, size: int = 64) -> None:
    """The run made one final sample image of `size` pixels that is not blank."""
    assert len(result.samples) == 1
    with Image.open(result.samples[0]) as sample:
        assert sample.size == (size, size) and np.asarray(sample.convert("L")).std() > 0


#: face-mask settings that make only the face box count (the face-mask tests: with and without)
FACE_ONLY: dict[str, Any] = {"face_mask": True, "face_mask_margin": 0.0, "face_mask_background": 0.0}


def peft_lora(module: Any, targets: list[str], seed: int, rank: int = 4, alpha: float = 2.0) -> Any:
    """peft's own LoRA on `targets` of `module` (a reference for the trainer's), its initial matrices drawn
    from `seed` as the trainer draws its own; only the LoRA parameters trainable. Returns `module`."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), module)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def first_batch(trainer: Any) -> tuple[list[str], Any]:
    """The captions and the prepared pixels (B, 3, H, W) of a trainer's first micro-batch."""
    import torch

    from charforge.engine.train.data import prepare_image

    _, items = trainer.micro_batch(0)
    captions = [trainer.data.items[i].caption for i in items]
    pixels = torch.stack(
        [prepare_image(trainer.data.items[i].image, trainer.data.buckets[i]).pixels for i in items]
    )
    return captions, pixels


#: a short run on one picture that a tiny model measurably learns (a constant, high learning rate, rank 8)
LEARNING_SETTINGS: dict[str, Any] = {
    "batch_size": 2,
    "learning_rate": 1e-2,
    "schedule": "constant",
    "rank": 8,
    "alpha": 8.0,
}


def losses_before_and_after(trainer: Any, timesteps: list[Any]) -> tuple[float, float]:
    """(the base model's evaluation loss, the trained LoRA's) of a set-up trainer, which is trained in between;
    checks that the LoRA starts as a no-op and that the base weights never move."""
    import pytest

    trainer.network.set_enabled(False)
    base_loss = trainer.evaluate(timesteps)
    trainer.network.set_enabled(True)
    assert trainer.evaluate(timesteps) == pytest.approx(base_loss, rel=1e-6)  # the LoRA starts as a no-op
    trainer.train()
    lora_loss = trainer.evaluate(timesteps)
    trainer.network.set_enabled(False)
    assert trainer.evaluate(timesteps) == pytest.approx(base_loss, rel=1e-6)  # the base weights never moved
    trainer.network.set_enabled(True)
    return base_loss, lora_loss
