"""Caption backends, each behind `Captioner` (base.py). Heavy packages are imported when a backend is built."""

from .base import Captioner, CaptionerError

__all__ = ["Captioner", "CaptionerError"]
