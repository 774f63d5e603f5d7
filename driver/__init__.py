"""CharForge workflow driver: submit ComfyUI workflows to any server, follow them, bring outputs home.

It talks to ComfyUI over HTTP and WebSocket only and never imports the node pack or ComfyUI.

Quick start::

    from charforge.driver import ComfyClient

    with ComfyClient("http://127.0.0.1:8188") as client:
        prepared = client.prepare_run("workflow.json", sets=["KSampler.seed=42"])
        result = client.run(prepared.workflow, timeout=600)
        files = client.download_outputs(result, "output")

``AsyncComfyClient`` has the same methods as coroutines. Errors are typed (see ``charforge.driver.errors``).
"""

from .client import AsyncComfyClient, ComfyClient, Job, JobResult, Timeout, Timings, UploadedFile
from .config import BasicAuth, BearerAuth, HeaderAuth, ServerConfig, resolve_server
from .errors import (
    AuthenticationError,
    ConfigError,
    ConversionError,
    DriverError,
    ExecutionError,
    Interrupted,
    JobLost,
    JobTimeout,
    NodeProblem,
    OverrideError,
    ServerError,
    ServerUnavailable,
    UsageError,
    ValidationError,
    WorkflowError,
)
from .events import Event
from .manifest import build_manifest, write_manifest
from .outputs import DownloadedFile, OutputFile
from .workflow.convert import convert_workflow
from .workflow.load import Workflow, load_workflow
from .workflow.overrides import apply_overrides, parse_set
from .workflow.preflight import check_workflow, preflight
from .workflow.prepare import PreparedRun

__all__ = [
    "AsyncComfyClient",
    "AuthenticationError",
    "BasicAuth",
    "BearerAuth",
    "ComfyClient",
    "ConfigError",
    "ConversionError",
    "DownloadedFile",
    "DriverError",
    "Event",
    "ExecutionError",
    "HeaderAuth",
    "Interrupted",
    "Job",
    "JobLost",
    "JobResult",
    "JobTimeout",
    "NodeProblem",
    "OutputFile",
    "OverrideError",
    "PreparedRun",
    "ServerConfig",
    "ServerError",
    "ServerUnavailable",
    "Timeout",
    "Timings",
    "UploadedFile",
    "UsageError",
    "ValidationError",
    "Workflow",
    "WorkflowError",
    "apply_overrides",
    "build_manifest",
    "check_workflow",
    "convert_workflow",
    "load_workflow",
    "parse_set",
    "preflight",
    "resolve_server",
    "write_manifest",
]
