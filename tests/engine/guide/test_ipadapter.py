"""IP-Adapter files: full-size published key layouts load strictly; the attention term matches diffusers'
own IP-Adapter path on tiny U-Nets; .bin and .safetensors read alike; unknown layouts are refused."""

from __future__ import annotations

import pytest
import torch

from cf_testing.ipadapter_files import resampler_keys as _resampler_keys
from charforge.engine.guide import attn2_patch as attn2
from charforge.engine.guide import ipadapter as ipa

# --- published layouts, written out from the shapes of the released files ------------------------------

SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10


def _image_proj(variant, cross):
    if variant == "base":
        embed = 1024 if cross == 768 else 1280
        return {
            "proj.weight": (4 * cross, embed),
            "proj.bias": (4 * cross,),
            "norm.weight": (cross,),
            "norm.bias": (cross,),
        }
    if variant in ("plus", "plus_face"):
        dim, heads = (768, 12) if cross == 768 else (1280, 20)
        return _resampler_keys(dim, heads, 16, 1280, cross)
    if variant == "full_face":
        return {
            "proj.0.weight": (1280, 1280),
            "proj.0.bias": (1280,),
            "proj.2.weight": (cross, 1280),
            "proj.2.bias": (cross,),
            "proj.3.weight": (cross,),
            "proj.3.bias": (cross,),
        }
    face = {
        "proj.0.weight": (1024, 512),
        "proj.0.bias": (1024,),
        "proj.2.weight": (4 * cross, 1024),
        "proj.2.bias": (4 * cross,),
        "norm.weight": (cross,),
        "norm.bias": (cross,),
    }
    if variant == "faceid":
        return face
    if variant == "faceid_plus":
        return face | _resampler_keys(
            cross, cross // 64, 16, 1280, cross, "perceiver_resampler.", latents=False
        )
    assert variant == "instantid"
    return _resampler_keys(1280, 20, 16, 512, 2048)


def _ip_layers(widths, cross, faceid_lora=False):
    keys = {}
    for n, width in enumerate(widths):
        keys[f"{2 * n + 1}.to_k_ip.weight"] = keys[f"{2 * n + 1}.to_v_ip.weight"] = (width, cross)
        if (
            faceid_lora
        ):  # rank-128 LoRA on every attention layer: self-attention (2n) and cross-attention (2n+1)
            for index, kv_in in ((2 * n, width), (2 * n + 1, cross)):
                for name, inp in (
                    ("to_q_lora", width),
                    ("to_k_lora", kv_in),
                    ("to_v_lora", kv_in),
                    ("to_out_lora", width),
                ):
                    keys[f"{index}.{name}.down.weight"] = (128, inp)
                    keys[f"{index}.{name}.up.weight"] = (width, 128)
    return keys


def _meta(shapes):
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}


CASES = [
    (v, fam)
    for v in ("base", "plus", "plus_face", "full_face", "faceid", "faceid_plus")
    for fam in ("sd15", "sdxl")
]


@pytest.mark.parametrize(("variant", "family"), CASES + [("instantid", "sdxl")])
def test_published_layouts_load_with_every_tensor_used(variant, family):
    cross, widths = (768, SD15_WIDTHS) if family == "sd15" else (2048, SDXL_WIDTHS)
    proj = _image_proj(variant, cross)
    layers = _ip_layers(widths, cross, faceid_lora=variant.startswith("faceid"))
    name = {"plus_face": "ip-adapter-plus-face_x.safetensors"}.get(variant, f"{variant}.bin")
    adapter = ipa.build_ip_adapter({"image_proj": _meta(proj), "ip_adapter": _meta(layers)}, name=name)

    assert adapter.variant == variant and adapter.family == family and adapter.cross_dim == cross
    assert adapter.layer_ids == list(range(1, 2 * len(widths), 2))
    assert [layer.to_k_ip.weight.shape[0] for layer in adapter.layers] == widths
    assert {k: tuple(t.shape) for k, t in adapter.projection.state_dict().items()} == proj
    used = {
        f"{i}.{k}"
        for i, layer in zip(adapter.layer_ids, adapter.layers, strict=True)
        for k in layer.state_dict()
    }
    used |= {f"{i}.{k}" for i, lora in adapter.lora.items() for k in lora.state_dict()}
    assert used == set(layers)
    expected_tokens = {"full_face": None, "plus": 16, "plus_face": 16, "instantid": 16}.get(variant, 4)
    assert adapter.tokens_per_image == expected_tokens


