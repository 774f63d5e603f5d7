"""The LoRA library on Flux and SD3/SD3.5 LoRAs: layouts read and written, info, merge, resize, convert.

Files are random LoRAs on every adaptable weight of tiny variants of the real layouts (cf_testing/lora_files.py:
the same blocks and embedders as the full-size models at toy widths), plus full-size shapes where the answer
depends on them (which variant a file fits).
"""

from __future__ import annotations

import pytest
import torch

from cf_testing.lora_files import FLUX_TINY, SD3_TINY, random_flow_state, random_split_modules
from charforge.engine.library import flow_layouts as fl
from charforge.engine.library import formats
from charforge.engine.library.formats import LoraFormatError, LoraModule, LoraState
from charforge.engine.library.inspect import inspect_lora
from charforge.engine.library.merge import merge_files, merge_states, resize_file, resize_state


def _deltas(state: LoraState) -> dict:
    return {key: module.delta() for key, module in state.modules.items()}


def _close(a, b, tol=1e-5) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def _from_split(variant, seed=0, rank=2, alpha=4.0) -> LoraState:
    """A LoRA as our trainer makes it: split diffusers modules (every one a part), fused by the library."""
    shapes = {}
    for name, shape in fl.lora_targets(variant).items():
        target = fl.target_from_single_file(variant.family, name)
        for part, rows in zip(target.parts, fl.part_rows(target, shape[0]), strict=True):
            shapes[part] = (rows, *shape[1:])
    fused = fl.fuse_modules(variant.family, random_split_modules(shapes, seed=seed, rank=rank, alpha=alpha))
    modules = {("unet", n): LoraModule("unet", n, f.down, f.up, f.alpha) for n, f in fused.items()}
    return LoraState(variant.family, modules, {"modelspec.trigger_phrase": f"sks{seed}"}, "")


@pytest.mark.parametrize("variant", [FLUX_TINY, SD3_TINY], ids=lambda v: v.family)
@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_each_layout_round_trips_through_a_file(tmp_path, variant, fmt):
    state = _from_split(variant)
    path = formats.write_state(state, tmp_path / f"{fmt}.safetensors", fmt)
    back = formats.read_state(path)
    assert back.arch == variant.family and back.source_format == fmt
    assert back.modules.keys() == state.modules.keys()
    for key, module in state.modules.items():
        if fmt == "peft":  # alpha folded into the up matrices: same effect
            assert _close(back.modules[key].delta(), module.delta()), key
        else:
            assert torch.equal(back.modules[key].down, module.down) and torch.equal(
                back.modules[key].up, module.up
            )
            assert float(back.modules[key].alpha) == float(module.alpha)
    # Converting back from peft gives the fused layout again, tensors and all (alpha = rank: scale folded).
    again = formats.read_state(formats.write_state(back, tmp_path / f"{fmt}-kohya.safetensors", "kohya"))
    assert _deltas(again).keys() == state.modules.keys()
    assert all(_close(again.modules[k].delta(), m.delta()) for k, m in state.modules.items())


def test_peft_files_use_diffusers_split_names(tmp_path):
    tensors = formats.state_to_tensors(_from_split(FLUX_TINY), "peft")
    assert "transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight" in tensors
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in tensors
    assert "transformer.norm_out.linear.lora_B.weight" in tensors
    kohya = formats.state_to_tensors(_from_split(FLUX_TINY), "kohya")
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in kohya
    assert "lora_unet_final_layer_adaLN_modulation_1.alpha" in kohya
    sd3 = formats.state_to_tensors(_from_split(SD3_TINY), "comfyui")
    assert "diffusion_model.joint_blocks.0.x_block.attn2.qkv.lora_down.weight" in sd3
    assert "diffusion_model.joint_blocks.1.context_block.attn.proj.lora_up.weight" not in sd3  # pre-only


