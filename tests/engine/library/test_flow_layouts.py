"""Flux / SD3 LoRA key layouts: names both ways, fusing and splitting, and diffusers' own loaders reading ours.

Reference behaviour: diffusers 0.42's ``FluxPipeline.load_lora_weights`` converts kohya files (fused
``lora_unet_double_blocks_*`` / ``single_blocks_*``) itself; ``StableDiffusion3Pipeline`` reads the peft
layout. The LoRA deltas it installs are compared with the ones our split computes.
"""

from __future__ import annotations

import logging

import pytest
import torch

from cf_testing.lora_files import (
    FLUX_TINY,
    FLUX_TINY_CONFIG,
    SD3_TINY,
    SD3_TINY_CONFIG,
    linear_shapes,
    random_split_modules,
)
from charforge.engine.library import flow_layouts as fl
from charforge.engine.library.flow_layouts import Factors, FlowLayoutError


def _flux(**overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(**{**FLUX_TINY_CONFIG, **overrides})


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(**SD3_TINY_CONFIG)


def _close(a, b) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6 * max(1.0, float(b.abs().max())))


# --------------------------------------------------------------------------------------------------
# Names


def test_every_linear_of_the_diffusers_models_has_a_single_file_target():
    for family, model, variant in (("flux", _flux(), FLUX_TINY), ("sd3", _sd3(), SD3_TINY)):
        shapes = linear_shapes(model)
        targets = {}
        for name in shapes:
            found = fl.target_from_diffusers(family, name)
            assert found is not None, name
            targets.setdefault(found[0].name, []).append(found[1])
        # The tables of the full-size variants list exactly these weights (at toy sizes here).
        assert set(targets) == set(fl.lora_targets(variant)), family
        for name, parts in targets.items():
            target = fl.target_from_single_file(family, name)
            assert sorted(parts) == list(range(len(target.parts))), name


def test_kohya_names_resolve_to_the_single_file_weights():
    target = fl.target_from_kohya("flux", "lora_unet_double_blocks_7_txt_attn_qkv")
    assert target.name == "double_blocks.7.txt_attn.qkv"
    assert target.parts[2] == "transformer_blocks.7.attn.add_v_proj"
    assert fl.kohya_base(fl.target_from_single_file("flux", "single_blocks.37.linear1")) == (
        "lora_unet_single_blocks_37_linear1"
    )
    sd3 = fl.target_from_kohya("sd3", "lora_unet_joint_blocks_3_x_block_attn2_qkv")
    assert sd3.parts == tuple(f"transformer_blocks.3.attn2.to_{p}" for p in "qkv")
    assert fl.target_from_kohya("sd3", "lora_unet_joint_blocks_0_context_block_adaLN_modulation_1").swap
    assert fl.target_from_kohya("flux", "lora_unet_down_blocks_0_attentions_0_proj_in") is None


def test_full_size_variants_have_the_published_parameter_counts():
    # Linear weights only (no biases, norms, pos table): Flux.1-dev 11.9 B parameters in all, nearly all here.
    flux = sum(torch.Size(s).numel() for s in fl.lora_targets(fl.VARIANTS["flux-dev"]).values())
    assert 11.85e9 < flux < 11.91e9
    large = fl.lora_targets(fl.VARIANTS["sd35-large"])
    assert large["joint_blocks.37.context_block.adaLN_modulation.1"] == (2 * 2432, 2432)
    assert "joint_blocks.37.context_block.attn.proj" not in large
    medium = fl.lora_targets(fl.VARIANTS["sd35-medium"])
    assert medium["joint_blocks.12.x_block.adaLN_modulation.1"] == (9 * 1536, 1536)
    assert "joint_blocks.13.x_block.attn2.qkv" not in medium


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "flux"),
        (["lora_unet_guidance_in_in_layer.lora_down.weight"], "flux"),
        (["diffusion_model.single_blocks.3.linear1.lora_up.weight"], "flux"),
        (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], "flux"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], "sd3"),
        (["transformer.transformer_blocks.0.attn2.to_q.lora_A.weight"], "sd3"),
        (["transformer.transformer_blocks.23.attn.to_q.lora_A.weight"], "sd3"),  # Flux has 19 double blocks
        (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight"], "sd"),
        (["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"], "sd"),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], None),
    ],
)
def test_family_from_key_names(keys, family):
    assert fl.detect_family(keys) == family


