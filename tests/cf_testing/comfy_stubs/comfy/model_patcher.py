"""Stand-in for ``comfy.model_patcher.ModelPatcher``: the patch bookkeeping LoRA loading relies on.

`weights` is the patched model's state dict (``diffusion_model.<ldm>.weight`` for a U-Net,
``clip_l.transformer.<...>.weight`` for a text encoder), as ComfyUI's ``model.state_dict()`` would list it.
"""


class ModelPatcher:
    def __init__(self, weights, kind="model"):
        self.weights = dict(weights)
        self.kind = kind
        self.patches = {}

    def clone(self):
        n = ModelPatcher(self.weights, self.kind)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        return n

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
        for strength, (up, down, alpha), _, _, _ in self.patches.get(key, []):
            rank = down.shape[0]
            scale = 1.0 if alpha is None else float(alpha) / rank
            weight += (
                strength * scale * (up.flatten(1).float() @ down.flatten(1).float()).reshape(weight.shape)
            )
        return weight
