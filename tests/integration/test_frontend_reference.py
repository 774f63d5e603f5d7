"""Opt-in: the real ComfyUI editor converts template workflows to the API format, and CharForge's converter
(``charforge.driver.workflow.convert``) must agree with it.

Runs when COMFYUI_DIR points at a ComfyUI install whose frontend and templates packages are installed, a
Chromium is at ``$CHROMIUM`` or ``/usr/bin/chromium``, and Python Playwright is importable (its browsers are
not needed). Starts its own ComfyUI (``--cpu``, free loopback port, throwaway base directory), runs
``frontend_reference.py`` on a handful of templates chosen for the features they exercise, checks the
editor's prompts are well-formed, then compares the driver's conversion of the same templates to them.

``test_driver_matches_saved_references`` compares against a full reference run saved earlier instead
(``FRONTEND_REF_DIR``: the ``--out`` folder of ``frontend_reference.py``, which holds ``object_info.json``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cf_testing.real_comfyui import CHROMIUM, browser_skip_reason, comfyui_dir, start_comfyui

SCRIPT = Path(__file__).with_name("frontend_reference.py")

# Small templates that between them use primitive nodes, reroutes, notes, subgraphs, and bypassed and muted
# nodes: the parts of the conversion that are easy to get wrong.
TEMPLATES = {
    "default": "plain text-to-image",
    "hidream_e1_1": "PrimitiveNode and Reroute",
    "sdxl_refiner_prompt_example": "PrimitiveNode feeding several widgets",
    "image_qwen_image_instantx_controlnet": "subgraph and bypassed nodes",
    "hunyuan_video_text_to_video": "muted node",
}

# Names under which the driver's converter may be exposed, most likely first (driver/workflow/prepare.py calls
# ``convert_workflow(ui_workflow, object_info)``).
CONVERTER_NAMES = ("convert_workflow", "editor_to_api", "workflow_to_api", "ui_to_api", "to_api", "convert")


# --- checks ------------------------------------------------------------------------------------------------


def is_link(value: Any) -> bool:
    """ComfyUI reads an input as a link when it is ``[node_id: str, output_index: int]``."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def api_graph_problems(prompt: Any, object_info: dict[str, Any]) -> list[str]:
    """What makes ``prompt`` not a valid API-format graph for a server with ``object_info``."""
    if not isinstance(prompt, dict) or not prompt:
        return [f"not a non-empty object: {type(prompt).__name__}"]
    problems = []
    for node_id, node in prompt.items():
        if (
            not isinstance(node, dict)
            or not isinstance(node.get("class_type"), str)
            or not isinstance(node.get("inputs"), dict)
        ):
            problems.append(f"node {node_id}: needs a string class_type and an inputs object: {node!r:.200}")
            continue
        if node["class_type"] not in object_info:
            problems.append(f"node {node_id}: class_type {node['class_type']!r} is not a server node")
        for name, value in node["inputs"].items():
            if not is_link(value):
                continue
            source_id, index = value
            source = prompt.get(source_id)
            if source is None:
                problems.append(f"node {node_id} input {name}: links to missing node {source_id}")
                continue
            outputs = object_info.get(source.get("class_type"), {}).get("output", [])
            if not 0 <= index < len(outputs):
                problems.append(
                    f"node {node_id} input {name}: output {index} of {source_id} "
                    f"({source.get('class_type')}) does not exist ({len(outputs)} outputs)"
                )
    return problems