def test_shared_transformer_block_names_need_metadata_or_shapes():
    keys = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    with pytest.raises(FlowLayoutError, match="give the base model"):
        fl.detect_family(keys, {keys[0]: (4, 16)})
    assert fl.detect_family(keys, {keys[0]: (4, 3072)}) == "flux"
    assert fl.detect_family(keys, {keys[0]: (4, 2432)}) == "sd3"
    assert (
        fl.detect_family(keys, metadata={"modelspec.architecture": "stable-diffusion-3.5-large/lora"})
        == "sd3"
    )
    assert fl.detect_family(keys, metadata={"ss_base_model_version": "flux1"}) == "flux"


# --------------------------------------------------------------------------------------------------
# Fusing and splitting


def _qkv_parts(rank=3, seed=0, hidden=8, alphas=(1.5, 1.5, 1.5)):
    g = torch.Generator().manual_seed(seed)
    return {
        i: Factors(
            torch.randn(rank, hidden, generator=g), torch.randn(hidden, rank, generator=g), torch.tensor(a)
        )
        for i, a in enumerate(alphas)
    }


def test_fused_delta_is_the_parts_deltas_stacked():
    target = fl.target_from_single_file("flux", "single_blocks.0.linear1")
    parts = _qkv_parts()
    fused = fl.fuse(target, parts)
    assert fused.rank == 4 * 3  # q, k, v + a zero block for the untrained MLP input
    delta = fused.delta()
    assert delta.shape == (7 * 8, 8)
    for i in range(3):
        assert _close(delta[8 * i : 8 * (i + 1)], parts[i].delta())
    assert not delta[24:].any()
    # kohya's ComfyUI loader applies alpha / rank of the fused module: the per-part scale is unchanged.
    assert fused.scale == pytest.approx(parts[0].scale)


def test_split_of_fuse_is_exact_and_drops_the_zero_blocks():
    target = fl.target_from_single_file("sd3", "joint_blocks.4.x_block.attn.qkv")
    parts = _qkv_parts(rank=4, alphas=(2.0, 2.0, 2.0))
    del parts[1]
    back = fl.split(target, fl.fuse(target, parts))
    assert sorted(back) == [0, 2]
    for i, factors in back.items():
        assert torch.equal(factors.down, parts[i].down) and torch.equal(factors.up, parts[i].up)
        assert float(factors.alpha) == 2.0


def test_parts_with_different_ranks_and_scales_keep_their_effect():
    target = fl.target_from_single_file("flux", "double_blocks.0.img_attn.qkv")
    g = torch.Generator().manual_seed(3)
    parts = {
        0: Factors(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), torch.tensor(1.0)),
        1: Factors(torch.randn(5, 8, generator=g), torch.randn(8, 5, generator=g), torch.tensor(20.0)),
        2: Factors(torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g), None),
    }
    fused = fl.fuse(target, parts)
    back = fl.split(target, fused)
    assert {i: f.rank for i, f in back.items()} == {0: 2, 1: 5, 2: 3}
    for i, factors in back.items():
        assert _close(factors.delta(), parts[i].delta())


def test_a_natively_fused_lora_splits_with_the_same_effect():
    """kohya's own Flux LoRAs train one rank-r LoRA on the whole qkv: every part shares the rank columns."""
    target = fl.target_from_single_file("flux", "double_blocks.2.img_attn.qkv")
    g = torch.Generator().manual_seed(5)
    fused = Factors(torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g), torch.tensor(2.0))
    back = fl.split(target, fused)
    assert sorted(back) == [0, 1, 2] and all(f.rank == 4 for f in back.values())
    delta = fused.delta()
    for i in range(3):
        assert _close(back[i].delta(), delta[8 * i : 8 * (i + 1)])


