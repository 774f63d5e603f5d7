"""Stand-in for the progress part of ``comfy.utils``."""

PROGRESS_BAR_ENABLED = True
PROGRESS_BAR_HOOK = None


def set_progress_bar_enabled(enabled):
    global PROGRESS_BAR_ENABLED
    PROGRESS_BAR_ENABLED = enabled


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.hook = PROGRESS_BAR_HOOK  # captured at construction, as in ComfyUI
        self.node_id = node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        if value > self.total:
            value = self.total
        self.current = value
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    """Stand-in for ``comfy.utils.load_torch_file`` (safetensors files only)."""
    import safetensors

    with safetensors.safe_open(ckpt, framework="pt", device="cpu") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata() if return_metadata else None
    return (sd, metadata) if return_metadata else sd
