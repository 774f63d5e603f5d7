"""Stand-in for ComfyUI's ``nodes`` module: only ``ControlNetApplyAdvanced``, the stock node the pack calls
through ``charforge.bridge.apply_controlnet``.

Held to ComfyUI 0.3.64's behaviour (checked against the real node in
tests/integration/test_real_comfyui_instantid.py): strength 0 returns both conditionings untouched;
otherwise every entry gets a copied options dict whose ``control`` is a copy of the CONTROL_NET with the
hint ([B, C, H, W]), strength and (start, end) set, chained to the entry's earlier ``control`` (one copy per
earlier ControlNet, shared by the positive and negative entries), and ``control_apply_to_uncond`` False.
"""

from __future__ import annotations


class ControlNetApplyAdvanced:
    def apply_controlnet(
        self, positive, negative, control_net, image, strength, start_percent, end_percent, vae=None
    ):
        if strength == 0:
            return positive, negative
        hint = image.movedim(-1, 1)
        by_earlier: dict = {}

        def attach(entry):
            tensor, options = entry
            earlier = options.get("control")
            if earlier not in by_earlier:
                fresh = control_net.copy().set_cond_hint(
                    hint, strength, (start_percent, end_percent), vae=vae
                )
                fresh.set_previous_controlnet(earlier)
                by_earlier[earlier] = fresh
            return [tensor, {**options, "control": by_earlier[earlier], "control_apply_to_uncond": False}]

        return [attach(e) for e in positive], [attach(e) for e in negative]
