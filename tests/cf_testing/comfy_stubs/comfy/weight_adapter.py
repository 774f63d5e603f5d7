"""Stand-in for ``comfy.weight_adapter.LoRAAdapter`` (ComfyUI 0.3.64): a weight patch's LoRA factors.

``weights`` is ``(up, down, alpha, mid, dora_scale, reshape)``; ComfyUI adds ``strength · alpha / rank · up @
down`` to the weight (``alpha`` None: scale 1). `ModelPatcher.patched_weight` of the stand-in reads it.
"""


class LoRAAdapter:
    name = "lora"

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