def prompt_differences(reference: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """Differences in node ids, class types and inputs (links and values) between two API prompts."""
    differences = []
    for node_id in sorted(set(reference) - set(candidate), key=_id_order):
        differences.append(f"node {node_id} ({reference[node_id].get('class_type')}) missing")
    for node_id in sorted(set(candidate) - set(reference), key=_id_order):
        differences.append(f"node {node_id} ({candidate[node_id].get('class_type')}) extra")
    for node_id in sorted(set(reference) & set(candidate), key=_id_order):
        want, got = reference[node_id], candidate[node_id]
        if want.get("class_type") != got.get("class_type"):
            differences.append(
                f"node {node_id}: class_type {got.get('class_type')!r}, frontend {want.get('class_type')!r}"
            )
            continue
        want_inputs, got_inputs = want.get("inputs", {}), got.get("inputs", {})
        label = f"node {node_id} ({want.get('class_type')})"
        for name in want_inputs.keys() - got_inputs.keys():
            differences.append(f"{label}: input {name!r} missing (frontend {_short(want_inputs[name])})")
        for name in got_inputs.keys() - want_inputs.keys():
            differences.append(f"{label}: input {name!r} extra ({_short(got_inputs[name])})")
        for name in want_inputs.keys() & got_inputs.keys():
            if not _same(want_inputs[name], got_inputs[name]):
                differences.append(
                    f"{label}: input {name!r} is {_short(got_inputs[name])}, "
                    f"frontend {_short(want_inputs[name])}"
                )
    return differences


def _same(a: Any, b: Any) -> bool:
    # JSON does not tell 8 from 8.0; bool is not a number here.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 120 else text[:117] + "..."


def _id_order(node_id: str) -> tuple:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in node_id.split(":"))


# --- the driver's converter ----------------------------------------------------------------------------------


def driver_converter():
    """``(convert(workflow, object_info) -> API prompt, None)``, or ``(None, why not)``."""
    try:
        module = importlib.import_module("charforge.driver.workflow.convert")
    except ModuleNotFoundError as error:
        if error.name in ("charforge.driver.workflow.convert", "charforge.driver", "charforge"):
            return None, "charforge.driver.workflow.convert does not exist yet"
        raise
    for name in CONVERTER_NAMES:
        function = getattr(module, name, None)
        if not callable(function) or inspect.isclass(function):
            continue
        parameters = inspect.signature(function).parameters
        if "object_info" in parameters:
            return functools.partial(_call_keyword, function), None
        positional = [
            p
            for p in parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        if len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional):
            return functools.partial(_call_positional, function), None
    public = sorted(
        n
        for n, v in vars(module).items()
        if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
    )
    return None, (
        f"charforge.driver.workflow.convert has no converter yet: expected convert_workflow(workflow, "
        f"object_info) (or {', '.join(CONVERTER_NAMES[1:])}); it defines: "
        f"{', '.join(public) or 'nothing public'}"
    )