def test_swapped_halves_follow_the_layout():
    final = fl.target_from_single_file("flux", "final_layer.adaLN_modulation.1")
    g = torch.Generator().manual_seed(1)
    part = Factors(torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g), None)
    fused = fl.fuse(final, {0: part})
    assert torch.equal(fused.up[:8], part.up[8:]) and torch.equal(fused.up[8:], part.up[:8])
    assert torch.equal(fl.split(final, fused)[0].up, part.up)
    # SD3: only the pre-only last context block's adaLN (two halves) is swapped; six-part ones are not.
    context = fl.target_from_single_file("sd3", "joint_blocks.0.context_block.adaLN_modulation.1")
    six = Factors(part.down, torch.randn(48, 2, generator=g), None)
    assert torch.equal(fl.fuse(context, {0: six}).up, six.up)
    assert not torch.equal(fl.fuse(context, {0: part}).up, part.up)


def test_mismatched_parts_are_refused_by_name():
    target = fl.target_from_single_file("flux", "double_blocks.0.img_attn.qkv")
    parts = _qkv_parts()
    parts[1] = Factors(parts[1].down, torch.zeros(9, 3), None)
    with pytest.raises(FlowLayoutError, match="add_k_proj|to_k"):
        fl.fuse(target, parts)
    with pytest.raises(FlowLayoutError, match="no layer of the flux transformer: foo"):
        fl.fuse_modules("flux", {"foo": parts[0]})


# --------------------------------------------------------------------------------------------------
# Whole checkpoints


def test_whole_checkpoints_convert_both_ways():
    # (the Flux direction is also checked against diffusers' own converter in tests/engine/train/test_flow.py)
    for family, model in (("flux", _flux()), ("sd3", _sd3())):
        state = model.state_dict()
        single = fl.single_file_state(family, state)
        back = fl.diffusers_state(family, single)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], state[k]) for k in state)


def test_the_real_comfyui_fixtures_have_the_real_layouts():
    """tests/cf_testing/flow_checkpoints.py writes the files the real-ComfyUI test loads: the shallow Flux from
    a shape table, checked here against diffusers' full-width model (on the meta device)."""
    from diffusers import FluxTransformer2DModel

    from cf_testing.flow_checkpoints import TINY_SD35, shallow_flux_shapes, tiny_sd35_state
    from charforge.engine.models.flux_files import flux_config

    with torch.device("meta"):  # diffusers' defaults are Flux.1's width
        full = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    single = fl.single_file_state("flux", full.state_dict())
    assert {k: tuple(v.shape) for k, v in single.items()} == shallow_flux_shapes()
    assert sum(torch.Size(s).numel() for s in shallow_flux_shapes().values()) == pytest.approx(
        545.5e6, rel=1e-3
    )
    config = flux_config(shallow_flux_shapes())
    assert (config["num_layers"], config["num_single_layers"], config["guidance_embeds"]) == (1, 1, True)
    sd35 = tiny_sd35_state()
    # ComfyUI builds depth = width / 64 blocks of `depth` heads: the tiny file must keep that ratio.
    assert sd35["x_embedder.proj.weight"].shape[0] == 64 * TINY_SD35.depth
    lora = {k.removesuffix(".weight"): tuple(v.shape) for k, v in sd35.items() if k.endswith(".weight")}
    assert {k: lora[k] for k in fl.lora_targets(TINY_SD35)} == fl.lora_targets(TINY_SD35)
    assert "joint_blocks.0.x_block.attn2.ln_q.weight" in sd35 and "pos_embed" in sd35


# --------------------------------------------------------------------------------------------------
# diffusers reading our files


