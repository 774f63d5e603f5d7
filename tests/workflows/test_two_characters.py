"""The shipped two-character workflows: each character's hook LoRA, prompt (and, in two_characters_faceid, FaceID
IP-Adapter) confined to its half, then scored.

The masks are evaluated pixel by pixel as ComfyUI's SolidMask / MaskComposite compute them, and the links are
followed: each hook group reaches exactly one prompt and that prompt exactly one masked conditioning, so a
LoRA cannot act outside its mask (ComfyUI applies a conditioning's hooks only while it computes that
conditioning's prediction, and weights the prediction by its mask).
"""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
NAMES = ("two_characters", "two_characters_faceid")
PROMPTS = {
    name: json.loads((WORKFLOWS / "api" / f"{name}.json").read_text(encoding="utf-8")) for name in NAMES
}


@pytest.fixture(params=NAMES)
def prompt(request):
    return PROMPTS[request.param]


def _of(prompt, class_type):
    return {k: v for k, v in prompt.items() if v["class_type"] == class_type}


def _source(prompt, node_id, name):
    link = prompt[node_id]["inputs"][name]
    assert isinstance(link, list), f"{name} of node {node_id} is not linked"
    return str(link[0])


def _consumers(prompt):
    """node id -> [(consuming node id, input name)] for every link of the prompt."""
    found = defaultdict(list)
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                found[str(value[0])].append((node_id, name))
    return found


def _mask_pixels(prompt, mask_id):
    """Evaluate SolidMask / MaskComposite (add) as ComfyUI does, for the mask the workflow builds."""
    node = prompt[mask_id]
    inputs = node["inputs"]
    if node["class_type"] == "SolidMask":
        return np.full((inputs["height"], inputs["width"]), inputs["value"], np.float32)
    assert node["class_type"] == "MaskComposite" and inputs["operation"] == "add"
    out = _mask_pixels(prompt, _source(prompt, mask_id, "destination")).copy()
    source = _mask_pixels(prompt, _source(prompt, mask_id, "source"))
    x, y = inputs["x"], inputs["y"]
    h, w = min(source.shape[0], out.shape[0] - y), min(source.shape[1], out.shape[1] - x)
    out[y : y + h, x : x + w] = np.clip(out[y : y + h, x : x + w] + source[:h, :w], 0, 1)
    return out


def _halves(prompt):
    """lora name -> (masked conditioning id, mask node id, prompt text) of each character."""
    latent = next(iter(_of(prompt, "EmptyLatentImage").values()))["inputs"]
    ckpt = next(iter(_of(prompt, "CheckpointLoaderSimple")))
    halves = {}
    for masked_id in _of(prompt, "ConditioningSetMask"):
        text = _source(prompt, masked_id, "conditioning")
        clip = _source(prompt, text, "clip")
        assert (
            prompt[clip]["class_type"] == "SetClipHooks" and prompt[clip]["inputs"]["apply_to_conds"] is True
        )
        assert _source(prompt, clip, "clip") == ckpt
        hook = _source(prompt, clip, "hooks")
        assert prompt[hook]["class_type"] == "CreateHookLora" and prompt[hook]["inputs"]["strength_model"] > 0
        mask_id = _source(prompt, masked_id, "mask")
        assert _mask_pixels(prompt, mask_id).shape == (latent["height"], latent["width"])
        halves[prompt[hook]["inputs"]["lora_name"]] = (masked_id, mask_id, prompt[text]["inputs"]["text"])
    return halves


