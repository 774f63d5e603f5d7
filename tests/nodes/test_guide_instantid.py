"""Apply InstantID through the ComfyUI stand-in: a tiny InstantID ip-adapter.bin read by Load IP-Adapter, a face
analyzer stand-in (faces at fixed pixels, raw embeddings of known length) and a ControlNet stand-in with the
CONTROL_NET methods ComfyUI's ControlNetApplyAdvanced calls. The MODEL gets the face tokens in all 70 SDXL
cross-attention slots; both conditionings carry the ControlNet with the keypoint picture as hint and
``cross_attn_controlnet`` = the face tokens (positive) / the zero-embedding tokens (negative)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from cf_testing.comfyui import run_node
from charforge.engine.guide import attn2_patch as attn2
from charforge.engine.guide import instantid as engine
from charforge.engine.guide import ipadapter as ipa
from charforge.nodes import guide
from charforge.nodes.guide_instantid import ApplyInstantID

SLOTS = attn2.comfy_attn2_slots("sdxl")
PACK = "insightface:antelopev2"


def _model():
    from comfy.model_patcher import ModelPatcher

    sampling = types.SimpleNamespace(percent_to_sigma=lambda p: 1000.0 * (1.0 - p))
    return ModelPatcher({}, objects={"model_sampling": sampling})


def _write_instantid(folder, name="ip-adapter.bin"):
    """InstantID's file layout with tiny widths: resampler 512 -> 16 tokens of 2048, 70 layer pairs."""
    torch.manual_seed(0)
    proj = ipa.PerceiverResampler(64, 1, 16, 512, 2048, depth=1, ff_mult=2)
    layers = {
        f"{2 * n + 1}.{key}.weight": torch.randn(8, 2048) * 0.02
        for n in range(70)
        for key in ("to_k_ip", "to_v_ip")
    }
    torch.save({"image_proj": proj.state_dict(), "ip_adapter": layers}, str(folder / name))
    return name


def _unit(seed):
    vector = np.random.default_rng(seed).normal(size=512).astype(np.float32)
    return vector / np.linalg.norm(vector)


class _Analyzer:
    """Finds a small and a large face in any image that is not all black; keypoints in its pixels."""

    name = PACK

    def __init__(self):
        self.seen = []

    def detect(self, rgb):
        self.seen.append(rgb.shape)
        if not rgb.any():
            return []
        h, w = rgb.shape[:2]
        big = np.array([[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.4, 0.7], [0.6, 0.7]], np.float32) * [w, h]
        small = big * 0.2
        seed = int(rgb[0, 0, 0])  # the photo's first pixel picks the person
        return [
            types.SimpleNamespace(box=(0, 0, 5, 5), landmarks=small, embedding=_unit(99), embedding_norm=9.0),
            types.SimpleNamespace(
                box=(0, 0, w * 0.8, h * 0.8), landmarks=big, embedding=_unit(seed), embedding_norm=21.0 + seed
            ),
        ]


class _ControlNet:
    """The CONTROL_NET calls ControlNetApplyAdvanced makes: copy, set_cond_hint, set_previous_controlnet."""

    def __init__(self, origin=None):
        self.origin, self.hint, self.strength, self.percent, self.previous = origin, None, None, None, "unset"

    def copy(self):
        return _ControlNet(self)

    def set_cond_hint(self, hint, strength=1.0, percent=(0.0, 1.0), vae=None, extra_concat=()):
        self.hint, self.strength, self.percent = hint, strength, percent
        return self

    def set_previous_controlnet(self, previous):
        self.previous = previous
        return self


def _photo(size=(64, 48), person=3):
    image = torch.rand(1, size[1], size[0], 3) * 0.5 + 0.1
    image[0, 0, 0, 0] = person / 255.0
    return image


def _conds():
    positive = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    negative = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    return positive, negative


def _run(loaded, **overrides):
    positive, negative = _conds()
    inputs = {
        "model": _model(),
        "instantid": loaded,
        "control_net": _ControlNet(),
        "face_models": _Analyzer(),
        "image": _photo(),
        "positive": positive,
        "negative": negative,
        "weight": 0.8,
        "start_at": 0.0,
        "end_at": 0.9,
        "cn_strength": 0.7,
    }
    inputs.update(overrides)
    return inputs, run_node(ApplyInstantID, **inputs).result


