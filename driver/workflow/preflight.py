"""Check a workflow against the server's ``/object_info`` before submitting it, and turn the server's own
validation errors (a 400 from ``POST /prompt``) into readable per-node problems.

The checks mirror ComfyUI's ``validate_prompt`` (every class must exist; then, for output nodes and their
ancestors only: required inputs present, links well-formed and type-compatible, numbers within min/max,
list-combo values among the choices) and add what the server cannot say well: which custom-node pack is
probably missing, close matches for misspelled choices, links to nodes that are not there.
"""

from __future__ import annotations

from typing import Any

from ..errors import NodeProblem, ValidationError, close_matches
from .object_info import declared_inputs, is_file_picker, is_output_node, output_types, split_spec
from .overrides import node_title

# What the editor submits beside the declared inputs and ComfyUI ignores: the upload button's value, and the
# audio player of nodes with an audio upload (ComfyUI's Load Audio, CharForge's) as "audioUI" (convert.py).
_KNOWN_IGNORED_INPUTS = {"upload", "audioUI"}


def _type_name(kind: Any) -> str:
    if isinstance(kind, list):
        return "a choice"
    return str(kind)


def _choices_text(choices: list[Any], value: Any) -> str:
    hint = close_matches(value, choices)
    text = ""
    if hint:
        text += f"; did you mean {', '.join(repr(h) for h in hint)}?"
    if len(choices) <= 12:
        text += f" (choices: {', '.join(map(str, choices)) or 'none'})"
    else:
        text += f" ({len(choices)} choices)"
    return text


def describe_server_error(err: dict[str, Any]) -> str:
    """One readable sentence for one entry of a node's ``errors`` list."""
    kind = err.get("type")
    extra = err.get("extra_info") or {}
    value = extra.get("received_value")
    config = extra.get("input_config")
    input_type = config[0] if isinstance(config, (list, tuple)) and config else None
    options = (
        config[1]
        if isinstance(config, (list, tuple)) and len(config) > 1 and isinstance(config[1], dict)
        else {}
    )
    message = str(err.get("message") or "")
    details = str(err.get("details") or "")
    if kind == "required_input_missing":
        return "required input is missing"
    if kind == "bad_linked_input":
        return f"bad link {value!r}: a link must be [node_id, output_index]"
    if kind == "return_type_mismatch":
        linked = extra.get("linked_node")
        src = (
            f" (node {linked[0]} output {linked[1]})" if isinstance(linked, list) and len(linked) == 2 else ""
        )
        return (
            f"connected to an output of type {extra.get('received_type')}{src}, but the input takes "
            f"{_type_name(input_type)}"
        )
    if kind == "invalid_input_type":
        return f"{value!r} is not a valid {_type_name(input_type)} value"
    if kind == "value_smaller_than_min":
        return f"{value} is below the minimum {options.get('min', '?')}"
    if kind == "value_bigger_than_max":
        return f"{value} is above the maximum {options.get('max', '?')}"
    if kind == "value_not_in_list":
        if isinstance(input_type, list):
            return f"{value!r} is not one of the allowed values" + _choices_text(input_type, value)
        return f"{value!r} is not one of the allowed values ({details.split(' not in ', 1)[-1]})"
    if kind == "custom_validation_failed":
        name = extra.get("input_name")
        if name and details.startswith(f"{name} - "):
            return details[len(name) + 3 :]
        return details or message
    if details and details not in message:
        return f"{message}: {details}" if message else details
    return message or details or str(kind)


def problems_from_server(
    error: dict[str, Any] | None, node_errors: dict[str, Any], prompt: dict[str, Any]
) -> list[NodeProblem]:
    """Per-node problems from a ``POST /prompt`` answer (``error`` + ``node_errors``)."""
    problems: list[NodeProblem] = []
    for node_id, entry in (node_errors or {}).items():
        node = prompt.get(str(node_id)) or {}
        class_type = (entry or {}).get("class_type") or node.get("class_type")
        for err in (entry or {}).get("errors") or []:
            extra = err.get("extra_info") or {}
            problems.append(
                NodeProblem(
                    str(node_id),
                    class_type,
                    describe_server_error(err),
                    input_name=extra.get("input_name"),
                    kind=str(err.get("type")),
                    title=node_title(node),
                )
            )
    if not problems and isinstance(error, dict) and error.get("type") == "invalid_prompt":
        details = str(error.get("details") or "")
        node_id = details.split("#", 1)[1].rstrip("'") if "#" in details else "?"
        node = prompt.get(node_id) or {}
        class_type = node.get("class_type")
        message = str(error.get("message") or "")
        if "does not exist" in message and class_type:
            message = (
                f"node class {class_type!r} is not installed on the server; the custom-node pack that "
                "provides it is probably not installed (or failed to import - see the server log)"
            )
        problems.append(
            NodeProblem(node_id, class_type, message, kind="invalid_prompt", title=node_title(node))
        )
    return problems


