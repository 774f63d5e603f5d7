"""The one interface every caption backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class CaptionerError(RuntimeError):
    """A backend could not caption (model missing or broken, endpoint refusing every request, ...)."""


class Captioner(ABC):
    """Turns images into captions; holds its model (or connection) until `close()`.

    `caption` returns exactly one string per image, in order. An empty string means "no caption for this
    image" (e.g. a refusal by a remote model, or no tag above the thresholds); the dataset runner then
    leaves that image uncaptioned and says so in its report. Use as a context manager to free the model.
    """

    name: str = "captioner"
    #: The long side images need at most (they are decoded and shrunk to it before `caption`); None: any.
    max_side: int | None = None
    #: How many images one `caption` call should get (the dataset runner batches by this).
    batch_size: int = 8

    @abstractmethod
    def caption(self, images: list[Any]) -> list[str]:
        """One caption per PIL image, in order."""

    def close(self) -> None:  # noqa: B027 - optional hook: backends without resources keep the default
        """Free the model and its memory (GPU included). Safe to call twice."""

    def notes(self) -> list[str]:
        """Anything the user should read in the report (refusals, provider used, ...)."""
        return []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
