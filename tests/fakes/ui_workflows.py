"""Editor (UI-format) workflows for conversion tests, written the way the ComfyUI editor saves them."""

from __future__ import annotations

from typing import Any


def node(
    node_id: int,
    node_type: str,
    *,
    inputs: Any = (),
    outputs: Any = (),
    widgets: Any = None,
    mode: int = 0,
    title: str | None = None,
) -> dict[str, Any]:
    """An editor node; inputs are (name, type, link) or (name, type, link, widget_name)."""
    entry = {
        "id": node_id,
        "type": node_type,
        "pos": [0, 0],
        "size": [200, 100],
        "flags": {},
        "order": 0,
        "mode": mode,
        "properties": {"Node name for S&R": node_type},
        "inputs": [
            {"name": i[0], "type": i[1], "link": i[2], **({"widget": {"name": i[3]}} if len(i) > 3 else {})}
            for i in inputs
        ],
        "outputs": [{"name": o[0], "type": o[1], "links": list(o[2]) if len(o) > 2 else []} for o in outputs],
    }
    if widgets is not None:
        entry["widgets_values"] = widgets
    if title:
        entry["title"] = title
    return entry


def classic() -> dict[str, Any]:
    """The editor's default txt2img workflow as "Save" writes it (schema 0.4, array links)."""
    return {
        "last_node_id": 9,
        "last_link_id": 9,
        "version": 0.4,
        "groups": [],
        "config": {},
        "extra": {},
        "nodes": [
            node(
                4,
                "CheckpointLoaderSimple",
                outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
                widgets=["v1-5-pruned-emaonly.safetensors"],
                title="Load Checkpoint",
            ),
            node(5, "EmptyLatentImage", outputs=[("LATENT", "LATENT")], widgets=[512, 512, 1]),
            node(
                6,
                "CLIPTextEncode",
                inputs=[("clip", "CLIP", 3)],
                outputs=[("CONDITIONING", "CONDITIONING")],
                widgets=["a cat // note to self\n"],
                title="Positive",
            ),
            node(
                7,
                "CLIPTextEncode",
                inputs=[("clip", "CLIP", 5)],
                outputs=[("CONDITIONING", "CONDITIONING")],
                widgets=["blurry"],
                title="Negative",
            ),
            node(
                3,
                "KSampler",
                inputs=[
                    ("model", "MODEL", 1),
                    ("positive", "CONDITIONING", 4),
                    ("negative", "CONDITIONING", 6),
                    ("latent_image", "LATENT", 2),
                ],
                outputs=[("LATENT", "LATENT")],
                widgets=[156680208700286, "randomize", 20, 8, "euler", "normal", 1],
            ),
            node(
                8,
                "VAEDecode",
                inputs=[("samples", "LATENT", 7), ("vae", "VAE", 8)],
                outputs=[("IMAGE", "IMAGE")],
            ),
            node(9, "SaveImage", inputs=[("images", "IMAGE", 9)], widgets=["ComfyUI"]),
            node(10, "Note", widgets=["remember to change the prompt"]),
        ],
        "links": [
            [1, 4, 0, 3, 0, "MODEL"],
            [2, 5, 0, 3, 3, "LATENT"],
            [3, 4, 1, 6, 0, "CLIP"],
            [4, 6, 0, 3, 1, "CONDITIONING"],
            [5, 4, 1, 7, 0, "CLIP"],
            [6, 7, 0, 3, 2, "CONDITIONING"],
            [7, 3, 0, 8, 0, "LATENT"],
            [8, 4, 2, 8, 1, "VAE"],
            [9, 8, 0, 9, 0, "IMAGE"],
        ],
    }
