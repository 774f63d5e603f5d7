"""Stand-in for ComfyUI's ``comfy`` package (test harness only)."""
