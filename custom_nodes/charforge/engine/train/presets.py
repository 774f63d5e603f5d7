"""The named training presets and the four settings users set by hand, without importing torch.

The Train LoRA node lists these in its inputs when ComfyUI starts, so this module stays import-free;
`config.preset_config` builds the full `TrainConfig` of a preset.
"""

from __future__ import annotations

from typing import Any

PRESETS = ("sdxl", "sd15", "fast", "high_quality")
RESOLUTION = {  # the native resolution of each architecture
    "sd15": 512,
    "sdxl": 1024,
    "flux-dev": 1024,
    "flux-schnell": 1024,
    "sd3-medium": 1024,
    "sd35-medium": 1024,
    "sd35-large": 1024,
}
FLOW_ARCHS = ("flux-dev", "flux-schnell", "sd3-medium", "sd35-medium", "sd35-large")

# What the default preset (``sdxl`` on an SDXL model) uses: the node shows these, so its widgets never read 0.
BASIC_DEFAULTS = {"steps": 1500, "learning_rate": 1e-4, "rank": 32, "resolution": 1024}


def basic_settings(
    *, steps: int, learning_rate: float, rank: int, resolution: int, use_preset_values: bool | None = None
) -> dict[str, Any]:
    """Overrides for steps / learning rate / rank / resolution, with what follows from them.

    ``use_preset_values=True`` keeps the preset's values (the numbers are ignored); ``False`` uses the
    numbers; ``None`` (a prompt written before the choice existed) uses every non-zero number. 0 always
    means the preset's value. A rank sets alpha to rank / 2 and a resolution the bucket range
    (resolution / 4 to resolution x 2), as the presets do.
    """
    if use_preset_values:
        return {}
    settings: dict[str, Any] = {}
    if steps:
        settings["steps"] = int(steps)
    if learning_rate:
        settings["learning_rate"] = float(learning_rate)
    if rank:
        settings.update(rank=int(rank), alpha=max(1.0, rank / 2))
    if resolution:
        settings.update(
            resolution=int(resolution), min_bucket=max(64, resolution // 4), max_bucket=resolution * 2
        )
    return settings