# ------------------------------------------------------------------------------------------------------------
# Preflight
# ------------------------------------------------------------------------------------------------------------


def types_compatible(output_type: Any, input_type: Any) -> bool:
    """ComfyUI's link rule: equal types, overlapping comma-separated unions, or the ANY type ``*``."""
    if isinstance(input_type, list) or input_type == "COMBO":
        return output_type == "COMBO" or isinstance(output_type, list) or output_type == "*"
    out, inp = str(output_type), str(input_type)
    if out == "*" or inp == "*" or out == inp:
        return True
    return bool({t.strip() for t in out.split(",")} & {t.strip() for t in inp.split(",")})


def _reachable(prompt: dict[str, Any], roots: list[str]) -> list[str]:
    seen: list[str] = []
    stack = list(roots)
    while stack:
        node_id = stack.pop()
        if node_id in seen or node_id not in prompt:
            continue
        seen.append(node_id)
        for value in (prompt[node_id].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2:
                stack.append(str(value[0]))
    return seen


def _links_of(node: Any) -> list[str]:
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return []
    return [str(v[0]) for v in inputs.values() if isinstance(v, list) and len(v) == 2]


def find_cycle(prompt: dict[str, Any], nodes: list[str] | None = None) -> list[str] | None:
    """A dependency cycle among ``nodes`` (default: all), as node ids in link order with the first repeated at
    the end (``["3", "8", "3"]``); None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(nodes if nodes is not None else prompt, key=_sort_key):
        if state.get(start):
            continue
        path: list[str] = [start]
        pending: list[list[str]] = [[s for s in _links_of(prompt.get(start)) if s in prompt]]
        state[start] = 1
        while path:
            if not pending[-1]:
                state[path.pop()] = 2
                pending.pop()
                continue
            nxt = pending[-1].pop()
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if state.get(nxt) == 2:
                continue
            state[nxt] = 1
            path.append(nxt)
            pending.append([s for s in _links_of(prompt.get(nxt)) if s in prompt])
    return None


def nodes_to_run(prompt: dict[str, Any], object_info: dict[str, Any]) -> list[str]:
    """The nodes the server will execute: output nodes and everything they depend on."""
    outputs = [nid for nid, node in prompt.items() if is_output_node(object_info, node.get("class_type"))]
    return sorted(_reachable(prompt, outputs), key=_sort_key)


def _sort_key(node_id: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in node_id.replace(".", ":").split(":"))


def _check_literal(problem: Any, name: str, value: Any, kind: Any, options: dict[str, Any]) -> None:
    if isinstance(value, dict) and "__value__" in value:
        value = value["__value__"]
    number: float | None = None
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            problem(name, f"{value!r} is not an integer", "invalid_input_type")
            return
        try:
            number = int(value)
        except (TypeError, ValueError):
            problem(name, f"{value!r} is not an integer", "invalid_input_type")
            return
    elif kind == "FLOAT":
        try:
            number = float(value)
        except (TypeError, ValueError):
            problem(name, f"{value!r} is not a number", "invalid_input_type")
            return
    if number is not None:
        if "min" in options and isinstance(options["min"], (int, float)) and number < options["min"]:
            problem(name, f"{value} is below the minimum {options['min']}", "value_smaller_than_min")
        elif "max" in options and isinstance(options["max"], (int, float)) and number > options["max"]:
            problem(name, f"{value} is above the maximum {options['max']}", "value_bigger_than_max")
        return
    if isinstance(kind, list):
        if value in kind:
            return
        if is_file_picker(options):
            if isinstance(value, str) and ("/" in value or value.endswith("]")):
                return  # a subfolder or annotated name: only the server's own check can tell
            problem(
                name,
                f"{value!r} is not in the server's input folder; upload it with "
                f"--input NODE={value}" + _choices_text(kind, value),
                "value_not_in_list",
            )
            return
        problem(
            name,
            f"{value!r} is not one of the allowed values" + _choices_text(kind, value),
            "value_not_in_list",
        )
        return
    if kind == "COMBO":
        choices = options.get("options")
        if isinstance(choices, list) and choices and not options.get("remote") and value not in choices:
            problem(
                name,
                f"{value!r} is not one of the listed options (the server does not check this form; "
                "the node may fail)" + _choices_text(choices, value),
                "value_not_in_list",
                severity="warning",
            )


def preflight(prompt: dict[str, Any], object_info: dict[str, Any]) -> list[NodeProblem]:
    """Every problem the server would report (and a few it would not), without submitting."""
    problems: list[NodeProblem] = []

    def add(
        node_id: str,
        message: str,
        input_name: str | None = None,
        kind: str = "error",
        severity: str = "error",
    ) -> None:
        node = prompt.get(node_id) or {}
        problems.append(
            NodeProblem(
                node_id,
                node.get("class_type"),
                message,
                input_name=input_name,
                kind=kind,
                title=node_title(node),
                severity=severity,
            )
        )

    known: set[str] = set()
    for node_id in sorted(prompt, key=_sort_key):
        node = prompt[node_id]
        class_type = node.get("class_type")
        if not class_type:
            add(node_id, "has no class_type", kind="invalid_prompt")
        elif class_type not in object_info:
            hint = close_matches(class_type, object_info)
            extra = f" (similar installed classes: {', '.join(hint)})" if hint else ""
            add(
                node_id,
                f"node class {class_type!r} is not installed on this server; the custom-node pack that "
                f"provides it is probably not installed (or failed to import - see the server log){extra}",
                kind="missing_node_class",
            )
        else:
            known.add(node_id)
    outputs = [nid for nid in known if is_output_node(object_info, prompt[nid]["class_type"])]
    if not outputs and not problems:
        problems.append(
            NodeProblem(
                "-",
                None,
                "the workflow has no output node (SaveImage, PreviewImage, ...); "
                "the server would refuse to run it",
                kind="prompt_no_outputs",
            )
        )
    cycle = find_cycle(prompt, _reachable(prompt, outputs) if outputs else None)
    if cycle is not None:
        path = " -> ".join(f"{nid} ({(prompt.get(nid) or {}).get('class_type', '?')})" for nid in cycle)
        add(
            cycle[0],
            f"is part of a dependency cycle: {path}; a node cannot depend on its own output, "
            "remove one of these links",
            kind="dependency_cycle",
        )
    for node_id in sorted(_reachable(prompt, outputs), key=_sort_key):
        if node_id not in known:
            continue
        node = prompt[node_id]
        class_type = node["class_type"]
        required, optional = declared_inputs(object_info, class_type)
        inputs = node.get("inputs") or {}

        def problem(name: str, message: str, kind: str, severity: str = "error", _nid: str = node_id) -> None:
            add(_nid, message, name, kind, severity)

        for name, spec in required.items():
            if name not in inputs:
                kind, _ = split_spec(spec)
                what = (
                    f"connect a {kind} output to it"
                    if isinstance(kind, str)
                    and kind.isupper()
                    and kind not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
                    else "give it a value"
                )
                problem(name, f"required input is missing ({what})", "required_input_missing")
        for name, value in inputs.items():
            spec = required.get(name, optional.get(name))
            if spec is None:
                if name not in _KNOWN_IGNORED_INPUTS:
                    hint = close_matches(name, [*required, *optional])
                    extra = f"; did you mean {', '.join(hint)}?" if hint else ""
                    problem(
                        name,
                        f"{class_type} has no input {name!r}; the server ignores it{extra}",
                        "unknown_input",
                        severity="warning",
                    )
                continue
            kind, options = split_spec(spec)
            if isinstance(value, list):
                if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
                    problem(
                        name,
                        f"bad link {value!r}: a link must be [node_id, output_index] (wrap a literal "
                        'list as {"__value__": [...]})',
                        "bad_linked_input",
                    )
                    continue
                source = str(value[0])
                if source not in prompt:
                    problem(name, f"links to node {source}, which is not in the workflow", "bad_linked_input")
                    continue
                if source not in known:
                    continue
                source_outputs = output_types(object_info, prompt[source]["class_type"])
                if not 0 <= value[1] < len(source_outputs):
                    problem(
                        name,
                        f"links to output {value[1]} of node {source} "
                        f"({prompt[source]['class_type']}), which has {len(source_outputs)} output(s)",
                        "bad_linked_input",
                    )
                    continue
                out_type = source_outputs[value[1]]
                if not types_compatible(out_type, kind):
                    problem(
                        name,
                        f"connected to node {source} output {value[1]} of type {_type_name(out_type)}, "
                        f"but the input takes {_type_name(kind)}",
                        "return_type_mismatch",
                    )
                continue
            _check_literal(problem, name, value, kind, options)
    return sorted(problems, key=lambda p: _sort_key(p.node_id) if p.node_id != "-" else ())


def check_workflow(prompt: dict[str, Any], object_info: dict[str, Any]) -> list[NodeProblem]:
    """Run :func:`preflight`; raise :class:`ValidationError` on errors, return the warnings otherwise."""
    problems = preflight(prompt, object_info)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        count = len(errors)
        raise ValidationError(
            f"the workflow has {count} problem{'s' if count != 1 else ''} (found before "
            "submitting, nothing was queued)",
            problems,
            source="preflight",
        )
    return problems
