"""Model files: diffusers folders, single-file checkpoints, key layouts."""
