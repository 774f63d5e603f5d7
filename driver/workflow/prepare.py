"""Getting a workflow ready to run: load/convert it, apply overrides, check it, upload local files.

:func:`prepare_run` is what ``charforge run`` and ``charforge validate`` do before submitting; it is usable
from Python too (``client.prepare_run(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import NodeProblem, ValidationError
from .preflight import preflight as run_preflight
from .workflow import (
    AppliedOverride,
    InputFile,
    Override,
    Workflow,
    apply_overrides,
    parse_input,
    parse_set,
    plan_inputs,
)

if TYPE_CHECKING:
    from .client import AsyncComfyClient


@dataclass
class PreparedRun:
    """A workflow with overrides applied and local files uploaded, ready for ``submit``."""

    workflow: Workflow
    applied: list[AppliedOverride] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[NodeProblem] = field(default_factory=list)

    @property
    def prompt(self) -> dict[str, Any]:
        assert self.workflow.prompt is not None
        return self.workflow.prompt


async def prepare_run(client: AsyncComfyClient, workflow: Workflow | dict[str, Any] | str | Path, *,
                      sets: list[str | Override] = (), inputs: list[str | InputFile] = (),  # type: ignore[assignment]
                      preflight: bool = True, upload: bool = True) -> PreparedRun:
    """Load/convert ``workflow``, apply ``--set`` overrides, check it against ``/object_info`` and upload the
    ``--input`` files (and override values naming local files for file-picking inputs).

    Raises :class:`~charforge.driver.errors.OverrideError` for overrides that do not address one input, and
    :class:`~charforge.driver.errors.ValidationError` when the preflight finds errors; nothing is uploaded
    then.
    """
    wf = await client.prepare(workflow)
    object_info = await client.object_info()
    overrides = [s if isinstance(s, Override) else parse_set(s) for s in sets]
    files = [i if isinstance(i, InputFile) else parse_input(i) for i in inputs]
    assert wf.prompt is not None
    prompt, applied = apply_overrides(wf.prompt, overrides, object_info)
    planned = plan_inputs(prompt, files, applied, object_info)
    warnings: list[NodeProblem] = []
    if preflight:
        pending = {(p.node_id, p.input) for p in planned}
        problems = [p for p in run_preflight(prompt, object_info) if (p.node_id, p.input_name) not in pending]
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise ValidationError(f"the workflow has {len(errors)} problem{'s' if len(errors) != 1 else ''} (found "
                                  "before submitting, nothing was queued)", problems, source="preflight")
        warnings = problems
    uploads: list[dict[str, Any]] = []
    if upload:
        for item in planned:
            uploaded = await client.upload(item.path)
            prompt[item.node_id]["inputs"][item.input] = uploaded.reference
            if item.override_index is not None:
                applied[item.override_index].value = uploaded.reference
                applied[item.override_index].uploaded_from = str(item.path)
            uploads.append({"node_id": item.node_id, "input": item.input, "local_path": str(item.path),
                            "uploaded_as": uploaded.reference, "given_as": item.spec})
    final = Workflow(prompt=prompt, ui=wf.ui, source=wf.source, format=wf.format)
    return PreparedRun(final, applied, uploads, warnings)
