"""Opt-in: each character's LoRA and FaceID IP-Adapter stay in its half, in a real ComfyUI (COMFYUI_DIR set).

The shipped two_characters / two_characters_faceid workflows go through /prompt with the shallow full-width
SD1.5 test checkpoint, random full-size hook LoRAs (real SD1.5 layer names) and a tiny FaceID IP-Adapter
whose layer widths fit that checkpoint; KSampler runs ONE euler step and its latent is saved (SaveLatent).

Hook LoRAs (exact). In ComfyUI's sampler (comfy/samplers.py, ``_calc_cond_batch``) each masked conditioning
is predicted in its own U-Net pass with only its own hooks' weights patched in, and the prediction is added
to the result weighted by its mask (``get_area_and_mult``: out += pred * mask, count += mask); the scene
prompt and the negative carry no hook. One euler step from the first sigma to 0 returns the denoised
prediction, position by position. So the latent in A's half cannot depend on B's LoRA at all: with B's LoRA
swapped for another random one, or its strength changed, A's half must be bit-identical, and B's half must
change (and the converse). The masks are the workflow's SolidMask halves, resized by ComfyUI to the latent
with bilinear interpolation (``common_upscale``); a border that falls inside a latent pixel would blend
there, so the halves are compared MARGIN latent pixels away from the border.

FaceID (approximate, reported). Apply IP-Adapter FaceID's attn_mask confines the adapter's attention term
to its half in every cross-attention layer (exactly: tests/engine/guide/test_attn2_regions.py); the U-Net's
later convolutions and self-attention still carry some of it across (with this random shallow U-Net on a
32 x 8 latent, a lot: about 0.55 of the change in the own half reaches the other one), so the check here is
that turning B's FaceID off changes B's half more than A's (and the converse), with the numbers printed,
and that with both FaceIDs on the MODEL, B's hook LoRA still leaves A's half bit-identical.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import cf_testing.real_comfyui as real
from cf_testing import two_characters as two

pytestmark = real.suite_marks()

PORTS = range(19700, 19740)
WIDTH, HEIGHT = 256, 64  # a 32 x 8 latent: each half 16 latent pixels wide
MARGIN = 3  # latent pixels left out on each side of the border between the halves
ADAPTER = "ip-adapter-faceid_sd15_tiny.safetensors"
SAVE_LATENT = "900"


def _workflow(name: str) -> dict:
    return json.loads((real.REPO_ROOT / "workflows" / "api" / f"{name}.json").read_text(encoding="utf-8"))


def _shrunk(name: str, prefix: str, *, sample_only: bool, loras=None, strengths=None, faceid=None) -> dict:
    """The shipped workflow at WIDTH x HEIGHT, one euler step, the latent saved as output/<prefix>*.latent.

    ``loras`` / ``strengths`` / ``faceid``: per character letter, the hook LoRA file, its strength, the FaceID
    weight. ``sample_only`` drops every node the sampler does not need (decode, save, scoring)."""
    prompt = _workflow(name)
    letters = {}
    for node in prompt.values():
        title = node.get("_meta", {}).get("title", "")
        for letter in "AB":
            if f"Character {letter} LoRA" in title or f"FaceID {letter} " in title:
                letters[id(node)] = letter
    for node in prompt.values():
        kind, inputs, letter = node["class_type"], node["inputs"], letters.get(id(node))
        if two.fit_node(kind, inputs, WIDTH, HEIGHT, steps=1):
            continue
        if kind == "CreateHookLora":
            assert letter, "the hook LoRA nodes are titled 'Character A / B LoRA (hook)'"
            if loras:
                inputs["lora_name"] = loras[letter]
            if strengths:
                inputs["strength_model"] = inputs["strength_clip"] = strengths[letter]
        elif kind == "CharForgeApplyIPAdapterFaceID":
            assert letter, "the FaceID nodes are titled 'FaceID A / B (its half)'"
            if faceid:
                inputs["weight"] = faceid[letter]
        elif kind == "CharForgeLoadIPAdapter":
            inputs["ipadapter_name"] = ADAPTER
        elif kind == "SaveImage":
            inputs["filename_prefix"] = prefix
    (sampler,) = [k for k, v in prompt.items() if v["class_type"] == "KSampler"]
    if sample_only:
        needed, todo = set(), [sampler]
        while todo:
            node = todo.pop()
            needed.add(node)
            todo += [str(v[0]) for v in prompt[node]["inputs"].values() if isinstance(v, list)]
        prompt = {k: v for k, v in prompt.items() if k in needed}
    prompt[SAVE_LATENT] = {
        "class_type": "SaveLatent",
        "inputs": {"samples": [sampler, 0], "filename_prefix": f"latents/{prefix}"},
    }
    return prompt


def _latent(server, base, prompt: dict) -> tuple[torch.Tensor, dict]:
    outputs = server.run_prompt(prompt, "cf-regions")
    (saved,) = outputs[SAVE_LATENT]["latents"]
    path = base / "output" / saved.get("subfolder", "") / saved["filename"]
    return load_file(str(path))["latent_tensor"].float(), outputs


def _halves(latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A's half (left) and B's half (right) of a [1, 4, h, w] latent, MARGIN pixels from the border."""
    middle = latent.shape[-1] // 2
    return latent[..., : middle - MARGIN], latent[..., middle + MARGIN :]