def _installed_deltas(model, adapter="cf"):
    return {
        name: module.get_delta_weight(adapter).detach()
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {})
    }


FLUX_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
SD3_PARTS = (*FLUX_PARTS, "text_encoder_3", "tokenizer_3")


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load(pipe, tensors) -> list[str]:
    handler = _Warnings()
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        pipe.load_lora_weights(dict(tensors), adapter_name="cf")
    finally:
        root.removeHandler(handler)
    return [m for m in handler.messages if "text_encoder" not in m]  # no text encoder in these pipelines


def test_diffusers_flux_loads_our_kohya_file_on_every_block_linear():
    """Double blocks at toy width (diffusers' converter splits single_blocks' linear1 at Flux's real 3072)."""
    from diffusers import FluxPipeline

    model = _flux(num_single_layers=0)
    blocks = {n: s for n, s in linear_shapes(model).items() if n.startswith("transformer_blocks.")}
    modules = random_split_modules(blocks, seed=2, rank=3, alpha=1.5)
    del modules["transformer_blocks.1.attn.add_k_proj"]  # a part left untrained: a zero block in the file
    tensors = fl.kohya_tensors("flux", modules)
    assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight" in tensors
    pipe = FluxPipeline(**dict.fromkeys(FLUX_PARTS), transformer=model)
    assert _load(pipe, tensors) == []
    installed = _installed_deltas(model)
    assert set(installed) == set(blocks)
    for name, delta in installed.items():
        expected = modules[name].delta() if name in modules else torch.zeros(delta.shape)
        assert _close(delta, expected), name
    assert model.transformer_blocks[0].attn.to_q.r["cf"] == 3  # the block-diagonal rank split back compactly


@pytest.mark.slow
def test_diffusers_flux_loads_our_kohya_single_block_at_full_width():
    """One single block at Flux's real width (3072, 24 heads): linear1 = q, k, v + the 12288-row MLP input."""
    from diffusers import FluxPipeline

    model = _flux(
        num_layers=0,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        axes_dims_rope=(16, 56, 56),
    ).to(torch.bfloat16)
    blocks = {n: s for n, s in linear_shapes(model).items() if n.startswith("single_transformer_blocks.")}
    modules = random_split_modules(blocks, seed=4, rank=2, alpha=1.0)
    tensors = fl.kohya_tensors("flux", modules)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 8)
    pipe = FluxPipeline(**dict.fromkeys(FLUX_PARTS), transformer=model)
    assert _load(pipe, tensors) == []
    installed = _installed_deltas(model)
    assert set(installed) == set(blocks)
    for name, delta in installed.items():
        expected = modules[name].delta()  # bf16 weights: 3 significant digits
        assert float((delta.double() - expected).norm() / expected.norm()) < 1e-2, name


def test_diffusers_sd3_loads_our_split_modules_of_every_linear():
    from diffusers import StableDiffusion3Pipeline

    from charforge.engine.library import flow_formats
    from charforge.engine.library.formats import LoraModule, LoraState

    model = _sd3()
    shapes = linear_shapes(model)
    modules = random_split_modules(shapes, seed=6, rank=2, alpha=3.0)
    fused = fl.fuse_modules("sd3", modules)
    state = LoraState(
        "sd3", {("unet", n): LoraModule("unet", n, f.down, f.up, f.alpha) for n, f in fused.items()}, {}, ""
    )
    tensors = flow_formats.state_to_tensors(state, "peft")
    assert not any(k.endswith(".alpha") for k in tensors)  # diffusers' SD3 loader refuses alpha keys
    pipe = StableDiffusion3Pipeline(**dict.fromkeys(SD3_PARTS), transformer=model)
    assert _load(pipe, tensors) == []
    installed = _installed_deltas(model)
    assert set(installed) == set(shapes)
    for name, delta in installed.items():
        assert _close(delta.reshape(modules[name].delta().shape), modules[name].delta()), name
