"""Stand-in for the LoRA part of ``comfy.sd`` (ComfyUI 0.3.64 ``load_lora_for_models``).

The key map follows ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip`` for the names the
stand-in can derive from the weights alone: ``diffusion_model.<ldm>`` and ``lora_unet_<ldm with _>`` for the
U-Net, ``text_encoders.<key>`` and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for CLIP layers. Unused keys
are logged as ``lora key not loaded: <key>`` at WARNING, as ComfyUI does.
"""

import logging

_UP = (
    ".lora_up.weight",
    "_lora.up.weight",
    ".lora_B.weight",
    ".lora.up.weight",
    ".lora_B",
    ".lora_linear_layer.up.weight",
    ".lora_B.default.weight",
)
_DOWN = (
    ".lora_down.weight",
    "_lora.down.weight",
    ".lora_A.weight",
    ".lora.down.weight",
    ".lora_A",
    ".lora_linear_layer.down.weight",
    ".lora_A.default.weight",
)


def _key_map(patcher):
    key_map = {}
    for k in patcher.weights:
        if not k.endswith(".weight"):
            continue
        base = k[: -len(".weight")]
        if k.startswith("diffusion_model."):
            key_map["lora_unet_" + base[len("diffusion_model.") :].replace(".", "_")] = k
            key_map[base] = k
        else:
            key_map["text_encoders." + base] = k
            for clip_name, prefixes in (
                ("clip_l.transformer.", ("lora_te_", "lora_te1_")),
                ("clip_g.transformer.", ("lora_te2_",)),
            ):
                if base.startswith(clip_name):
                    for prefix in prefixes:
                        key_map[prefix + base[len(clip_name) :].replace(".", "_")] = k
    return key_map


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    key_map = {}
    if model is not None:
        key_map.update(_key_map(model))
    if clip is not None:
        key_map.update(_key_map(clip))
    loaded = {}
    used = set()
    for base, target in key_map.items():
        for up_suffix, down_suffix in zip(_UP, _DOWN, strict=False):
            up, down = base + up_suffix, base + down_suffix
            if up in lora and down in lora:
                alpha = lora.get(base + ".alpha")
                loaded[target] = (lora[up], lora[down], None if alpha is None else float(alpha))
                used.update({up, down} | ({base + ".alpha"} if alpha is not None else set()))
                break
    for key in lora:
        if key not in used:
            logging.warning(f"lora key not loaded: {key}")
    new_model = new_clip = None
    applied = set()
    if model is not None:
        new_model = model.clone()
        applied.update(new_model.add_patches(loaded, strength_model))
    if clip is not None:
        new_clip = clip.clone()
        applied.update(new_clip.add_patches(loaded, strength_clip))
    for key in loaded:
        if key not in applied:
            logging.warning(f"NOT LOADED {key}")
    return (new_model, new_clip)
