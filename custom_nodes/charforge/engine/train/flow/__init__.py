"""LoRA training for flow-matching transformer bases (Flux.1 dev / schnell; SD3.x plugs in the same way).

The SD1.5 / SDXL trainer (``engine.train.loop``) predicts noise with a U-Net; these bases predict a
velocity with a transformer. What is the same for every such base lives here once:

- ``objective``: `FlowSettings`, noise levels (uniform, logit-normal, shifted, Flux.1's resolution
  shift), x_σ = (1 − σ)x0 + σε and the target ε − x0;
- ``family``: `FlowModel`, the family interface (below);
- ``lora``: the transformer LoRA presets (``attention``, ``all_linear``);
- ``fp8``: the frozen base stored in float8 (e4m3) with bf16 compute;
- ``trainer``: `FlowTrainer`, the steps (caches, loss, masks, caption dropout, resumable state), built
  on ``engine.train.loop.Trainer`` so batches, state and resume are the SD trainer's own;
- ``export``: the LoRA file (kohya Flux layout or diffusers / peft layout) with ``ss_*`` / ``modelspec.*``;
- ``preflight``: memory and time estimates for these bases;
- ``flux``: Flux.1 loading (BFL / ComfyUI single files + CLIP-L + T5-XXL + ae, or a diffusers folder) and
  conditioning.

The family interface
--------------------
A family subclasses `family.FlowModel` (a dataclass holding ``transformer``, ``vae``,
``text_encoders`` by name, ``tokenizers``, ``dtype``, ``fingerprints``) and implements:

``encode_images(pixels) -> latents``
    pixels in [-1, 1] to the normalised latents the transformer sees (fp32, (B, C, h, w));
``encode_text(captions, device, settings, encoders=None) -> {key: tensor}``
    batch-first conditioning; ``text_outputs`` says which encoder makes each key, so the trainer caches
    the frozen ones (then `release_text_encoders` drops those encoders) and recomputes an encoder with
    LoRA every step;
``predict(noisy, sigmas, text, settings) -> velocity``
    the transformer's output in the latent layout (packing, ids, guidance, timestep scale inside);
``lora_targets(preset) -> [module names]``
    the transformer's modules for the ``attention`` and ``all_linear`` presets.

It sets ``family`` (``"flux"``, ``"sd3"``), ``default_sampling`` (what ``timestep_sampling="auto"``
means), ``text_outputs`` and ``lora_text_encoder`` (the encoder an optional text-encoder LoRA goes on,
exported as ``text_encoder``). A loader returns the family's instance; `load_flow_model` picks it by the
architecture id `engine.train.models.detect_arch` reads from the tensors.

Importing this package is cheap: torch and diffusers are imported by the modules that need them.
"""