def _write_faceid_adapter(path, width: int = 320) -> None:
    """A tiny FaceID file: the real projection layout (512 -> tokens of width 768), and key / value weights of
    `width` for all 16 SD1.5 layers (the test checkpoint's attention layers are all 320 wide)."""
    from charforge.engine.guide import ipadapter as ipa

    torch.manual_seed(7)
    projection = ipa.FaceIdTokens(512, 16, 768, tokens=2)
    state = {f"image_proj.{k}": v.detach().clone() for k, v in projection.state_dict().items()}
    for n in range(ipa.LAYER_COUNTS["sd15"]):
        for key in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * n + 1}.{key}.weight"] = torch.randn(width, 768) / 768**0.5 * 4
    save_file(state, str(path))


def test_each_characters_lora_and_faceid_stay_in_its_half(tmp_path, sd15_comfy_checkpoint):
    comfy, python, base = two.two_character_base(
        tmp_path, sd15_comfy_checkpoint, ("character_a", "character_b", "character_c")
    )
    (base / "models" / "ipadapter").mkdir(parents=True)
    _write_faceid_adapter(base / "models" / "ipadapter" / ADAPTER)

    server = real.start_comfyui(comfy, base, python, ports=PORTS)
    try:
        two.save_identities(server, "cf-regions")

        # 1. Hook LoRAs: the other character's LoRA swapped or weakened leaves this half bit-identical.
        ab = {"A": "character_a.safetensors", "B": "character_b.safetensors"}
        runs = {
            "base": {"loras": ab},
            "b_swapped": {"loras": {**ab, "B": "character_c.safetensors"}},
            "b_weaker": {"loras": ab, "strengths": {"A": 1.0, "B": 0.4}},
            "a_swapped": {"loras": {**ab, "A": "character_c.safetensors"}},
        }
        latents = {
            key: _latent(server, base, _shrunk("two_characters", f"lora_{key}", sample_only=True, **run))[0]
            for key, run in runs.items()
        }
        base_a, base_b = _halves(latents["base"])
        scale = float(latents["base"].abs().mean())
        report = {"scale": scale}
        for key in ("b_swapped", "b_weaker", "a_swapped"):
            a, b = _halves(latents[key])
            report[key] = {"A": float((a - base_a).abs().max()), "B": float((b - base_b).abs().max())}
        print(json.dumps(report))
        assert scale > 0 and all(torch.isfinite(t).all() for t in latents.values())
        for key in ("b_swapped", "b_weaker"):
            a, b = _halves(latents[key])
            assert torch.equal(a, base_a), (key, report)  # A's half: not a bit of B's LoRA
            assert (b - base_b).abs().mean() > 1e-3 * scale, (key, report)  # B's half follows B's LoRA
        a, b = _halves(latents["a_swapped"])
        assert torch.equal(b, base_b), report
        assert (a - base_a).abs().mean() > 1e-3 * scale, report

        # 2. two_characters_faceid as shipped (shrunk): it runs, scores both characters, and each FaceID
        # acts mostly in its own half.
        full_prompt = _shrunk("two_characters_faceid", "faceid_full", sample_only=False)
        full, outputs = _latent(server, base, full_prompt)
        (score,) = [k for k, v in full_prompt.items() if v["class_type"] == "CharForgeScoreCharacters"]
        table = outputs[score]["text"][0]
        assert "character_a" in table and "character_b" in table, table
        changes = {}
        for off in "AB":
            weights = {"A": 0.8, "B": 0.8, off: 0.0}
            prompt = _shrunk("two_characters_faceid", f"faceid_no_{off}", sample_only=True, faceid=weights)
            without, _ = _latent(server, base, prompt)
            a, b = _halves(without)
            full_a, full_b = _halves(full)
            changes[off] = {"A": float((a - full_a).abs().mean()), "B": float((b - full_b).abs().mean())}
        print(json.dumps({"faceid_off_mean_change": changes, "scale": float(full.abs().mean())}))
        assert changes["B"]["B"] > 1e-3 * scale and changes["A"]["A"] > 1e-3 * scale, changes
        # B's FaceID acts mostly in B's half (first run: 34.4 there against 20.1 in A's half; A's FaceID
        # 35.0 against 18.5): the random shallow U-Net's self-attention spreads much of it over the picture.
        assert changes["B"]["B"] > 1.3 * changes["B"]["A"], changes
        assert changes["A"]["A"] > 1.3 * changes["A"]["B"], changes
        # With both FaceIDs on the MODEL, B's hook LoRA still leaves A's half bit-identical.
        prompt = _shrunk(
            "two_characters_faceid",
            "faceid_b_swapped",
            sample_only=True,
            loras={**ab, "B": "character_c.safetensors"},
        )
        swapped, _ = _latent(server, base, prompt)
        assert torch.equal(_halves(swapped)[0], _halves(full)[0])
        assert (_halves(swapped)[1] - _halves(full)[1]).abs().mean() > 1e-3 * scale
    finally:
        server.stop()
