"""Stand-in for ``comfy.model_patcher.ModelPatcher``: the patch bookkeeping LoRA loading relies on.

`weights` is the patched model's state dict (``diffusion_model.<ldm>.weight`` for a U-Net,
``clip_l.transformer.<...>.weight`` for a text encoder), as ComfyUI's ``model.state_dict()`` would list it.

`model_options` / `set_model_attn2_replace` keep ComfyUI's bookkeeping of attention replacements
(``model_options["transformer_options"]["patches_replace"]["attn2"][(block, number, index)]``, copied on
write, deep-copied by `clone`); `get_model_object` looks names up on `objects` (e.g. ``model_sampling``),
which a test fills.
"""

import copy


class ModelPatcher:
    def __init__(self, weights, kind="model", objects=None):
        self.weights = dict(weights)
        self.kind = kind
        self.patches = {}
        self.model_options = {"transformer_options": {}}
        self.objects = dict(objects or {})

    def clone(self):
        n = ModelPatcher(self.weights, self.kind, self.objects)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def get_model_object(self, name):
        return self.objects[name]

    def model_state_dict(self, filter_prefix=None):
        return {k: v for k, v in self.weights.items() if filter_prefix is None or k.startswith(filter_prefix)}

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        # ComfyUI: set_model_options_patch_replace copies each dict level before writing the one key.
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"]["attn2"][key] = patch
        self.model_options["transformer_options"] = to

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        # ComfyUI: patches for keys the model has are appended as (strength_patch, patch, strength_model,
        # offset, function); the keys applied are returned.
        applied = set()
        for key, patch in patches.items():
            if key in self.weights:
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, None, None))
                applied.add(key)
        return list(applied)

    def patched_weight(self, key):
        """The weight with every LoRA patch applied (``W + s * alpha/rank * up @ down``), for tests."""
        weight = self.weights[key].clone()
        for strength, patch, _, _, _ in self.patches.get(key, []):
            # a LoRA loader's (up, down, alpha), or a comfy.weight_adapter.LoRAAdapter's weights
            up, down, alpha = patch.weights[:3] if hasattr(patch, "weights") else patch
            rank = down.shape[0]
            scale = 1.0 if alpha is None else float(alpha) / rank
            weight += (
                strength * scale * (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
            )
        return weight
