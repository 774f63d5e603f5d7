"""A whole SD3.5 training job (TrainRequest -> train) from ComfyUI's separate files: preflight, cancel,
resume, samples and the kohya LoRA in loras/ with the SD3.5 metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cf_testing.sd3_models import build_tiny_sd3
from charforge.engine.control import Cancelled, Control
from charforge.engine.library.formats import read_lora
from charforge.engine.train.config import TrainConfig, with_overrides
from charforge.engine.train.job import TrainRequest, train

pytestmark = [pytest.mark.usefixtures("one_thread")]  # cf_testing/threads.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3_job_model"), "sd35-medium")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_job") / "img" / "2_sks person"
    root.mkdir(parents=True)
    yy, xx = np.mgrid[0:64, 0:64]
    for name, shift in (("a", 0), ("b", 40)):
        rgb = np.stack([(xx * 4 + shift) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a photo of sks person, photo {name}")
    return root.parent


def _stop_after(steps: int) -> Control:
    seen = {"step": 0}

    def on_progress(done, total, text):
        seen["step"] = done

    return Control(on_progress=on_progress, should_stop=lambda: seen["step"] >= steps)


def test_sd35_job_from_comfyui_files_cancels_resumes_and_writes_a_kohya_lora(tiny, dataset, tmp_path):
    config = with_overrides(
        TrainConfig(),
        {
            "steps": 4,
            "resolution": 64,
            "bucket_step": 32,
            "min_bucket": 32,
            "rank": 4,
            "alpha": 4.0,
            "mixed_precision": "no",
            "learning_rate": 1e-3,
            "warmup_steps": 0,
            "schedule": "constant",
            "sample_every": 0,
            "sample_steps": 2,
            "checkpoint_every": 2,
            "trigger_word": "sks",
            "loss_every": 1,  # progress (and so the stop below) after every step
        },
    )
    request = TrainRequest(
        base_model=str(tiny.mmdit),
        parts={
            "clip_l": str(tiny.clip_l),
            "clip_g": str(tiny.clip_g),
            "t5": str(tiny.t5xxl),
            "vae": str(tiny.vae),
        },
        dataset=str(dataset),
        runs_dir=str(tmp_path / "runs"),
        name="alice",
        config=config,
        lora_dir=str(tmp_path / "loras"),
        config_dir=str(tiny.config_dir),
        tokenizer_dirs=(str(tiny.clip_vocab),),
        t5_tokenizer_dirs=(str(tiny.t5_tokenizer),),
        memory_profile="auto",
    )
    with pytest.raises(Cancelled, match="cancelled at step 2"):
        train(request, _stop_after(2))
    status = json.loads((tmp_path / "runs" / "alice" / "status.json").read_text())
    assert status["state"] == "cancelled" and status["step"] == 2, status
    result = train(request)
    assert result.resumed_from == 2 and result.step == 4
    assert result.estimate is not None and result.estimate["flops_per_step"] > 0
    tensors, meta = read_lora(result.exported_path)
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn2_qkv.") for k in tensors)
    assert any(k.startswith("lora_unet_joint_blocks_1_context_block_attn_qkv.") for k in tensors)
    assert meta["modelspec.architecture"] == "stable-diffusion-3.5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["modelspec.trigger_phrase"] == "sks"
    # The final sample (its prompt and the empty negative encoded before the three encoders were dropped).
    assert len(result.samples) == 1
    with Image.open(result.samples[0]) as sample:
        assert sample.size == (64, 64) and np.asarray(sample.convert("L")).std() > 0
    saved = json.loads((tmp_path / "runs" / "alice" / "config.json").read_text())
    assert saved["arch"] == "sd35-medium"
