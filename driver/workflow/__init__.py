"""Workflows as data, before any server sees them: reading them (:mod:`.load`), converting the editor format
(:mod:`.convert`), overrides (:mod:`.overrides`), the server's node definitions (:mod:`.object_info`), checks
(:mod:`.preflight`), building graphs in code (:mod:`.graph`) and :func:`.prepare.prepare_run`, which ties them
together as a pure function. Nothing here does network I/O; the client does.

(The preflight function itself is ``charforge.driver.workflow.preflight.preflight``: not re-exported here, so
the name ``preflight`` keeps meaning the module.)
"""

from .convert import convert_workflow
from .graph import Graph
from .load import Workflow, coerce_workflow, load_workflow, workflow_from_data
from .object_info import input_choices
from .overrides import (
    AppliedOverride,
    InputFile,
    Override,
    apply_overrides,
    parse_input,
    parse_set,
    plan_inputs,
)
from .preflight import check_workflow, nodes_to_run, problems_from_server
from .prepare import PreparedRun, as_api, prepare_run

__all__ = [
    "AppliedOverride",
    "Graph",
    "InputFile",
    "Override",
    "PreparedRun",
    "Workflow",
    "apply_overrides",
    "as_api",
    "check_workflow",
    "coerce_workflow",
    "convert_workflow",
    "input_choices",
    "load_workflow",
    "nodes_to_run",
    "parse_input",
    "parse_set",
    "plan_inputs",
    "prepare_run",
    "problems_from_server",
    "workflow_from_data",
]
