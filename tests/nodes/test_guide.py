"""Guide nodes (IP-Adapter) through the ComfyUI stand-in: the folder registry and the model patcher's
attn2-replace bookkeeping (tests/cf_testing/comfy_stubs/comfy/model_patcher.py)."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cf_testing.comfyui import run_node
from charforge import bridge
from charforge.engine.guide import attn2_patch as attn2
from charforge.engine.guide import ipadapter as ipa
from charforge.nodes import guide

WIDTH, HEADS, CLIP_HIDDEN, CLIP_EMBED = 64, 2, 32, 24  # the tiny "U-Net" layers and CLIP vision widths
SLOTS = attn2.comfy_attn2_slots("sd15")


class _Sampling:
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma on the SD1.5 schedule (scaled-linear betas)."""

    def __init__(self):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas = torch.cumprod(1 - betas, 0)
        self.log_sigmas = (((1 - alphas) / alphas) ** 0.5).log()

    def percent_to_sigma(self, percent):
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        t = (1.0 - percent) * 999.0
        low, frac = int(math.floor(t)), t - math.floor(t)
        high = min(low + 1, 999)
        return float(((1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]).exp())


def _model(weights=None):
    from comfy.model_patcher import ModelPatcher

    return ModelPatcher(weights or {}, objects={"model_sampling": _Sampling()})


