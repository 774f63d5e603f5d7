"""The shipped two-character workflow: each character's hook LoRA and prompt confined to its half, then scored."""

import json
from pathlib import Path

import numpy as np

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
PROMPT = json.loads((WORKFLOWS / "api" / "two_characters.json").read_text(encoding="utf-8"))


def _of(class_type):
    return {k: v for k, v in PROMPT.items() if v["class_type"] == class_type}


def _source(node_id, name):
    link = PROMPT[node_id]["inputs"][name]
    assert isinstance(link, list), f"{name} of node {node_id} is not linked"
    return str(link[0])


def _mask_pixels(mask_id):
    """Evaluate SolidMask / MaskComposite (add) as ComfyUI does, for the mask the workflow builds."""
    node = PROMPT[mask_id]
    inputs = node["inputs"]
    if node["class_type"] == "SolidMask":
        return np.full((inputs["height"], inputs["width"]), inputs["value"], np.float32)
    assert node["class_type"] == "MaskComposite" and inputs["operation"] == "add"
    out = _mask_pixels(_source(mask_id, "destination")).copy()
    source = _mask_pixels(_source(mask_id, "source"))
    x, y = inputs["x"], inputs["y"]
    h, w = min(source.shape[0], out.shape[0] - y), min(source.shape[1], out.shape[1] - x)
    out[y : y + h, x : x + w] = np.clip(out[y : y + h, x : x + w] + source[:h, :w], 0, 1)
    return out


def test_each_character_lora_and_prompt_act_only_in_its_half():
    latent = next(iter(_of("EmptyLatentImage").values()))["inputs"]
    ckpt = next(iter(_of("CheckpointLoaderSimple")))
    halves = {}
    for masked_id in _of("ConditioningSetMask"):
        text = _source(masked_id, "conditioning")
        clip = _source(text, "clip")
        assert (
            PROMPT[clip]["class_type"] == "SetClipHooks" and PROMPT[clip]["inputs"]["apply_to_conds"] is True
        )
        assert _source(clip, "clip") == ckpt
        hook = _source(clip, "hooks")
        assert PROMPT[hook]["class_type"] == "CreateHookLora" and PROMPT[hook]["inputs"]["strength_model"] > 0
        mask = _mask_pixels(_source(masked_id, "mask"))
        assert mask.shape == (latent["height"], latent["width"])
        halves[PROMPT[hook]["inputs"]["lora_name"]] = (mask, PROMPT[text]["inputs"]["text"])
    assert len(halves) == 2  # two different LoRAs
    (left, text_a), (right, text_b) = halves.values()
    width = latent["width"]
    assert (left[:, : width // 2] == 1).all() and (left[:, width // 2 :] == 0).all()
    assert (right[:, width // 2 :] == 1).all() and (right[:, : width // 2] == 0).all()
    assert text_a != text_b


def test_sampler_sees_both_characters_and_the_scene_and_the_plain_model():
    (sampler_id,) = _of("KSampler")
    ckpt = next(iter(_of("CheckpointLoaderSimple")))
    assert _source(sampler_id, "model") == ckpt  # the hooks ride on the conditioning, not on the model
    seen, todo = set(), [_source(sampler_id, "positive")]
    while todo:
        node = todo.pop()
        seen.add(PROMPT[node]["class_type"])
        todo += [str(v[0]) for v in PROMPT[node]["inputs"].values() if isinstance(v, list)]
    assert {"ConditioningCombine", "ConditioningSetMask", "SetClipHooks", "CreateHookLora"} <= seen
    negative = _source(sampler_id, "negative")
    assert PROMPT[negative]["class_type"] == "CLIPTextEncode" and _source(negative, "clip") == ckpt
    combine_inputs = [
        PROMPT[_source(c, n)]["class_type"]
        for c in _of("ConditioningCombine")
        for n in ("conditioning_1", "conditioning_2")
    ]
    assert combine_inputs.count("ConditioningSetMask") == 2 and "CLIPTextEncode" in combine_inputs


def test_score_characters_gets_the_decoded_images_and_two_identities():
    (score,) = _of("CharForgeScoreCharacters")
    assert PROMPT[_source(score, "images")]["class_type"] == "VAEDecode"
    names = {PROMPT[_source(score, f"identity_{i}")]["inputs"]["name"] for i in (1, 2)}
    assert len(names) == 2
