"""The ComfyUI-free engine: one package per stage, plain values in and out.

Engine functions take paths, PIL images, numpy arrays, tensors and dataclasses, plus an optional
progress callback and cancel check; they never import ComfyUI (only ``charforge.bridge`` does).
"""