class _ClipVision:
    """A CLIP vision stand-in with ComfyUI's ``encode_image`` output keys (fixed random linear maps)."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.hidden = torch.randn(3, 5 * CLIP_HIDDEN, generator=g)
        self.embed = torch.randn(3, CLIP_EMBED, generator=g)

    def encode_image(self, image, crop=True):
        pooled = image.mean(dim=(1, 2)) + 0.1  # [B, 3]; an all-black image still encodes to something
        return {
            "penultimate_hidden_states": (pooled @ self.hidden).reshape(-1, 5, CLIP_HIDDEN),
            "image_embeds": pooled @ self.embed,
        }


def _write(folder, name, variant, seed=0, lora_rank=None):
    torch.manual_seed(seed)
    if variant == "plus":
        proj = ipa.PerceiverResampler(16, 1, 4, CLIP_HIDDEN, 768, depth=1, ff_mult=2)
    elif variant == "base":
        proj = ipa.LinearTokens(CLIP_EMBED, 768, tokens=2)
    else:
        proj = ipa.FaceIdTokens(512, 16, 768, tokens=2)
    state = {f"image_proj.{k}": v.detach().clone() for k, v in proj.state_dict().items()}
    for n in range(16):
        for key in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{key}.weight"] = torch.randn(WIDTH, 768) * 0.05
    if lora_rank:  # FaceID's LoRA: q, k, v, out of every attention layer (self 2n, cross 2n + 1)
        for index in range(32):
            for key in LORA_FACTORS:
                inp = 768 if index % 2 and key in ("to_k", "to_v") else WIDTH
                state[f"ip_adapter.{index}.{key}_lora.down.weight"] = torch.randn(lora_rank, inp) * 0.1
                state[f"ip_adapter.{index}.{key}_lora.up.weight"] = torch.randn(WIDTH, lora_rank) * 0.1
    save_file(state, str(folder / name))
    return name


LORA_FACTORS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
# ComfyUI's SD1.5 attention blocks in the file's layer order; block b holds attention layers 2b and 2b + 1.
SD15_BLOCKS = (
    [f"input_blocks.{n}.1" for n in (1, 2, 4, 5, 7, 8)]
    + [f"output_blocks.{n}.1" for n in range(3, 12)]
    + ["middle_block.1"]
)


def _lora_targets():
    """{file key stem ("5.to_k"): ComfyUI weight key} for the SD1.5 layout."""
    return {
        f"{2 * b + (attn == 'attn2')}.{key}": f"diffusion_model.{block}.transformer_blocks.0.{attn}.{proj}.weight"
        for b, block in enumerate(SD15_BLOCKS)
        for attn in ("attn1", "attn2")
        for key, proj in LORA_FACTORS.items()
    }


def _attend(q, k, v):
    b, n, _ = q.shape
    q, k, v = (t.reshape(b, -1, HEADS, WIDTH // HEADS).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, WIDTH)


def _expected(adapter, layer, q, k, v, rows, weight):
    """Plain attention plus ``weight`` × attention over the image tokens of each row (negative / positive)."""
    ip = adapter.layers[layer]
    tokens = torch.cat(rows)
    return _attend(q, k, v) + weight * _attend(q, ip.to_k_ip(tokens), ip.to_v_ip(tokens))


def _call(model, slot, q, k, v, sigma):
    patch = model.model_options["transformer_options"]["patches_replace"]["attn2"][slot]
    options = {"n_heads": HEADS, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([sigma, sigma])}
    with torch.no_grad():
        return patch(q, k, v, options)


def test_without_a_file_the_loader_names_the_folder_and_files(ipadapter_env):
    names = guide.LoadIPAdapter.INPUT_TYPES()["required"]["ipadapter_name"][0]
    assert names == [guide.NO_ADAPTER]
    with pytest.raises(
        bridge.ModelNotFoundError, match=r"models/ipadapter.*ip-adapter-plus_sd15.*clip_vision"
    ):
        run_node(guide.LoadIPAdapter, ipadapter_name=guide.NO_ADAPTER)
    with pytest.raises(bridge.ModelNotFoundError, match="models/ipadapter"):
        run_node(guide.LoadIPAdapter, ipadapter_name="gone.safetensors")


@pytest.mark.parametrize("variant", ["plus", "base"])
def test_apply_patches_every_cross_attention_slot_with_clip_vision_tokens(ipadapter_env, variant):
    name = _write(ipadapter_env.ipadapter, f"ip-adapter-{variant}_sd15.safetensors", variant)
    assert guide.LoadIPAdapter.INPUT_TYPES()["required"]["ipadapter_name"][0] == [name]
    loaded, shown = run_node(guide.LoadIPAdapter, ipadapter_name=name).result
    assert shown == f"{variant} (sd15)"
    model, clip_vision = _model(), _ClipVision()
    image = torch.rand(1, 32, 32, 3)
    (patched,) = run_node(
        guide.ApplyIPAdapter,
        model=model,
        ipadapter=loaded,
        clip_vision=clip_vision,
        image=image,
        weight=0.7,
        start_at=0.0,
        end_at=0.5,
    ).result
    assert model.model_options == {"transformer_options": {}}  # the input MODEL is left alone
    assert list(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == SLOTS

    adapter, proj = loaded.adapter, loaded.adapter.projection
    with torch.no_grad():
        if variant == "plus":  # penultimate hidden states; the negative is an all-black image
            cond = proj(clip_vision.encode_image(image)["penultimate_hidden_states"])
            uncond = proj(clip_vision.encode_image(torch.zeros(1, 224, 224, 3))["penultimate_hidden_states"])
        else:  # the image embedding; the negative is a zero embedding
            embeds = clip_vision.encode_image(image)["image_embeds"]
            cond, uncond = proj(embeds), proj(torch.zeros_like(embeds))
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 16, WIDTH), torch.randn(2, 7, WIDTH), torch.randn(2, 7, WIDTH)
    sampling = _Sampling()
    early = sampling.percent_to_sigma(0.2)
    for layer in (0, 9, 15):
        with torch.no_grad():
            want = _expected(adapter, layer, q, k, v, [uncond, cond], 0.7)
        torch.testing.assert_close(_call(patched, SLOTS[layer], q, k, v, early), want, atol=1e-5, rtol=1e-5)
    # after end_at (a smaller sigma) the layer is plain attention
    late = sampling.percent_to_sigma(0.8)
    torch.testing.assert_close(
        _call(patched, SLOTS[3], q, k, v, late), _attend(q, k, v), atol=1e-5, rtol=1e-5
    )


def test_adapters_chain_and_clones_share_their_weights(ipadapter_env):
    first = run_node(
        guide.LoadIPAdapter, ipadapter_name=_write(ipadapter_env.ipadapter, "a_plus.safetensors", "plus")
    ).result[0]
    second = run_node(
        guide.LoadIPAdapter, ipadapter_name=_write(ipadapter_env.ipadapter, "b.safetensors", "base", 2)
    ).result[0]
    common = {"clip_vision": _ClipVision(), "image": torch.rand(2, 16, 16, 3), "start_at": 0.0, "end_at": 1.0}
    (one,) = run_node(guide.ApplyIPAdapter, model=_model(), ipadapter=first, weight=1.0, **common).result
    (two,) = run_node(guide.ApplyIPAdapter, model=one, ipadapter=second, weight=0.5, **common).result
    patch_one = one.model_options["transformer_options"]["patches_replace"]["attn2"][SLOTS[4]]
    patch_two = two.model_options["transformer_options"]["patches_replace"]["attn2"][SLOTS[4]]
    assert [i.adapter for i in patch_one.inputs] == [first.adapter]
    assert [i.adapter for i in patch_two.inputs] == [first.adapter, second.adapter]
    # two reference images: their tokens side by side (4 latents each for the plus file)
    assert patch_one.inputs[0].cond_tokens.shape == (1, 8, 768)
    assert patch_one.inputs[0].uncond_tokens.shape == (1, 8, 768)
    # ComfyUI deep-copies model options on every clone; the adapters are shared, not copied
    copied = two.clone().model_options["transformer_options"]["patches_replace"]["attn2"][SLOTS[4]]
    assert copied is not patch_two and copied.inputs[1].adapter is second.adapter
    q, k, v = torch.randn(2, 16, WIDTH), torch.randn(2, 7, WIDTH), torch.randn(2, 7, WIDTH)
    with torch.no_grad():
        alone = _call(one, SLOTS[4], q, k, v, 5.0)
        both = _call(two, SLOTS[4], q, k, v, 5.0)
        extra = second.adapter.layers[4]
        tokens = torch.cat([patch_two.inputs[1].uncond_tokens, patch_two.inputs[1].cond_tokens])
        want = alone + 0.5 * _attend(q, extra.to_k_ip(tokens), extra.to_v_ip(tokens))
    torch.testing.assert_close(both, want, atol=1e-5, rtol=1e-5)


def test_faceid_takes_the_identity_embedding_and_variants_go_to_their_node(ipadapter_env):
    face_file = _write(ipadapter_env.ipadapter, "ip-adapter-faceid_sd15.safetensors", "faceid")
    loaded = run_node(guide.LoadIPAdapter, ipadapter_name=face_file).result[0]
    centroid = torch.nn.functional.normalize(torch.randn(512), dim=0).numpy()
    identity = types.SimpleNamespace(centroid=centroid)
    (patched,) = run_node(
        guide.ApplyIPAdapterFaceID,
        model=_model(),
        ipadapter=loaded,
        identity=identity,
        weight=1.0,
        start_at=0.0,
        end_at=1.0,
        shortcut_scale=1.0,
    ).result
    item = patched.model_options["transformer_options"]["patches_replace"]["attn2"][SLOTS[0]].inputs[0]
    with torch.no_grad():
        face = torch.from_numpy(centroid)[None]
        torch.testing.assert_close(item.cond_tokens, loaded.adapter.projection(face))
        torch.testing.assert_close(item.uncond_tokens, loaded.adapter.projection(torch.zeros_like(face)))
    with pytest.raises(ValueError, match="faceid IP-Adapter.*Apply IP-Adapter FaceID"):
        guide.ApplyIPAdapter().apply(_model(), loaded, _ClipVision(), torch.rand(1, 8, 8, 3), 1.0, 0.0, 1.0)
    plus = run_node(
        guide.LoadIPAdapter, ipadapter_name=_write(ipadapter_env.ipadapter, "p.safetensors", "plus")
    ).result[0]
    with pytest.raises(ValueError, match="plus IP-Adapter.*use Apply IP-Adapter\\)"):
        guide.ApplyIPAdapterFaceID().apply(_model(), plus, identity, 1.0, 0.0, 1.0, 1.0)


def test_a_mask_limits_the_adapter_to_its_region(ipadapter_env):
    loaded = run_node(
        guide.LoadIPAdapter, ipadapter_name=_write(ipadapter_env.ipadapter, "m.safetensors", "base")
    ).result[0]
    mask = torch.zeros(32, 32)
    mask[:, :16] = 1.0  # left half; a ComfyUI MASK may come without a batch dimension
    common = {"clip_vision": _ClipVision(), "image": torch.rand(1, 16, 16, 3), "start_at": 0.0, "end_at": 1.0}
    (patched,) = run_node(
        guide.ApplyIPAdapter, model=_model(), ipadapter=loaded, weight=1.0, attn_mask=mask, **common
    ).result
    (full,) = run_node(guide.ApplyIPAdapter, model=_model(), ipadapter=loaded, weight=1.0, **common).result
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][SLOTS[2]]
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 16, WIDTH), torch.randn(2, 7, WIDTH), torch.randn(2, 7, WIDTH)
    options = {"n_heads": HEADS, "cond_or_uncond": [1, 0], "activations_shape": [2, WIDTH, 4, 4]}
    with torch.no_grad():
        masked = patch(q, k, v, options)
        unmasked = _call(full, SLOTS[2], q, k, v, 1.0)
    grid = masked.reshape(2, 4, 4, WIDTH)
    plain = _attend(q, k, v).reshape(2, 4, 4, WIDTH)
    torch.testing.assert_close(
        grid[:, :, 2:], plain[:, :, 2:], atol=1e-5, rtol=1e-5
    )  # right half: no adapter
    torch.testing.assert_close(
        grid[:, :, :2], unmasked.reshape(2, 4, 4, WIDTH)[:, :, :2], atol=1e-5, rtol=1e-5
    )


def test_faceid_lora_is_patched_into_the_clone_at_lora_strength(ipadapter_env):
    from safetensors.torch import load_file

    name = _write(ipadapter_env.ipadapter, "ip-adapter-faceid_sd15.safetensors", "faceid", lora_rank=4)
    loaded = run_node(guide.LoadIPAdapter, ipadapter_name=name).result[0]
    state = load_file(str(ipadapter_env.ipadapter / name))
    targets = _lora_targets()
    torch.manual_seed(7)
    weights = {
        key: torch.randn(WIDTH, 768 if ".attn2.to_k." in key or ".attn2.to_v." in key else WIDTH)
        for key in targets.values()
    }
    model = _model(weights)
    identity = types.SimpleNamespace(centroid=torch.nn.functional.normalize(torch.randn(512), dim=0).numpy())
    common = {"ipadapter": loaded, "identity": identity, "weight": 1.0, "start_at": 0.0, "end_at": 1.0}

    (patched,) = run_node(
        guide.ApplyIPAdapterFaceID, model=model, shortcut_scale=1.0, lora_strength=0.8, **common
    ).result
    assert model.patches == {}  # the input MODEL is left alone
    assert set(patched.patches) == set(targets.values()) and len(targets) == 128
    for stem, key in targets.items():
        delta = state[f"ip_adapter.{stem}_lora.up.weight"] @ state[f"ip_adapter.{stem}_lora.down.weight"]
        torch.testing.assert_close(patched.patched_weight(key), weights[key] + 0.8 * delta)
    # the adapter's attention patches are there too
    assert list(patched.model_options["transformer_options"]["patches_replace"]["attn2"]) == SLOTS

    (off,) = run_node(
        guide.ApplyIPAdapterFaceID, model=model, shortcut_scale=1.0, lora_strength=0.0, **common
    ).result
    assert off.patches == {}
    # a FaceID file without the LoRA patches no weights
    bare = run_node(
        guide.LoadIPAdapter,
        ipadapter_name=_write(ipadapter_env.ipadapter, "bare_faceid.safetensors", "faceid"),
    ).result[0]
    (plain,) = run_node(
        guide.ApplyIPAdapterFaceID, model=model, shortcut_scale=1.0, **(common | {"ipadapter": bare})
    ).result
    assert plain.patches == {}
    # a MODEL without those weights (another base model) is refused with the file named
    with pytest.raises(ValueError, match=r"ip-adapter-faceid_sd15.safetensors: its FaceID LoRA does not fit"):
        run_node(guide.ApplyIPAdapterFaceID, model=_model(), shortcut_scale=1.0, **common)