def test_text_encoder_modules_convert_and_t5_is_refused(tmp_path):
    state = _from_split(SD3_TINY)
    g = torch.Generator().manual_seed(1)
    for component, width in (("te1", 768), ("te2", 1280)):
        name = "text_model.encoder.layers.3.self_attn.q_proj"
        state.modules[(component, name)] = LoraModule(
            component, name, torch.randn(2, width, generator=g), torch.randn(width, 2, generator=g), None
        )
    kohya = formats.state_to_tensors(state, "kohya")
    assert "lora_te2_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight" in kohya
    peft = formats.state_to_tensors(state, "peft")
    assert "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj.lora_A.weight" in peft
    back = formats.state_from_tensors(peft)
    assert ("te2", "text_model.encoder.layers.3.self_attn.q_proj") in back.modules
    kohya["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 4)
    kohya["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(4, 2)
    with pytest.raises(LoraFormatError, match="T5 text-encoder LoRA modules are not supported"):
        formats.state_from_tensors(kohya)


def test_unknown_transformer_modules_are_refused_by_name():
    tensors = formats.state_to_tensors(_from_split(FLUX_TINY), "kohya")
    tensors["lora_unet_double_blocks_0_img_attn_norm.lora_down.weight"] = torch.zeros(2, 16)
    tensors["lora_unet_double_blocks_0_img_attn_norm.lora_up.weight"] = torch.zeros(16, 2)
    with pytest.raises(LoraFormatError, match="lora_unet_double_blocks_0_img_attn_norm"):
        formats.state_from_tensors(tensors)


# --------------------------------------------------------------------------------------------------
# Info


def _full_size_file(tmp_path, arch: str, names: list[str], fmt: str = "kohya"):
    variant = fl.VARIANTS[arch]
    shapes = fl.lora_targets(variant)
    modules = {
        ("unet", n): LoraModule(
            "unet", n, torch.ones(2, *shapes[n][1:]), torch.ones(shapes[n][0], 2), torch.tensor(2.0)
        )
        for n in names
    }
    state = LoraState(variant.family, modules, {}, "")
    return formats.write_state(
        state, tmp_path / f"{arch}-{fmt}-{len(list(tmp_path.iterdir()))}.safetensors", fmt
    )


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_info_names_the_family_and_the_variants_that_fit(tmp_path, fmt):
    path = _full_size_file(
        tmp_path, "flux-dev", ["double_blocks.0.img_attn.qkv", "guidance_in.in_layer"], fmt
    )
    info = inspect_lora(path)
    assert (info.base_model, info.format, info.fits) == (
        "flux",
        fmt,
        ["flux-dev"],
    )  # schnell has no guidance_in
    assert "Flux.1-dev" in info.summary()
    attention = _full_size_file(tmp_path, "sd35-medium", ["joint_blocks.3.x_block.attn.qkv"], fmt)
    assert inspect_lora(attention).fits == ["sd3-medium", "sd35-medium"]  # same width and depth
    dual = _full_size_file(tmp_path, "sd35-medium", ["joint_blocks.3.x_block.attn2.qkv"], fmt)
    assert inspect_lora(dual).fits == ["sd35-medium"]
    large = _full_size_file(tmp_path, "sd35-large", ["joint_blocks.30.context_block.mlp.fc1"], fmt)
    assert (inspect_lora(large).base_model, inspect_lora(large).fits) == ("sd3", ["sd35-large"])


def test_info_on_a_small_model_says_no_full_size_model_fits(tmp_path):
    path = formats.write_state(random_flow_state(FLUX_TINY), tmp_path / "tiny.safetensors", "kohya")
    info = inspect_lora(path)
    assert info.base_model == "flux" and info.fits == []
    assert any("shapes match no full-size model" in n for n in info.notes)
    assert any("fused weights" in n for n in info.notes)
    assert "fits: no full-size Flux.1 model" in info.summary()


# --------------------------------------------------------------------------------------------------
# Merge and resize


def test_merge_of_split_origin_loras_is_exact_and_stays_block_diagonal():
    a, b = _from_split(FLUX_TINY, seed=1, rank=2), _from_split(FLUX_TINY, seed=2, rank=2, alpha=1.0)
    merged, report = merge_states([a, b], [0.7, -0.4])
    assert report is None
    for key in a.modules:
        assert _close(
            merged.modules[key].delta(), 0.7 * a.modules[key].delta() - 0.4 * b.modules[key].delta()
        )
    qkv = fl.target_from_single_file("flux", "double_blocks.0.img_attn.qkv")
    module = merged.modules[("unet", qkv.name)]
    parts = fl.split(qkv, fl.Factors(module.down, module.up, module.alpha))
    assert [p.rank for p in parts.values()] == [4, 4, 4]  # each part: its two inputs' ranks, compact


def test_merge_with_a_natively_fused_lora_keeps_the_effect():
    split_origin = _from_split(FLUX_TINY, seed=3)
    native = random_flow_state(FLUX_TINY, seed=4)  # one dense LoRA per fused weight (kohya's own training)
    merged, _ = merge_states([split_origin, native], [1.0, 0.5])
    for key in native.modules:
        expected = split_origin.modules[key].delta() + 0.5 * native.modules[key].delta()
        assert _close(merged.modules[key].delta(), expected), key


def test_resize_of_fused_modules_truncates_each_part():
    state = _from_split(SD3_TINY, seed=5, rank=4)
    resized, report = resize_state(state, 2)
    qkv = ("unet", "joint_blocks.0.x_block.attn2.qkv")
    target = fl.target_from_single_file("sd3", qkv[1])
    parts = fl.split(
        target, fl.Factors(resized.modules[qkv].down, resized.modules[qkv].up, resized.modules[qkv].alpha)
    )
    assert [p.rank for p in parts.values()] == [2, 2, 2]
    original = fl.split(
        target, fl.Factors(state.modules[qkv].down, state.modules[qkv].up, state.modules[qkv].alpha)
    )
    for i, part in parts.items():  # each part is the best rank-2 approximation of its own delta
        s = torch.linalg.svdvals(original[i].delta())
        error = (part.delta() - original[i].delta()).norm()
        assert float(error) == pytest.approx(float(s[2:].norm()), rel=1e-4)
    assert 0 < report.retained < 1
    lossless, full = resize_state(state, 4)
    assert full.retained == pytest.approx(1.0)
    assert all(_close(lossless.modules[k].delta(), m.delta(), 1e-4) for k, m in state.modules.items())


def test_resize_of_a_natively_fused_module_is_one_svd():
    state = random_flow_state(FLUX_TINY, seed=6, rank=4)
    resized, _ = resize_state(state, 3)
    key = ("unet", "single_blocks.0.linear1")
    assert resized.modules[key].rank == 3
    s = torch.linalg.svdvals(state.modules[key].delta())
    assert float((resized.modules[key].delta() - state.modules[key].delta()).norm()) == pytest.approx(
        float(s[3:].norm()), rel=1e-4
    )


def test_merge_resize_and_convert_files(tmp_path):
    a = formats.write_state(_from_split(FLUX_TINY, seed=7), tmp_path / "a.safetensors", "peft")
    b = formats.write_state(random_flow_state(FLUX_TINY, seed=8), tmp_path / "b.safetensors", "kohya")
    merged, _ = merge_files([(a, 1.0), (b, 1.0)], tmp_path / "ab.safetensors")
    state = formats.read_state(merged)
    assert state.arch == "flux" and state.source_format == "kohya"
    assert state.metadata["modelspec.trigger_phrase"] == "sks7"
    sa, sb = formats.read_state(a), formats.read_state(b)
    for key in sb.modules:
        assert _close(state.modules[key].delta(), sa.modules[key].delta() + sb.modules[key].delta())
    small, report = resize_file(merged, tmp_path / "ab_r1.safetensors", 1, fmt="comfyui")
    assert formats.read_state(small).source_format == "comfyui"
    assert inspect_lora(small).base_model == "flux" and report.retained < 1
    converted = formats.convert_file(small, tmp_path / "ab_r1_peft.safetensors", "peft")
    assert formats.detect_format(formats.read_lora(converted)[0]) == "peft"