def test_each_character_lora_and_prompt_act_only_in_its_half(prompt):
    width = next(iter(_of(prompt, "EmptyLatentImage").values()))["inputs"]["width"]
    halves = _halves(prompt)
    assert len(halves) == 2  # two different LoRAs
    (_, left_id, text_a), (_, right_id, text_b) = halves.values()
    left, right = _mask_pixels(prompt, left_id), _mask_pixels(prompt, right_id)
    assert (left[:, : width // 2] == 1).all() and (left[:, width // 2 :] == 0).all()
    assert (right[:, width // 2 :] == 1).all() and (right[:, : width // 2] == 0).all()
    assert text_a != text_b


def test_each_hook_reaches_only_its_own_masked_prompt(prompt):
    """A hook group -> one Set CLIP Hooks -> one prompt -> one Conditioning (Set Mask); no other prompt (scene,
    negative) is encoded with a hooked CLIP, and the sampler's MODEL carries no hook."""
    consumers = _consumers(prompt)
    halves = _halves(prompt)
    masked_by_hook = {}
    for hook_id, hook in _of(prompt, "CreateHookLora").items():
        ((clip_id, name),) = consumers[hook_id]
        assert prompt[clip_id]["class_type"] == "SetClipHooks" and name == "hooks"
        ((text_id, name),) = consumers[clip_id]
        assert prompt[text_id]["class_type"] == "CLIPTextEncode" and name == "clip"
        ((masked_id, name),) = consumers[text_id]
        assert prompt[masked_id]["class_type"] == "ConditioningSetMask" and name == "conditioning"
        masked_by_hook[hook["inputs"]["lora_name"]] = masked_id
    assert masked_by_hook == {lora: masked for lora, (masked, _, _) in halves.items()}
    assert len(set(masked_by_hook.values())) == 2
    ckpt = next(iter(_of(prompt, "CheckpointLoaderSimple")))
    hooked_texts = {consumers[c][0][0] for c in _of(prompt, "SetClipHooks")}
    for text_id in set(_of(prompt, "CLIPTextEncode")) - hooked_texts:
        assert _source(prompt, text_id, "clip") == ckpt
    # The sampler's MODEL: the checkpoint's, through FaceID nodes at most (no LoRA on the whole model).
    (sampler_id,) = _of(prompt, "KSampler")
    model = _source(prompt, sampler_id, "model")
    while model != ckpt:
        assert prompt[model]["class_type"] == "CharForgeApplyIPAdapterFaceID"
        model = _source(prompt, model, "model")


def test_sampler_sees_both_characters_and_the_scene(prompt):
    (sampler_id,) = _of(prompt, "KSampler")
    ckpt = next(iter(_of(prompt, "CheckpointLoaderSimple")))
    seen, todo = set(), [_source(prompt, sampler_id, "positive")]
    while todo:
        node = todo.pop()
        seen.add(prompt[node]["class_type"])
        todo += [str(v[0]) for v in prompt[node]["inputs"].values() if isinstance(v, list)]
    assert {"ConditioningCombine", "ConditioningSetMask", "SetClipHooks", "CreateHookLora"} <= seen
    negative = _source(prompt, sampler_id, "negative")
    assert prompt[negative]["class_type"] == "CLIPTextEncode" and _source(prompt, negative, "clip") == ckpt
    combine_inputs = [
        prompt[_source(prompt, c, n)]["class_type"]
        for c in _of(prompt, "ConditioningCombine")
        for n in ("conditioning_1", "conditioning_2")
    ]
    assert combine_inputs.count("ConditioningSetMask") == 2 and "CLIPTextEncode" in combine_inputs


def test_score_characters_gets_the_decoded_images_and_two_identities(prompt):
    (score,) = _of(prompt, "CharForgeScoreCharacters")
    assert prompt[_source(prompt, score, "images")]["class_type"] == "VAEDecode"
    names = {prompt[_source(prompt, score, f"identity_{i}")]["inputs"]["name"] for i in (1, 2)}
    assert len(names) == 2


def test_the_plain_workflow_uses_the_checkpoint_model():
    prompt = PROMPTS["two_characters"]
    (sampler_id,) = _of(prompt, "KSampler")
    assert _source(prompt, sampler_id, "model") == next(iter(_of(prompt, "CheckpointLoaderSimple")))
    assert not _of(prompt, "CharForgeApplyIPAdapterFaceID")


def test_each_faceid_adapter_is_confined_to_its_own_characters_half():
    """two_characters_faceid: checkpoint MODEL -> FaceID A -> FaceID B -> KSampler; each FaceID takes the
    identity Score Characters scores as that character and, as attn_mask, the very mask its LoRA's prompt has."""
    prompt = PROMPTS["two_characters_faceid"]
    (adapter_id,) = _of(prompt, "CharForgeLoadIPAdapter")
    assert "faceid" in prompt[adapter_id]["inputs"]["ipadapter_name"]
    (score,) = _of(prompt, "CharForgeScoreCharacters")
    scored = {_source(prompt, score, f"identity_{i}") for i in (1, 2)}
    halves = _halves(prompt)
    masks = set()
    for apply_id, apply in _of(prompt, "CharForgeApplyIPAdapterFaceID").items():
        assert _source(prompt, apply_id, "ipadapter") == adapter_id and apply["inputs"]["weight"] > 0
        identity = _source(prompt, apply_id, "identity")
        assert identity in scored
        name = prompt[identity]["inputs"]["name"]
        _, lora_mask, _ = halves[f"{name}.safetensors"]  # the character's LoRA is named after its identity
        assert _source(prompt, apply_id, "attn_mask") == lora_mask
        masks.add(lora_mask)
    assert len(masks) == 2
    # The LoRA inside the FaceID file is the same for both characters and not masked: applied once.
    strengths = sorted(
        a["inputs"]["lora_strength"] for a in _of(prompt, "CharForgeApplyIPAdapterFaceID").values()
    )
    assert strengths == [0.0, 1.0]
    (sampler_id,) = _of(prompt, "KSampler")
    chain, model = [], _source(prompt, sampler_id, "model")
    while prompt[model]["class_type"] == "CharForgeApplyIPAdapterFaceID":
        chain.append(model)
        model = _source(prompt, model, "model")
    assert len(chain) == 2 and prompt[model]["class_type"] == "CheckpointLoaderSimple"


def test_the_shipped_masks_split_every_layer_grid_exactly():
    """The halves' border (x = 384 of 768) falls on a cell border of the latent (64 x 96, where ComfyUI resizes
    a conditioning mask bilinearly) and of every SD1.5 attention grid down to 8 x 12 (where `mask_for_layer`
    resizes an attn_mask): no column is shared, and left + right cover every cell once."""
    import torch

    from charforge.engine.guide.ipadapter import mask_for_layer

    prompt = PROMPTS["two_characters_faceid"]
    latent = next(iter(_of(prompt, "EmptyLatentImage").values()))["inputs"]
    height, width = latent["height"] // 8, latent["width"] // 8
    masks = [
        torch.from_numpy(_mask_pixels(prompt, _source(prompt, a, "attn_mask")))[None]
        for a in sorted(_of(prompt, "CharForgeApplyIPAdapterFaceID"))
    ]
    for level in range(4):
        grid = (height >> level, width >> level)
        left, right = (mask_for_layer(m, *grid).reshape(grid) for m in masks)
        assert set(left.unique().tolist()) == {0.0, 1.0} and set(right.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(left + right, torch.ones(grid))
        assert torch.equal(left[:, : grid[1] // 2], torch.ones(grid[0], grid[1] // 2))
