"""Walk every registered node and check its declaration against ComfyUI's node contract."""

import inspect
import math

import pytest

from cf_testing.comfyui import CORE_TYPES, HIDDEN_KINDS, WIDGET_TYPES, node_info
from charforge.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from charforge.nodes.types import CUSTOM_TYPES

KNOWN_TYPES = CORE_TYPES | set(CUSTOM_TYPES)
NODES = sorted(NODE_CLASS_MAPPINGS.items())


def test_pack_registers_nodes():
    assert NODES, "the pack registers no node"
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert all(node_id.startswith("CharForge") for node_id in NODE_CLASS_MAPPINGS)


def _inputs(cls):
    declared = cls.INPUT_TYPES()
    assert set(declared) <= {"required", "optional", "hidden"}, f"unknown input sections: {set(declared)}"
    return declared


@pytest.mark.parametrize(("node_id", "cls"), NODES, ids=[n for n, _ in NODES])
def test_declaration(node_id, cls):
    assert cls.CATEGORY.startswith("CharForge/"), cls.CATEGORY
    assert getattr(cls, "DESCRIPTION", "").strip(), "every node needs a DESCRIPTION (ComfyUI shows it)"
    assert cls.__doc__ and cls.__doc__.strip()
    assert isinstance(cls.RETURN_TYPES, tuple)
    for out_type in cls.RETURN_TYPES:
        assert out_type in KNOWN_TYPES, (
            f"output type {out_type!r} is neither a ComfyUI type nor in CUSTOM_TYPES"
        )
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_TOOLTIPS"):
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    if hasattr(cls, "OUTPUT_IS_LIST"):
        assert len(cls.OUTPUT_IS_LIST) == len(cls.RETURN_TYPES)
    if not cls.RETURN_TYPES:
        assert getattr(cls, "OUTPUT_NODE", False), (
            "a node without outputs must be an OUTPUT_NODE or it never runs"
        )

    declared = _inputs(cls)
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            _check_input(name, spec, optional=section == "optional")
    for name, kind in declared.get("hidden", {}).items():
        assert kind in HIDDEN_KINDS, f"hidden input {name!r} has unknown kind {kind!r}"

    function = getattr(cls, cls.FUNCTION, None)
    assert callable(function), f"FUNCTION {cls.FUNCTION!r} is not a method"
    params = inspect.signature(function).parameters
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    every_input = [n for s in ("required", "optional", "hidden") for n in declared.get(s, {})]
    for name in every_input:
        assert accepts_kwargs or name in params, f"{cls.FUNCTION}() does not accept input {name!r}"
    for name in list(declared.get("optional", {})) + list(declared.get("hidden", {})):
        # ComfyUI omits unconnected optional inputs: the function needs a default for them.
        if name in params:
            assert params[name].default is not inspect.Parameter.empty, (
                f"optional input {name!r} needs a default"
            )
    required = {
        n
        for n, p in params.items()
        if n != "self"
        and p.default is inspect.Parameter.empty
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    assert required <= set(declared.get("required", {})), f"function requires undeclared {required}"

    info = node_info(node_id, cls, NODE_DISPLAY_NAME_MAPPINGS[node_id])
    assert info["output_name"] and len(info["output_name"]) == len(info["output"]) or not info["output"]


def _check_input(name, spec, optional):
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, f"{name}: spec must be (TYPE,) or (TYPE, options)"
    kind = spec[0]
    options = spec[1] if len(spec) == 2 else {}
    assert isinstance(options, dict)
    assert options.get("tooltip"), f"input {name!r} needs a tooltip"
    if isinstance(kind, list):  # combo, list form (validated by the server)
        assert kind, f"combo {name!r} has no choices"
        if "default" in options:
            assert options["default"] in kind, f"combo {name!r}: default {options['default']!r} not a choice"
        return
    assert isinstance(kind, str)
    assert kind in KNOWN_TYPES, f"input {name!r} has unknown type {kind!r}"
    if kind in WIDGET_TYPES and not options.get("forceInput"):
        assert "default" in options or optional, f"widget {name!r} needs a default"
    if kind in ("INT", "FLOAT") and "default" in options:
        default = options["default"]
        assert isinstance(default, (int, float)) and not (isinstance(default, float) and math.isnan(default))
        if kind == "INT":
            assert isinstance(default, int) and not isinstance(default, bool)
        lo, hi = options.get("min", -math.inf), options.get("max", math.inf)
        assert lo <= default <= hi, f"{name!r}: default {default} outside [{lo}, {hi}]"
        assert options.get("step", 1) > 0
    if kind == "BOOLEAN" and "default" in options:
        assert isinstance(options["default"], bool)
    if kind == "STRING" and "default" in options:
        assert isinstance(options["default"], str)
    if kind == "COMBO":
        assert options.get("options"), f"COMBO {name!r} needs options"
