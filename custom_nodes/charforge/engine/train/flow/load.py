"""`load_flow_model`: any flow-matching base by the architecture its tensors say (one entry for the job)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from ..models import ARCH_NAMES, UnsupportedModelError, detect_arch
from .family import FlowModel


def load_flow_model(
    source: str | os.PathLike,
    *,
    parts: Mapping[str, str | None] | None = None,
    dtype: torch.dtype | str = torch.bfloat16,
    config_dir: str | os.PathLike | None = None,
    tokenizer_candidates: Sequence[str | os.PathLike | None] = (),
    t5_tokenizer_candidates: Sequence[str | os.PathLike | None] = (),
    arch: str | None = None,
) -> FlowModel:
    """Load `source` (a single file or diffusers folder) with its family's loader.

    `parts` names the files a diffusion-model file lacks: ``clip_l``, ``clip_g`` (SD3), ``t5``, ``vae``.
    """
    arch = arch or detect_arch(source)
    parts = dict(parts or {})
    if arch in ("flux-dev", "flux-schnell"):
        from .flux import FluxFiles, load_flux

        files = FluxFiles(str(source), parts.get("clip_l"), parts.get("t5"), parts.get("vae"))
        return load_flux(
            files,
            dtype=dtype,
            config_dir=config_dir,
            tokenizer_candidates=tokenizer_candidates,
            t5_tokenizer_candidates=t5_tokenizer_candidates,
        )
    if arch in ("sd3-medium", "sd35-medium", "sd35-large"):
        from .sd3 import SD3Files, load_sd3

        sd3_files = SD3Files(
            str(source), parts.get("clip_l"), parts.get("clip_g"), parts.get("t5"), parts.get("vae")
        )
        return load_sd3(
            sd3_files,
            dtype=dtype,
            config_dir=config_dir,
            tokenizer_candidates=tokenizer_candidates,
            t5_tokenizer_candidates=t5_tokenizer_candidates,
        )
    raise UnsupportedModelError(f"{ARCH_NAMES.get(arch, arch)} is not a flow-matching base")
