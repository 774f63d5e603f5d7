"""A whole SD3.5 training job (TrainRequest -> train) from ComfyUI's separate files: preflight, cancel,
resume, samples and the kohya LoRA in loras/ with the SD3.5 metadata."""

from __future__ import annotations

import json

import pytest

from cf_testing.train_data import assert_one_sample, cancel_then_resume, kohya_folder, tiny_job_config
from charforge.engine.library.formats import read_lora
from charforge.engine.train.config import TrainConfig, with_overrides
from charforge.engine.train.job import TrainRequest

pytestmark = [pytest.mark.usefixtures("one_thread")]  # cf_testing/threads.py


@pytest.fixture(scope="module")
def tiny(tiny_sd35):
    return tiny_sd35  # cf_testing/model_fixtures.py: built once per test run


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3_job") / "img"
    return kohya_folder(root, [f"a photo of sks person, photo {name}" for name in "ab"])


def test_sd35_job_from_comfyui_files_cancels_resumes_and_writes_a_kohya_lora(tiny, dataset, tmp_path):
    config = tiny_job_config()
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
    result = cancel_then_resume(request)
    tensors, meta = read_lora(result.exported_path)
    assert any(k.startswith("lora_unet_joint_blocks_0_x_block_attn2_qkv.") for k in tensors)
    assert any(k.startswith("lora_unet_joint_blocks_1_context_block_attn_qkv.") for k in tensors)
    assert meta["modelspec.architecture"] == "stable-diffusion-3.5-medium/lora"
    assert meta["ss_network_module"] == "networks.lora_sd3" and meta["modelspec.trigger_phrase"] == "sks"
    # The final sample (its prompt and the empty negative encoded before the three encoders were dropped).
    assert_one_sample(result)
    saved = json.loads((tmp_path / "runs" / "alice" / "config.json").read_text())
    assert saved["arch"] == "sd35-medium"


def test_sd35_large_preflight_picks_memory_options_by_card_and_refuses_with_numbers():
    """SD3.5 Large at 1024², rank 16, bf16 (meta device: shapes only): a 24 GB card gets checkpointing with the
    bf16 base, a 16 GB card also the fp8 base, an 80 GB card neither; an 8 GB card is refused with the numbers."""
    import torch
    from diffusers import SD3Transformer2DModel

    from charforge.engine.train.flow import sd3
    from charforge.engine.train.flow.preflight import flow_profile
    from charforge.engine.train.preflight import DeviceInfo, PreflightError

    config = json.loads((sd3.CONFIG_DIR / "transformer" / "sd35-large.json").read_text())
    config.pop("_class_name")
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
    model = sd3.SD3Model(
        "sd35-large",
        "",
        transformer,
        torch.nn.Linear(1, 1),
        dict.fromkeys(("clip_l", "clip_g", "t5")),
        {},
        torch.bfloat16,
    )
    train_config = with_overrides(
        TrainConfig(),
        {"resolution": 1024, "rank": 16, "alpha": 16.0, "mixed_precision": "bf16", "steps": 1000},
    )
    card = DeviceInfo("cuda", "24 GB card", 24 * 2**30, 24 * 2**30, 160.0)
    chosen = flow_profile(model, train_config, "cuda", info=card)  # 16.1 GB of bf16 weights leave room
    assert chosen.config.gradient_checkpointing and not chosen.config.flow.fp8_base
    assert chosen.peak_bytes < 24 * 2**30
    card = DeviceInfo("cuda", "16 GB card", 16 * 2**30, 16 * 2**30, 100.0)
    chosen = flow_profile(model, train_config, "cuda", info=card)
    assert chosen.config.gradient_checkpointing and chosen.config.flow.fp8_base
    assert chosen.peak_bytes < 16 * 2**30
    big = DeviceInfo("cuda", "80 GB card", 80 * 2**30, 80 * 2**30, 700.0)
    roomy = flow_profile(model, train_config, "cuda", info=big).config
    assert not roomy.flow.fp8_base and not roomy.gradient_checkpointing
    small = DeviceInfo("cuda", "8 GB card", 8 * 2**30, 8 * 2**30, 60.0)
    with pytest.raises(PreflightError, match=r"needs about \d+\.\d GB.*8 GB card"):
        flow_profile(model, train_config, "cuda", info=small)
