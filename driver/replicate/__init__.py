"""Replicate as a backend: ComfyUI workflows on a model that runs them, and LoRA training on a hosted trainer.

Server strings: ``replicate:OWNER/MODEL[:VERSION]`` (or a config profile with a ``replicate:`` section), resolved
by :func:`charforge.driver.config.resolve_replicate`. :class:`ReplicateTarget` plugs into the batch runner like any
other :class:`~charforge.driver.batch.targets.Target`; :mod:`.training` runs a hosted LoRA trainer. See
docs/replicate.md.
"""

from __future__ import annotations

from ..client.http import RateLimited
from ..config import ReplicateSettings, resolve_replicate
from .api import CreateOutcomeUnknown, Prediction, ReplicateAPI
from .workflows import ReplicateTarget, make_settings, output_urls, tag_workflow, workflow_tag

__all__ = [
    "CreateOutcomeUnknown",
    "Prediction",
    "RateLimited",
    "ReplicateAPI",
    "ReplicateSettings",
    "ReplicateTarget",
    "make_settings",
    "output_urls",
    "resolve_replicate",
    "tag_workflow",
    "workflow_tag",
]
