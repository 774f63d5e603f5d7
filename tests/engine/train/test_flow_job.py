"""A whole Flux.1 training job (TrainRequest -> train): preflight, cancel, resume, the kohya LoRA in loras/."""

from __future__ import annotations

import json

import pytest
import torch

from cf_testing.train_data import assert_one_sample, cancel_then_resume, kohya_folder, tiny_job_config
from charforge.engine.library.formats import read_lora
from charforge.engine.train.config import with_overrides
from charforge.engine.train.job import TrainRequest
from charforge.engine.train.preflight import DeviceInfo, PreflightError

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow_job") / "img"
    return kohya_folder(root, [f"sks person, photo {name}" for name in "ab"])


def test_flux_job_from_comfyui_files_cancels_resumes_and_writes_a_kohya_lora(tiny_flux, dataset, tmp_path):
    request = TrainRequest(
        base_model=str(tiny_flux.transformer_file),
        parts={
            "clip_l": str(tiny_flux.clip_l_file),
            "t5": str(tiny_flux.t5_file),
            "vae": str(tiny_flux.vae_file),
        },
        dataset=str(dataset),
        runs_dir=str(tmp_path / "runs"),
        name="alice",
        config=tiny_job_config(),
        lora_dir=str(tmp_path / "loras"),
        config_dir=str(tiny_flux.diffusers_dir),
        tokenizer_dirs=(str(tiny_flux.clip_tokenizer_dir),),
        t5_tokenizer_dirs=(str(tiny_flux.t5_tokenizer_dir),),
        memory_profile="auto",
    )
    result = cancel_then_resume(request)
    tensors, meta = read_lora(result.exported_path)
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in tensors)
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["modelspec.prediction_type"] == "flow"
    assert meta["ss_guidance_scale"] == "1.0" and meta["ss_timestep_sampling"] == "flux_shift"
    assert meta["ss_t5xxl_max_token_length"] == "512" and "ss_min_snr_gamma" not in meta
    # Final sample images (the prompts were encoded before the text encoders were dropped).
    assert_one_sample(result)
    saved = json.loads((tmp_path / "runs" / "alice" / "config.json").read_text())
    assert saved["arch"] == "flux-dev"


# --------------------------------------------------------------------------------------------------
# Preflight numbers on the full-size model (built on the meta device: no memory)


def _full_flux():
    from diffusers import FluxTransformer2DModel

    from charforge.engine.train.models import CONFIG_ROOT

    config = json.loads((CONFIG_ROOT / "flux-dev" / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    from charforge.engine.train.flow.flux import FluxModel

    return FluxModel(
        arch="flux-dev",
        source="",
        transformer=transformer,
        vae=torch.nn.Linear(1, 1),
        text_encoders={"clip_l": None, "t5": None},
        tokenizers={},
        dtype=torch.bfloat16,
    )


def test_flux_step_flops_match_the_published_count():
    from charforge.engine.train.flow.preflight import step_flops

    model = _full_flux()
    config = tiny_job_config(resolution=1024, mixed_precision="bf16")
    forward, step = step_flops(model, config)
    assert forward == pytest.approx(74.39e12, rel=1e-3)
    assert step == pytest.approx(163.59e12, rel=1e-3)  # 2 x linear + 3 x attention
    _, checkpointed = step_flops(model, with_overrides(config, {"gradient_checkpointing": True}))
    assert checkpointed == pytest.approx(step + forward)


def test_flux_preflight_picks_fp8_and_checkpointing_for_24_gb_and_refuses_with_numbers():
    from charforge.engine.train.flow.preflight import flow_profile

    model = _full_flux()
    config = tiny_job_config(resolution=1024, rank=16, alpha=16.0, mixed_precision="bf16", steps=1000)
    card = DeviceInfo("cuda", "24 GB card", 24 * 2**30, 24 * 2**30, 160.0)
    chosen = flow_profile(model, config, "cuda", info=card)
    assert chosen.config.gradient_checkpointing and chosen.config.flow.fp8_base
    assert chosen.peak_bytes < 22 * 2**30
    big = DeviceInfo("cuda", "80 GB card", 80 * 2**30, 80 * 2**30, 700.0)
    assert not flow_profile(model, config, "cuda", info=big).config.flow.fp8_base
    small = DeviceInfo("cuda", "8 GB card", 8 * 2**30, 8 * 2**30, 60.0)
    with pytest.raises(PreflightError, match=r"needs about \d+\.\d GB.*8 GB card"):
        flow_profile(model, config, "cuda", info=small)