def _call_keyword(function, workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    return _prompt_of(function(workflow, object_info=object_info))


def _call_positional(function, workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    return _prompt_of(function(workflow, object_info))


def _prompt_of(result: Any) -> dict[str, Any]:
    """The API prompt out of whatever the converter returns (a dict, or an object carrying one)."""
    if isinstance(result, dict):
        return result
    for attribute in ("prompt", "output", "api", "graph"):
        value = getattr(result, attribute, None)
        if isinstance(value, dict):
            return value
    raise TypeError(f"cannot find the API prompt in the converter's result {type(result).__name__}")


def compare_with_driver(cases: list[tuple[str, dict, dict]], object_info: dict[str, Any]) -> None:
    """Convert each ``(name, editor workflow, frontend prompt)`` with the driver; fail listing all differences."""
    convert, why_not = driver_converter()
    if convert is None:
        pytest.skip(f"driver comparison: {why_not}")
    report = []
    for name, workflow, reference in cases:
        try:
            ours = convert(workflow, object_info)
        except Exception as error:  # noqa: BLE001 - report every template, not just the first failure
            report.append(f"{name}: the driver raised {type(error).__name__}: {error}")
            continue
        differences = prompt_differences(reference, ours)
        if differences:
            shown = differences[:40] + (
                [f"... {len(differences) - 40} more"] if len(differences) > 40 else []
            )
            report.append(f"{name}: {len(differences)} difference(s)\n    " + "\n    ".join(shown))
    assert not report, (
        f"driver conversion differs from the ComfyUI frontend on {len(report)} of "
        f"{len(cases)} template(s):\n" + "\n".join(report)
    )


# --- tests ---------------------------------------------------------------------------------------------------


@dataclass
class FrontendRun:
    """One run of frontend_reference.py on ``TEMPLATES`` against a fresh ComfyUI."""

    returncode: int
    log: str
    summary: dict[str, Any]
    object_info: dict[str, Any]
    cases: list[tuple[str, dict, dict]]  # (template name, editor workflow, the frontend's API prompt)


@pytest.fixture(scope="module")
def frontend_run(tmp_path_factory) -> FrontendRun:
    """Start ComfyUI, run the reference script on ``TEMPLATES``, and read what it wrote; the server is
    stopped before the tests look at the results."""
    reason = browser_skip_reason()
    if reason:
        pytest.skip(reason)
    comfy = comfyui_dir()
    assert (comfy / "main.py").exists(), f"COMFYUI_DIR={comfy} has no main.py"
    root = tmp_path_factory.mktemp("frontend-reference")
    server = start_comfyui(comfy, root / "base")
    out = root / "reference"
    try:
        command = [
            sys.executable,
            str(SCRIPT),
            "--server",
            server.url,
            "--out",
            str(out),
            "--chromium",
            CHROMIUM,
            "--timeout",
            "45",
            "--ready-timeout",
            "90",
        ]
        for name in TEMPLATES:
            command += ["--name", name]
        run = subprocess.run(command, capture_output=True, text=True, timeout=170)
        log = f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        assert (out / "summary.json").exists(), log
        summary = json.loads((out / "summary.json").read_text())
        object_info = json.loads((out / "object_info.json").read_text())
        cases = []
        for entry in summary["templates"]:
            if entry["status"] == "converted":
                with urllib.request.urlopen(entry["source"], timeout=30) as response:
                    workflow = json.loads(response.read())
                cases.append((entry["name"], workflow, json.loads((out / entry["file"]).read_text())))
    finally:
        server.stop()
    return FrontendRun(run.returncode, log, summary, object_info, cases)


@pytest.mark.comfyui
@pytest.mark.slow
def test_frontend_converts_templates_to_valid_api_graphs(frontend_run):
    run = frontend_run
    assert run.returncode == 0, run.log
    outcomes = {entry["name"]: entry for entry in run.summary["templates"]}
    assert set(outcomes) == set(TEMPLATES), f"templates not served by this ComfyUI:\n{run.log}"
    not_converted = {name: entry for name, entry in outcomes.items() if entry["status"] != "converted"}
    assert not not_converted, json.dumps(not_converted, indent=1)[:3000]
    assert run.summary["frontend_version"], run.summary

    for name, _, prompt in run.cases:
        problems = api_graph_problems(prompt, run.object_info)
        assert not problems, f"{name}: " + "\n".join(problems)

    # What the frontend is known to do with these templates (guards the reference itself).
    by_name = {name: prompt for name, _, prompt in run.cases}
    assert any(":" in node_id for node_id in by_name["image_qwen_image_instantx_controlnet"]), (
        "subgraph nodes should appear with 'outer:inner' ids"
    )
    for prompt in by_name.values():
        assert not {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"} & {
            n["class_type"] for n in prompt.values()
        }


@pytest.mark.comfyui
@pytest.mark.slow
def test_driver_conversion_matches_frontend(frontend_run):
    assert frontend_run.cases, frontend_run.log
    compare_with_driver(frontend_run.cases, frontend_run.object_info)


@pytest.mark.skipif(
    not os.environ.get("FRONTEND_REF_DIR"),
    reason="set FRONTEND_REF_DIR to a frontend_reference.py --out folder to compare with it",
)
def test_driver_matches_saved_references():
    out = Path(os.environ["FRONTEND_REF_DIR"])
    summary = json.loads((out / "summary.json").read_text())
    object_info = json.loads((out / "object_info.json").read_text())
    cases = []
    for entry in summary["templates"]:
        if entry["status"] != "converted":
            continue
        source = entry["source"]
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=30) as response:
                workflow = json.loads(response.read())
        else:
            workflow = json.loads(Path(source).read_text(encoding="utf-8"))
        cases.append((entry["name"], workflow, json.loads((out / entry["file"]).read_text())))
    assert cases, f"no converted templates in {out}"
    compare_with_driver(cases, object_info)
