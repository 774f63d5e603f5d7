"""The LoRA library and characters: formats and conversion, inspection, merging and rank resizing,
character presets.

- `formats`: detect kohya / peft / comfyui key layouts, read into `LoraState`, write in any layout
- `flow_layouts`: Flux / SD3 single-file (fused) <-> diffusers (split) LoRA names, fuse and split, family
  detection; `flow_formats`: Flux / SD3 LoRA files in the three layouts
- `inspect`: what a LoRA file is (base model, ranks, alpha, trigger words, training settings, fits)
- `merge`: weighted merge of several LoRAs and SVD rank resize with the retained energy
- `characters`: character presets (YAML) in ``<models>/charforge/characters/``
- `safetensors_file`: the checked, pure-Python safetensors header reader every LoRA is opened with

Modules import torch only inside the functions that need it, so `inspect` and `characters` work in a
driver-only install (`inspect` needs no numpy either; `characters` needs PyYAML).
"""
