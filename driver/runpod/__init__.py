"""RunPod backends: pods (ComfyUI behind RunPod's proxy or a TCP mapping) and serverless endpoints running
worker-comfyui, with their lifecycle and cost. Both plug into the batch runner as
:class:`~charforge.driver.batch.targets.Target` implementations; see docs/runpod.md.

Server strings: ``runpod-pod:POD_ID`` and ``runpod-serverless:ENDPOINT_ID`` (or a config profile with a
``runpod:`` section), resolved by :func:`charforge.driver.config.resolve_runpod`; :func:`make_target` turns
them into targets.
"""

from __future__ import annotations

from typing import Any

from ..client.http import RateLimited
from ..config import RunPodSettings, resolve_runpod
from .api import EndpointInfo, GpuType, Pod, RunPodAPI
from .http import SubmitOutcomeUnknown
from .pod import PodSession, PodTarget, pod_address, wait_ready
from .serverless import (
    JobStatus,
    RequestTooLarge,
    ServerlessClient,
    ServerlessTarget,
    build_request,
    decode_output,
    output_warnings,
)


def make_target(settings: RunPodSettings, **options: Any) -> PodTarget | ServerlessTarget:
    """The batch target for a resolved RunPod server (options go to the target's constructor)."""
    if settings.kind == "pod":
        return PodTarget(settings, **options)
    return ServerlessTarget(settings, **options)


__all__ = [
    "EndpointInfo",
    "GpuType",
    "JobStatus",
    "Pod",
    "PodSession",
    "PodTarget",
    "RateLimited",
    "RequestTooLarge",
    "RunPodAPI",
    "RunPodSettings",
    "ServerlessClient",
    "ServerlessTarget",
    "SubmitOutcomeUnknown",
    "build_request",
    "decode_output",
    "make_target",
    "output_warnings",
    "pod_address",
    "resolve_runpod",
    "wait_ready",
]