def test_unknown_layouts_are_refused_by_key_name():
    groups = {
        "image_proj": {"mystery.weight": torch.zeros(2, 2)},
        "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 2)},
    }
    with pytest.raises(ipa.IPAdapterLayoutError, match="mystery.weight"):
        ipa.build_ip_adapter(groups, name="odd.bin")
    proj = {k: torch.zeros(s) for k, s in _image_proj("base", 8).items()}
    with pytest.raises(ipa.IPAdapterLayoutError, match="1.to_x_ip.weight"):
        ipa.build_ip_adapter({"image_proj": proj, "ip_adapter": {"1.to_x_ip.weight": torch.zeros(4, 8)}})
    proj["proj.weight"] = torch.zeros(4 * 8, 5)
    proj["norm.bias"] = torch.zeros(9)  # a tensor of the wrong shape is named too
    with pytest.raises(ipa.IPAdapterLayoutError, match=r"norm.bias \(9,\) != \(8,\)"):
        ipa.build_ip_adapter({"image_proj": proj, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 8)}})
    with pytest.raises(ipa.IPAdapterLayoutError, match="model.diffusion"):
        ipa.split_groups({"model.diffusion_model.x": torch.zeros(1)})


def test_bin_and_safetensors_of_the_same_weights_load_alike(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    groups = {
        "image_proj": {k: torch.randn(s) for k, s in _image_proj("faceid", 16).items()},
        "ip_adapter": {k: torch.randn(s) for k, s in _ip_layers([8, 16], 16, faceid_lora=True).items()},
    }
    torch.save(groups, tmp_path / "a.bin")
    save_file({f"{g}.{k}": t for g, sd in groups.items() for k, t in sd.items()}, tmp_path / "a.safetensors")
    from_bin = ipa.load_ip_adapter(tmp_path / "a.bin")
    from_st = ipa.load_ip_adapter(tmp_path / "a.safetensors")
    assert from_bin.variant == from_st.variant == "faceid"
    for a, b in ((from_bin.projection, from_st.projection), (from_bin.layers, from_st.layers)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    deltas = from_bin.lora_deltas()
    assert set(deltas) == {0, 1, 2, 3}
    assert torch.equal(
        deltas[1]["to_k"],
        groups["ip_adapter"]["1.to_k_lora.up.weight"] @ groups["ip_adapter"]["1.to_k_lora.down.weight"],
    )
    with pytest.raises(FileNotFoundError, match="models/ipadapter"):
        ipa.load_ip_adapter(tmp_path / "missing.safetensors")


# --- numerical agreement with diffusers on tiny U-Nets -------------------------------------------------


def _tiny_unet(sdxl):
    from diffusers import UNet2DConditionModel

    common = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")
        if sdxl
        else ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")
        if sdxl
        else ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=(2, 4) if sdxl else 8,
    )
    if sdxl:
        common |= dict(
            cross_attention_dim=64,
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=80,
        )
    else:
        common |= dict(cross_attention_dim=32)
    torch.manual_seed(1)
    return UNet2DConditionModel(**common).eval()


class _OurProcessor:
    """Cross-attention through the engine's `cross_attention` (diffusers only supplies the projections)."""

    def __init__(self, layer, terms_for):
        self.layer, self.terms_for = layer, terms_for

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        out = ipa.cross_attention(q, k, v, attn.heads, self.terms_for(self.layer))
        return attn.to_out[1](attn.to_out[0](out))


def _set_diffusers_adapter(unet, scale, clip_hidden=None):
    """diffusers' U-Net with IP-Adapter weights loaded: every IP-Adapter processor at `scale`; with
    `clip_hidden` (FaceID Plus v2) the projection takes those CLIP hidden states and adds the face tokens
    back at 0.8."""
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [scale]
    if clip_hidden is not None:
        reference = unet.encoder_hid_proj.image_projection_layers[0]
        reference.clip_embeds, reference.shortcut, reference.shortcut_scale = clip_hidden, True, 0.8


def _random_file(unet, variant, embed):
    """A random IP-Adapter state dict for ``unet`` (published key names, layer numbering as in the files)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    cross = unet.config.cross_attention_dim
    names = list(unet.attn_processors)
    widths = []
    for n, name in enumerate(names):
        if name.endswith("attn2.processor"):
            assert n % 2 == 1 and names[n - 1].endswith("attn1.processor")
            widths.append(unet.get_submodule(name.removesuffix(".processor")).to_q.out_features)
    if variant == "base":
        proj = {
            "proj.weight": (4 * cross, embed),
            "proj.bias": (4 * cross,),
            "norm.weight": (cross,),
            "norm.bias": (cross,),
        }
    elif variant == "plus":
        proj = _resampler_keys(64, 2, 16, embed, cross)
    elif variant == "full_face":
        proj = {
            "proj.0.weight": (embed, embed),
            "proj.0.bias": (embed,),
            "proj.2.weight": (cross, embed),
            "proj.2.bias": (cross,),
            "proj.3.weight": (cross,),
            "proj.3.bias": (cross,),
        }
    else:
        proj = {
            "proj.0.weight": (1024, 512),  # diffusers derives the hidden width as a multiple of 512
            "proj.0.bias": (1024,),
            "proj.2.weight": (4 * cross, 1024),
            "proj.2.bias": (4 * cross,),
            "norm.weight": (cross,),
            "norm.bias": (cross,),
        }
        if variant == "faceid_plus":  # its resampler works at the cross width, heads of 64
            proj |= _resampler_keys(
                cross, cross // 64, 16, embed, cross, "perceiver_resampler.", latents=False
            )
    torch.manual_seed(2)
    shapes = {"image_proj": proj, "ip_adapter": _ip_layers(widths, cross)}
    return {
        g: {k: torch.randn(s) * (0.2 if len(s) > 1 else 1.0) for k, s in sd.items()}
        for g, sd in shapes.items()
    }


@pytest.mark.parametrize(
    ("variant", "sdxl"),
    [
        ("base", False),
        ("plus", False),
        ("full_face", False),
        ("faceid", False),
        ("base", True),
        ("plus", True),
        ("faceid_plus", True),
    ],
)
def test_unet_output_matches_diffusers_ip_adapter(variant, sdxl):
    unet = _tiny_unet(sdxl)
    embed = {"base": 24, "plus": 40, "full_face": 40, "faceid": 512, "faceid_plus": 40}[variant]
    groups = _random_file(unet, variant, embed)
    torch.manual_seed(3)
    batch = 2
    image = (
        torch.randn(batch, 1, 5, embed) if variant in ("plus", "full_face") else torch.randn(batch, 1, embed)
    )
    clip_hidden = None
    if variant == "faceid_plus":  # a face embedding, plus CLIP hidden states of the face crop
        image, clip_hidden = torch.randn(batch, 1, 512), torch.randn(batch, 1, 5, embed)
    sample = torch.randn(batch, 4, 8, 8)
    text = torch.randn(batch, 7, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.randn(batch, 6)} if sdxl else {}
    scale = 0.7

    with torch.no_grad():
        plain = unet(sample, 10, text, added_cond_kwargs=dict(added) or None).sample

        ours = ipa.build_ip_adapter(groups, name=f"{variant}.bin")
        assert ours.variant == variant
        if variant == "faceid_plus":  # v2: the face tokens added back at 0.8
            tokens = ours.projection(image[:, 0], clip_hidden[:, 0], shortcut=True, shortcut_scale=0.8)
        else:
            tokens = ours.projection(image[:, 0])
        processors = {}
        layers = iter(ours.layers)
        for name in unet.attn_processors:
            if name.endswith("attn2.processor"):
                processors[name] = _OurProcessor(
                    next(layers), lambda layer: [ipa.IPTerm(tokens, layer, scale)]
                )
            else:
                processors[name] = unet.attn_processors[name]
        assert next(layers, None) is None  # every layer of the file has its place in the U-Net
        unet.set_attn_processor(processors)
        our_out = unet(sample, 10, text, added_cond_kwargs=dict(added) or None).sample

        unet._load_ip_adapter_weights([groups])
        _set_diffusers_adapter(unet, scale, clip_hidden)
        reference_tokens = unet.encoder_hid_proj([image])[0]
        theirs = unet(sample, 10, text, added_cond_kwargs=added | {"image_embeds": [image]}).sample

    assert torch.allclose(tokens, reference_tokens[:, 0], atol=1e-5, rtol=1e-4)
    assert (our_out - plain).abs().max() > 1e-3  # the adapter changes the output
    assert torch.allclose(our_out, theirs, atol=1e-5, rtol=1e-4), (our_out - theirs).abs().max()


def test_weight_zero_and_masks_select_where_the_adapter_acts():
    torch.manual_seed(4)
    layer = ipa.IPLayer(16, 32)
    q, k, v = torch.randn(1, 12, 32), torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    tokens = torch.randn(1, 4, 16)
    plain = ipa.cross_attention(q, k, v, 4)
    assert torch.equal(ipa.cross_attention(q, k, v, 4, [ipa.IPTerm(tokens, layer, 0.0)]), plain)
    full = ipa.cross_attention(q, k, v, 4, [ipa.IPTerm(tokens, layer, 0.5)])
    half = torch.zeros(1, 12)
    half[:, :6] = 1
    masked = ipa.cross_attention(q, k, v, 4, [ipa.IPTerm(tokens, layer, 0.5, half)])
    assert torch.allclose(masked[:, :6], full[:, :6]) and torch.allclose(masked[:, 6:], plain[:, 6:])
    assert not torch.allclose(full[:, 6:], plain[:, 6:])
    # two adapters add their terms
    other = ipa.IPLayer(16, 32)
    both = ipa.cross_attention(q, k, v, 4, [ipa.IPTerm(tokens, layer, 0.5), ipa.IPTerm(tokens, other, 0.3)])
    second = ipa.cross_attention(q, k, v, 4, [ipa.IPTerm(tokens, other, 0.3)])
    assert torch.allclose(both, full + second - plain, atol=1e-6)
    assert ipa.gate(0.8, 0.2, 0.6, 0.1) == 0.0 and ipa.gate(0.8, 0.2, 0.6, 0.4) == 0.8
    image_mask = torch.zeros(1, 64, 64)
    image_mask[:, :, :32] = 1
    grid = ipa.mask_for_layer(image_mask, 4, 4).reshape(4, 4)
    assert torch.equal(grid[:, :2], torch.ones(4, 2)) and torch.equal(grid[:, 2:], torch.zeros(4, 2))


# --- ComfyUI's attn2-replace convention (engine side; registering it in ComfyUI is the bridge's part) ----


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_comfy_slots_follow_the_file_layer_order(family):
    """ComfyUI's input block n is diffusers' down block (n-1)//3, attention (n-1)%3; output block n is up
    block n//3, attention n%3; the full-size U-Net (meta device) numbers its cross-attentions in that order."""
    from diffusers import UNet2DConditionModel

    if family == "sd15":
        config = dict(cross_attention_dim=768, attention_head_dim=8)
    else:
        config = dict(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    theirs = [name.removesuffix(".processor") for name in unet.attn_processors if "attn2" in name]

    def diffusers_name(block, number, index):
        if block == "input":
            place = f"down_blocks.{(number - 1) // 3}.attentions.{(number - 1) % 3}"
        elif block == "output":
            place = f"up_blocks.{number // 3}.attentions.{number % 3}"
        else:
            place = "mid_block.attentions.0"
        return f"{place}.transformer_blocks.{index}.attn2"

    slots = attn2.comfy_attn2_slots(family)
    assert [diffusers_name(*slot) for slot in slots] == theirs
    widths = SD15_WIDTHS if family == "sd15" else SDXL_WIDTHS
    assert [unet.get_submodule(name).to_q.out_features for name in theirs] == widths


class _PatchProcessor:
    """Calls a ComfyUI-style attn2 replacement as ComfyUI's transformer block does: projected q, k, v."""

    def __init__(self, patch, options):
        self.patch, self.options = patch, options

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        q = attn.to_q(hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        side = int(round(hidden_states.shape[1] ** 0.5))
        options = dict(
            self.options, n_heads=attn.heads, activations_shape=[q.shape[0], q.shape[2], side, side]
        )
        return attn.to_out[1](attn.to_out[0](self.patch(q, k, v, options)))


def _run_with_patches(unet, adapter, inputs, options, sample, text, added):
    processors, n = {}, 0
    for name, processor in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            processors[name] = _PatchProcessor(attn2.IPAttn2Patch(inputs, n), options)
            n += 1
        else:
            processors[name] = processor
    assert n == len(adapter.layers)
    unet.set_attn_processor(processors)
    return unet(sample, 10, text, added_cond_kwargs=added).sample


def test_attn2_patch_with_a_cfg_batch_matches_diffusers():
    """Negative and positive prompt in one batch (ComfyUI's cond_or_uncond), plus adapter, SDXL-like U-Net."""
    unet = _tiny_unet(sdxl=True)
    groups = _random_file(unet, "plus", 40)
    adapter = ipa.build_ip_adapter(groups, name="plus.bin")
    torch.manual_seed(5)
    negative, positive = torch.randn(1, 1, 5, 40), torch.randn(1, 1, 5, 40)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 64)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        plain = unet(sample, 10, text, added_cond_kwargs=added).sample
        item = attn2.AdapterInput(
            adapter, adapter.projection(positive[:, 0]), adapter.projection(negative[:, 0]), weight=0.6
        )
        options = {"cond_or_uncond": [1, 0], "sigmas": torch.tensor([3.0, 3.0])}
        ours = _run_with_patches(unet, adapter, [item], options, sample, text, added)
        # outside its sigma range the adapter leaves the output alone
        late = attn2.AdapterInput(item.adapter, item.cond_tokens, item.uncond_tokens, 0.6, sigma_start=2.0)
        gated = _run_with_patches(unet, adapter, [late], options, sample, text, added)
        # a mask of ones over the picture is the same as no mask
        ones = attn2.AdapterInput(
            item.adapter, item.cond_tokens, item.uncond_tokens, 0.6, mask=torch.ones(1, 64, 64)
        )
        masked = _run_with_patches(unet, adapter, [ones], options, sample, text, added)

        unet._load_ip_adapter_weights([groups])
        for processor in unet.attn_processors.values():
            if hasattr(processor, "scale"):
                processor.scale = [0.6]
        image = torch.cat([negative, positive])  # row 0 is the negative prompt, as cond_or_uncond says
        theirs = unet(sample, 10, text, added_cond_kwargs=added | {"image_embeds": [image]}).sample

    assert (ours - plain).abs().max() > 1e-3
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4), (ours - theirs).abs().max()
    assert torch.allclose(gated, plain, atol=1e-6)
    assert torch.allclose(masked, ours, atol=1e-6)
