"""Getting a workflow ready to run, without any I/O to a server: convert it, apply overrides, check it, plan
its uploads.

:func:`prepare_run` is a pure function of the workflow, the server's ``/object_info`` and the overrides; it
returns a :class:`PreparedRun` whose ``pending_uploads`` name the local files the prompt still needs. The client
(``client.prepare_run(...)``, what ``charforge run`` and ``charforge validate`` do) fetches ``/object_info``,
uploads those files and hands the names the server chose to :meth:`PreparedRun.with_uploads`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import NodeProblem, ValidationError
from .convert import convert_workflow
from .load import Workflow, coerce_workflow
from .overrides import (
    AppliedOverride,
    InputFile,
    Override,
    PlannedUpload,
    apply_overrides,
    parse_input,
    parse_set,
    plan_inputs,
)
from .preflight import preflight as run_preflight


@dataclass
class PreparedRun:
    """A workflow with overrides applied, ready for ``submit`` once ``pending_uploads`` are uploaded."""

    workflow: Workflow
    applied: list[AppliedOverride] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[NodeProblem] = field(default_factory=list)
    pending_uploads: list[PlannedUpload] = field(default_factory=list)

    @property
    def prompt(self) -> dict[str, Any]:
        assert self.workflow.prompt is not None
        return self.workflow.prompt

    def with_uploads(self, references: list[str]) -> PreparedRun:
        """The run with each pending upload replaced by the name the server stored it under (``references[i]``
        for ``pending_uploads[i]``); what was uploaded is recorded in ``uploads`` (and the manifest)."""
        if len(references) != len(self.pending_uploads):
            raise ValueError(
                f"{len(self.pending_uploads)} uploads are pending, {len(references)} names were given"
            )
        prompt = copy.deepcopy(self.prompt)
        applied = [replace(a) for a in self.applied]
        uploads = list(self.uploads)
        for item, reference in zip(self.pending_uploads, references, strict=True):
            prompt[item.node_id]["inputs"][item.input] = reference
            if item.override_index is not None:
                applied[item.override_index].value = reference
                applied[item.override_index].uploaded_from = str(item.path)
            uploads.append(
                {
                    "node_id": item.node_id,
                    "input": item.input,
                    "local_path": str(item.path),
                    "uploaded_as": reference,
                    "given_as": item.spec,
                }
            )
        return PreparedRun(replace(self.workflow, prompt=prompt), applied, uploads, list(self.warnings))


def as_api(workflow: Workflow | dict[str, Any] | str | Path, object_info: dict[str, Any]) -> Workflow:
    """The workflow (a path, parsed JSON or a :class:`Workflow`) in the API format: an editor workflow is
    converted with ``object_info``."""
    wf = coerce_workflow(workflow)
    if wf.prompt is None:
        wf = Workflow(
            prompt=convert_workflow(wf.ui or {}, object_info), ui=wf.ui, source=wf.source, format=wf.format
        )
    return wf


def prepare_run(
    workflow: Workflow | dict[str, Any] | str | Path,
    object_info: dict[str, Any],
    *,
    sets: Sequence[str | Override] = (),
    inputs: Sequence[str | InputFile] = (),
    preflight: bool = True,
) -> PreparedRun:
    """Convert ``workflow`` when it is an editor workflow, apply ``--set`` overrides, check it against
    ``object_info`` and plan the ``--input`` files (and override values naming local files for file-picking
    inputs) as ``pending_uploads``.

    Raises :class:`~charforge.driver.errors.OverrideError` for overrides that do not address one input, and
    :class:`~charforge.driver.errors.ValidationError` when the preflight finds errors.
    """
    wf = as_api(workflow, object_info)
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
            raise ValidationError(
                f"the workflow has {len(errors)} problem{'s' if len(errors) != 1 else ''} (found "
                "before submitting, nothing was queued)",
                problems,
                source="preflight",
            )
        warnings = problems
    final = Workflow(prompt=prompt, ui=wf.ui, source=wf.source, format=wf.format)
    return PreparedRun(final, applied, [], warnings, planned)
