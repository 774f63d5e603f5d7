"""The ComfyUI-free engine: one package per stage, plain values in and out.

Engine functions take paths, PIL images, numpy arrays, tensors and dataclasses; long ones also take a
`control.Control` (progress, structured events and the stop check that raises `control.Cancelled`). They
never import ComfyUI (only ``charforge.bridge`` does; it builds the Control a node passes in).
"""