def test_model_tokens_and_both_conditionings_carry_the_identitynet(ipadapter_env):
    loaded, shown = run_node(
        guide.LoadIPAdapter, ipadapter_name=_write_instantid(ipadapter_env.ipadapter)
    ).result
    assert shown == "instantid (sdxl)"
    inputs, (model, positive, negative, keypoints) = _run(loaded)

    # the face tokens: the raw embedding (unit x 24, the large face of person 3) and zeros, through the resampler
    with torch.no_grad():
        raw = torch.as_tensor(_unit(3) * 24.0).reshape(1, 1, 512)
        cond = loaded.adapter.projection(raw)
        uncond = loaded.adapter.projection(torch.zeros_like(raw))
    assert cond.shape == (1, 16, 2048)
    replaced = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert list(replaced) == SLOTS
    item = replaced[SLOTS[0]].inputs[0]
    torch.testing.assert_close(item.cond_tokens, cond)
    torch.testing.assert_close(item.uncond_tokens, uncond)
    assert item.weight == pytest.approx(0.8)

    # the ControlNet: one copy for both (no earlier ControlNet), hint = the large face's keypoints drawn
    control = positive[0][1]["control"]
    assert negative[0][1]["control"] is control and control.origin is inputs["control_net"]
    assert control.previous is None and control.strength == pytest.approx(0.7)
    assert control.percent == (0.0, 0.9)
    drawn = engine.draw_keypoints(_Analyzer().detect(np.ones((48, 64, 3), np.uint8))[1].landmarks, 48, 64)
    expected = torch.from_numpy(drawn).float().div(255.0)
    assert control.hint.shape == (1, 3, 48, 64)  # ComfyUI's hint layout, [B, C, H, W]
    torch.testing.assert_close(control.hint[0].movedim(0, -1), expected)
    torch.testing.assert_close(keypoints[0], expected)
    assert (
        positive[0][1]["control_apply_to_uncond"] is False
        and negative[0][1]["control_apply_to_uncond"] is False
    )

    # the IdentityNet's context: face tokens for the positive, zero-embedding tokens for the negative
    torch.testing.assert_close(positive[0][1]["cross_attn_controlnet"], cond)
    torch.testing.assert_close(negative[0][1]["cross_attn_controlnet"], uncond)
    assert positive[0][0] is inputs["positive"][0][0]  # the text tokens stay the U-Net's context
    assert "control" not in inputs["positive"][0][1]  # the input conditioning is left alone
    assert inputs["model"].model_options == {"transformer_options": {}}


def test_keypoint_image_gives_the_pose_and_a_second_controlnet_chains(ipadapter_env):
    loaded = run_node(guide.LoadIPAdapter, ipadapter_name=_write_instantid(ipadapter_env.ipadapter)).result[0]
    pose = _photo((96, 80), person=7)
    positive, negative = _conds()
    earlier = _ControlNet()
    positive[0][1]["control"] = earlier
    _, (_, out_pos, out_neg, keypoints) = _run(
        loaded, keypoint_image=pose, positive=positive, negative=negative
    )
    assert keypoints.shape == (1, 80, 96, 3)  # drawn at the keypoint picture's size
    assert out_pos[0][1]["control"].previous is earlier  # chained after the earlier ControlNet
    assert (
        out_neg[0][1]["control"].previous is None and out_neg[0][1]["control"] is not out_pos[0][1]["control"]
    )
    # the embedding still comes from the face photo (person 3), not from the keypoint picture
    with torch.no_grad():
        cond = loaded.adapter.projection(torch.as_tensor(_unit(3) * 24.0).reshape(1, 1, 512))
    torch.testing.assert_close(out_pos[0][1]["cross_attn_controlnet"], cond)


def test_identity_sets_the_direction_and_strength_zero_adds_no_controlnet(ipadapter_env):
    loaded = run_node(guide.LoadIPAdapter, ipadapter_name=_write_instantid(ipadapter_env.ipadapter)).result[0]
    identity = types.SimpleNamespace(name="ada", model=PACK, centroid=_unit(11))
    _, (_, positive, negative, _) = _run(loaded, identity=identity, cn_strength=0.0)
    assert "control" not in positive[0][1] and "control" not in negative[0][1]
    with torch.no_grad():
        cond = loaded.adapter.projection(torch.as_tensor(_unit(11) * 24.0).reshape(1, 1, 512))
    torch.testing.assert_close(positive[0][1]["cross_attn_controlnet"], cond, atol=1e-5, rtol=1e-5)


def test_clear_errors(ipadapter_env):
    loaded = run_node(guide.LoadIPAdapter, ipadapter_name=_write_instantid(ipadapter_env.ipadapter)).result[0]
    with pytest.raises(engine.NoFaceError, match="no face found in image 2 of 2"):
        _run(loaded, image=torch.cat([_photo(), torch.zeros(1, 48, 64, 3)]))
    other = types.SimpleNamespace(name="b", model="insightface:buffalo_l", centroid=_unit(1))
    with pytest.raises(ValueError, match="built with insightface:buffalo_l"):
        _run(loaded, identity=other)
    proj = ipa.FaceIdTokens(512, 16, 768, tokens=2)
    state = {f"image_proj.{k}": v for k, v in proj.state_dict().items()}
    state |= {
        f"ip_adapter.{2 * n + 1}.{k}.weight": torch.zeros(8, 768)
        for n in range(16)
        for k in ("to_k_ip", "to_v_ip")
    }
    torch.save(state, str(ipadapter_env.ipadapter / "faceid.bin"))
    faceid = run_node(guide.LoadIPAdapter, ipadapter_name="faceid.bin").result[0]
    with pytest.raises(ValueError, match=r"faceid IP-Adapter.*variant instantid.*models/controlnet"):
        _run(faceid)
