"""LoRA training for SD1.5 and SDXL: diffusers + peft underneath, ComfyUI-free.

One module per concern, each small enough to read top to bottom:

- ``config``: the training settings (dataclasses) and the named presets.
- ``models``: load a base model (single-file checkpoint or diffusers folder) fully offline, with the
  shipped configs in ``configs/``; detect SD1.5 vs SDXL from the file's keys; encode prompts.
- ``lora``: put LoRA layers (peft) on the U-Net and optionally the text encoders.
- ``export``: write the LoRA with kohya-style keys, ``.alpha`` and ``ss_*`` / ``modelspec.*`` metadata.
- ``data``: kohya folders / (image, caption) lists, aspect-ratio buckets, caption handling, caches.
- ``optim``: optimizers and learning-rate schedules.
- ``loop``: the training loop (loss, steps, progress, cancel, resumable state of a step).
- ``samples``: sample images with fixed prompts and seeds.
- ``run``: the run folder (config, metrics, loss curve, samples, checkpoints, state) and the list of
  runs (what ``GET /charforge/runs`` serves); ``plot`` draws the loss curve.
- ``preflight``: memory / time estimate and the automatic memory profile.
- ``job``: one whole training job (load, check, cache, train, save, resume): what the node calls.

Importing this package is cheap: torch, diffusers and peft are imported by the modules that need them.
"""
