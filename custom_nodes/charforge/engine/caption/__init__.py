"""Captioning: backends behind one interface, caption rules, and captioning a dataset into its sidecars.

- postprocess.py: template with trigger/class, keep-tokens first, cleaning, style tags, token limits;
- sidecars.py: ``.txt`` sidecars next to the dataset's working files (never next to the source photos);
- dataset.py: caption a `DatasetManifest` with a backend (skip existing / overwrite / append);
- editor.py: bulk find/replace, prepend, append, remove across a dataset's captions (dry run first);
- terms.py: term lists for the CLIP-interrogator-style captioner (built in + user ``<list>.txt`` files);
- backends/: `Captioner` (base.py), WD14 ONNX tagger (wd14.py), OpenAI-compatible endpoint (openai_compat.py),
  BLIP / BLIP-2 / Florence-2 with transformers (hf.py), sentence captions from Qwen2.5-VL and LLaVA /
  JoyCaption with transformers (vlm.py), CLIP interrogator (interrogator.py), ensemble (ensemble.py).
"""

from .postprocess import (
    CLIP_CAPTION_TOKENS,
    T5_CAPTION_TOKENS,
    CaptionRules,
    RuledCaption,
    apply_rules,
    approx_token_count,
)

__all__ = [
    "CLIP_CAPTION_TOKENS",
    "T5_CAPTION_TOKENS",
    "CaptionRules",
    "RuledCaption",
    "apply_rules",
    "approx_token_count",
]
