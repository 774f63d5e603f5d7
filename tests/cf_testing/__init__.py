"""Test support for CharForge: ComfyUI stand-ins, a ComfyUI-like pack loader, tiny-model factories."""
