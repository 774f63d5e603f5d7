"""Guidance of a diffusion model by a reference image or face, with torch only (no ComfyUI here).

- ``ipadapter``: IP-Adapter files (base, plus, plus-face, full-face, FaceID, FaceID-Plus-v2 and
  InstantID's adapter; SD1.5 and SDXL): reading, variant detection, the image-projection modules with
  the published parameter names, the per-layer ``to_k_ip`` / ``to_v_ip`` weights in layer order, and
  the extra cross-attention term;
- ``attn2_patch``: that term as a callable in ComfyUI's cross-attention replacement convention, and the
  ComfyUI block slots of each file layer (registered in ComfyUI by the bridge; not wired yet).
- ``faceid_lora``: the LoRA inside FaceID files as weight changes of named U-Net weights (diffusers or
  LDM / ComfyUI names).
- ``instantid``: InstantID's IdentityNet picture (the five face keypoints drawn on black), the largest
  face, the raw-length face embedding and its face tokens (Apply InstantID in nodes/guide_instantid.py).
- ``pose``, ``depth``, ``lines``: ControlNet preprocessor maps (DWPose keypoints drawn OpenPose-style,
  Depth Anything depth, Canny and line art; docs/guide_maps.md).

See docs/guide.md.
"""
