"""The LoRA inside FaceID IP-Adapter files, mapped onto U-Net weights: the same U-Net output as diffusers'
own FaceID loading (``load_ip_adapter``: adapter weights plus the file's LoRA through peft) on tiny
U-Nets; every LoRA tensor of the full-size SD1.5 and SDXL layouts lands on a weight of the right shape, in
diffusers' and in ComfyUI's (LDM) names; a LoRA for another U-Net is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from engine.guide.test_ipadapter import (
    SD15_WIDTHS,
    SDXL_WIDTHS,
    _image_proj,
    _ip_layers,
    _meta,
    _OurProcessor,
    _random_file,
    _set_diffusers_adapter,
    _tiny_unet,
)

from charforge.engine.guide import attn2_patch as attn2
from charforge.engine.guide import faceid_lora as fl
from charforge.engine.guide import ipadapter as ipa
from charforge.engine.models.single_file import unet_to_ldm


def _with_lora(unet, groups):
    """Random FaceID LoRA factors for every attention layer of ``unet`` added to a file's ``ip_adapter``."""
    widths = [
        unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
        for name in unet.attn_processors
        if name.endswith("attn2.processor")
    ]
    shapes = _ip_layers(widths, unet.config.cross_attention_dim, faceid_lora=True)
    torch.manual_seed(6)
    groups["ip_adapter"] |= {k: torch.randn(s) * 0.1 for k, s in shapes.items() if "_lora." in k}
    return groups


@pytest.mark.parametrize(("variant", "sdxl"), [("faceid", False), ("faceid_plus", True)])
def test_unet_with_faceid_lora_matches_diffusers(variant, sdxl):
    unet = _tiny_unet(sdxl)
    embed = 512 if variant == "faceid" else 40
    groups = _with_lora(unet, _random_file(unet, variant, embed))
    torch.manual_seed(3)
    batch, scale, lora_scale = 2, 0.7, 0.6
    face = torch.randn(batch, 1, 512)
    clip_hidden = torch.randn(batch, 1, 5, embed)
    sample = torch.randn(batch, 4, 8, 8)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)} if sdxl else {}
    ours_unet = copy.deepcopy(unet)

    with torch.no_grad():
        adapter = ipa.build_ip_adapter(groups, name=f"{variant}.bin")
        assert len(adapter.lora) == len(unet.attn_processors)
        if variant == "faceid_plus":
            tokens = adapter.projection(face[:, 0], clip_hidden[:, 0], shortcut=True, shortcut_scale=0.8)
        else:
            tokens = adapter.projection(face[:, 0])
        # ours: the LoRA's weight changes added to the U-Net's weights, the adapter's term in attn2
        factors = fl.faceid_lora_weights(adapter.lora, unet.config)
        assert len(factors) == 4 * len(adapter.lora)
        for key, (up, down) in factors.items():
            ours_unet.get_parameter(key).add_(lora_scale * up @ down)
        layers = iter(adapter.layers)
        processors = {
            name: _OurProcessor(next(layers), lambda layer: [ipa.IPTerm(tokens, layer, scale)])
            if name.endswith("attn2.processor")
            else processor
            for name, processor in ours_unet.attn_processors.items()
        }
        ours_unet.set_attn_processor(processors)
        ours = ours_unet(sample, 10, text, added_cond_kwargs=dict(added) or None).sample
        without_lora = copy.deepcopy(ours_unet)
        for key, (up, down) in factors.items():
            without_lora.get_parameter(key).sub_(lora_scale * up @ down)
        no_lora = without_lora(sample, 10, text, added_cond_kwargs=dict(added) or None).sample

        # diffusers: IPAdapterMixin.load_ip_adapter's steps on the bare U-Net
        unet._load_ip_adapter_weights([groups])
        for name, lora in unet._load_ip_adapter_loras([groups]).items():
            unet.load_lora_adapter(lora, prefix="unet", adapter_name=f"faceid_{name}")
            unet.set_adapters([f"faceid_{name}"], weights=[lora_scale])
        _set_diffusers_adapter(unet, scale, clip_hidden if variant == "faceid_plus" else None)
        theirs = unet(sample, 10, text, added_cond_kwargs=added | {"image_embeds": [face]}).sample

    assert (ours - no_lora).abs().max() > 1e-3  # the LoRA changes the output
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_full_size_lora_covers_every_attention_weight_in_both_layouts(family):
    cross, widths = (768, SD15_WIDTHS) if family == "sd15" else (2048, SDXL_WIDTHS)
    layers = _ip_layers(widths, cross, faceid_lora=True)
    adapter = ipa.build_ip_adapter(
        {"image_proj": _meta(_image_proj("faceid", cross)), "ip_adapter": _meta(layers)}, name="faceid.bin"
    )
    config = fl.family_unet_config(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    shapes = {key: tuple(t.shape) for key, t in unet.state_dict().items()}
    attention = [name.removesuffix(".processor") for name in unet.attn_processors]
    assert fl.attention_layers(config) == attention

    diffusers_names = fl.faceid_lora_weights(adapter.lora, config)
    ldm_names = fl.faceid_lora_weights(adapter.lora, config, ldm=True)
    # every tensor of the file's LoRA is used once, on the weight of its layer and projection
    lora_keys = [key for key in layers if "_lora." in key]
    assert len(diffusers_names) == len(lora_keys) // 2 == 4 * len(attention)
    for index, name in enumerate(attention):
        for factor, proj in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            up, down = diffusers_names[f"{name}.{proj}.weight"]
            assert up.shape == layers[f"{index}.{factor}_lora.up.weight"]
            assert down.shape == layers[f"{index}.{factor}_lora.down.weight"]
            assert shapes[f"{name}.{proj}.weight"] == (up.shape[0], down.shape[1])
    # ComfyUI's names are the single-file (LDM) names of the same weights, in the same order
    assert list(ldm_names) == list(unet_to_ldm(dict.fromkeys(diffusers_names), config))
    for ldm_key, diffusers_key in zip(ldm_names, diffusers_names, strict=True):
        assert [t.shape for t in ldm_names[ldm_key]] == [t.shape for t in diffusers_names[diffusers_key]]
    # and the cross-attention ones sit in the blocks ComfyUI's attn2 replacement slots address
    prefix = {"input": "input_blocks.{}.1", "output": "output_blocks.{}.1", "middle": "middle_block.1"}
    slots = [
        f"{prefix[block].format(number)}.transformer_blocks.{index}.attn2.to_k.weight"
        for block, number, index in attn2.comfy_attn2_slots(family)
    ]
    assert [key for key in ldm_names if ".attn2.to_k." in key] == slots


def test_a_lora_for_another_unet_is_refused():
    layers = _ip_layers(SD15_WIDTHS, 768, faceid_lora=True)
    adapter = ipa.build_ip_adapter(
        {"image_proj": _meta(_image_proj("faceid", 768)), "ip_adapter": _meta(layers)}, name="faceid.bin"
    )
    with pytest.raises(ipa.IPAdapterLayoutError, match=r"32 attention layers.*has 140.*another base model"):
        fl.faceid_lora_weights(adapter.lora, fl.family_unet_config("sdxl"))
    del adapter.lora[5]  # a gap in the layer numbers
    with pytest.raises(ipa.IPAdapterLayoutError, match="31 attention layers"):
        fl.faceid_lora_weights(adapter.lora, fl.family_unet_config("sd15"))
