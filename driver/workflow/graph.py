"""Building an API-format prompt in code: the one graph builder the recipes and the tests share.

::

    graph = Graph()
    model = graph.add("1", "CheckpointLoaderSimple", "Load Checkpoint", ckpt_name="sd15.safetensors")
    graph.add("2", "CLIPTextEncode", "Prompt", text="a cat", clip=graph.link("1", 1))
    prompt = graph.prompt  # {"1": {"class_type": ..., "inputs": {...}, "_meta": {"title": ...}}, ...}

Links are ``[node_id, output_index]`` as ``POST /prompt`` takes them; a literal list value must be wrapped
(``{"__value__": [...]}``, see :func:`~charforge.driver.workflow.overrides.wrap_list`).
"""

from __future__ import annotations

from typing import Any


class Graph:
    """An API-format prompt under construction (nodes keep the order they were added in)."""

    def __init__(self) -> None:
        self.prompt: dict[str, Any] = {}

    def add(self, node_id: str, class_type: str, title: str | None = None, **inputs: Any) -> list[Any]:
        """Add (or replace) node ``node_id``; returns the link to its first output."""
        node: dict[str, Any] = {"class_type": class_type, "inputs": inputs}
        if title is not None:
            node["_meta"] = {"title": title}
        self.prompt[str(node_id)] = node
        return [str(node_id), 0]

    @staticmethod
    def link(node_id: str, output: int = 0) -> list[Any]:
        """The link to output ``output`` of node ``node_id``."""
        return [str(node_id), output]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.prompt

    def __len__(self) -> int:
        return len(self.prompt)
