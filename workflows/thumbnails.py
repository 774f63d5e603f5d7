"""Open every shipped workflow in the real ComfyUI editor: report what the editor says, write thumbnails.

ComfyUI lists ``workflows/*.json`` as this pack's templates and shows ``workflows/<name>.jpg`` on each
template card (``/api/workflow_templates/charforge/<name>.jpg``). This script opens the editor of a running
ComfyUI that has the pack installed in headless Chromium, loads each workflow the way the template browser
does (fetched from the server, then ``app.loadGraphData``), and records the console warnings and errors and
the toasts the load produced, and where the Note lands on screen. With ``--write`` it also draws each
graph fitted into the canvas and saves it, scaled down, as ``workflows/<name>.jpg``.

    python workflows/thumbnails.py --server http://127.0.0.1:8188 [--write] [--screenshots DIR] [--name GLOB]

Needs Python Playwright (``pip install playwright``; never ``playwright install``: it drives the system
Chromium, ``--chromium`` / ``$CHROMIUM`` / ``/usr/bin/chromium``). Exit status 1 when a workflow loaded with a
warning, an error, a toast or its Note off screen; tests/integration/test_real_comfyui_editor.py runs it.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import io
import json
import os
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WORKFLOWS_DIR = Path(__file__).resolve().parent
PACK_MODULE = "charforge"  # the pack's folder name in custom_nodes: the templates' module in the editor
THUMBNAIL_SIDE = 400  # the template browser shows each card's image in a square
VIEWPORT = {"width": 1440, "height": 900}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

READY_JS = """() => !!(window.app && window.app.graph && window.app.canvas && window.app.vueAppReady
    && Object.keys(window.LiteGraph.registered_node_types).length > 0)"""

# Load one template as the template browser does, then report the graph, the view and the Notes on screen.
LOAD_JS = """async ({module, name}) => {
    const response = await fetch(`api/workflow_templates/${module}/${name}.json`);
    if (!response.ok) return {error: `GET ${name}.json: HTTP ${response.status}`};
    const workflow = await response.json();
    await window.app.loadGraphData(workflow, true, true, name);
    await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
    const canvas = window.app.canvas;
    const rect = canvas.canvas.getBoundingClientRect();
    const notes = window.app.graph.nodes.filter((n) => n.type === 'Note').map((n) => {
        const [x, y] = canvas.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - 30]);
        return {x: rect.left + x, y: rect.top + y, width: n.size[0] * canvas.ds.scale,
                height: (n.size[1] + 30) * canvas.ds.scale};
    });
    return {nodes: window.app.graph.nodes.length, expected: workflow.nodes.length,
            canvas: {x: rect.left, y: rect.top, width: rect.width, height: rect.height},
            scale: canvas.ds.scale, offset: [...canvas.ds.offset], notes};
}"""

# The graph's left part drawn once into the canvas, as a PNG data URL (the view is put back afterwards): a
# square of the graph's full height (at least MIN_SIDE canvas units) from its top-left corner, so the Note and
# the first groups stay readable on the square card; the square is in the middle of the canvas.
DRAW_JS = """(minSide) => {
    const canvas = window.app.canvas;
    const boxes = window.app.graph.nodes.map((n) => [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30]);
    for (const g of window.app.graph.groups) boxes.push([...g._bounding ?? g.bounding]);
    const left = Math.min(...boxes.map((b) => b[0])) - 20, top = Math.min(...boxes.map((b) => b[1])) - 20;
    const right = Math.max(...boxes.map((b) => b[0] + b[2])) + 20;
    const bottom = Math.max(...boxes.map((b) => b[1] + b[3])) + 20;
    const side = Math.max(bottom - top, Math.min(right - left, minSide));
    const saved = {scale: canvas.ds.scale, offset: [...canvas.ds.offset], info: canvas.show_info};
    canvas.show_info = false;
    canvas.ds.fitToBounds([left, top, side, side], {zoom: 1});
    canvas.setDirty(true, true);
    canvas.draw(true, true);
    const url = canvas.canvas.toDataURL('image/png');
    Object.assign(canvas, {show_info: saved.info});
    canvas.ds.scale = saved.scale;
    canvas.ds.offset = saved.offset;
    canvas.setDirty(true, true);
    return url;
}"""
MIN_SIDE = 1400

TOASTS_JS = """() => [...document.querySelectorAll('.p-toast-message')].map((t) => t.innerText.trim())"""
CLOSE_TOASTS_JS = """() => document.querySelectorAll('.p-toast-message .p-toast-close-button')
    .forEach((b) => b.click())"""


@dataclass
class Loaded:
    """What happened when the editor opened one workflow."""

    name: str
    console: list[str] = field(default_factory=list)  # warnings and errors, "warning: ..." / "error: ..."
    toasts: list[str] = field(default_factory=list)
    view: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def notes_on_screen(self) -> bool:
        """Every Note's top-left corner is inside the canvas and at least 150 x 150 px of it is visible."""
        canvas = self.view.get("canvas")
        if not canvas or not self.view.get("notes"):
            return False
        right, bottom = canvas["x"] + canvas["width"], canvas["y"] + canvas["height"]
        return all(canvas["x"] <= n["x"] <= right - 150 and canvas["y"] <= n["y"] <= bottom - 150
                   for n in self.view["notes"])

    @property
    def problems(self) -> list[str]:
        found = [f"console {line}" for line in self.console] + [f"toast: {text}" for text in self.toasts]
        if self.error:
            found.append(self.error)
        elif self.view.get("nodes") != self.view.get("expected"):
            found.append(f"the editor holds {self.view.get('nodes')} of {self.view.get('expected')} nodes")
        elif not self.notes_on_screen:
            found.append(f"the Note is not on screen: {self.view.get('notes')} in canvas {self.view.get('canvas')}")
        return found


def workflow_names(patterns: list[str] | None = None) -> list[str]:
    names = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
    return [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def served_templates(server: str) -> list[str]:
    """The pack's template names the server lists (``GET /workflow_templates``)."""
    with urllib.request.urlopen(server.rstrip("/") + "/workflow_templates", timeout=30) as response:
        return sorted(json.loads(response.read()).get(PACK_MODULE, []))


def thumbnail_jpeg(png: bytes, side: int = THUMBNAIL_SIDE) -> bytes:
    """The square in the middle of the canvas drawing (:data:`DRAW_JS`), scaled to `side` px, as a JPEG."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        drawing = image.convert("RGB")
    square = min(drawing.size)
    x, y = (drawing.width - square) // 2, (drawing.height - square) // 2
    card = drawing.crop((x, y, x + square, y + square)).resize((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    card.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def open_workflows(server: str, names: list[str], *, chromium: str, screenshots: Path | None = None,
                   draw: bool = False, timeout: float = 120) -> tuple[list[Loaded], dict[str, bytes]]:
    """Load each workflow in the editor; returns what each load produced and, with `draw`, each graph's PNG."""
    from playwright.sync_api import sync_playwright

    server = server.rstrip("/")
    origin = urllib.parse.urlsplit(server)._replace(path="", query="", fragment="").geturl()
    results: list[Loaded] = []
    drawings: dict[str, bytes] = {}
    console: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport=VIEWPORT)
            # Only the ComfyUI server: the editor's calls elsewhere (release notes, registry) would just wait.
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(origin)
                          or not route.request.url.startswith("http") else route.abort("blockedbyclient"))
            page = context.new_page()
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}" + (
                f" ({m.location['url']})" if m.location.get("url") else "")) if m.type in ("warning", "error")
                else None)
            page.on("pageerror", lambda e: console.append(f"error: {e}"))
            page.goto(server + "/", timeout=timeout * 1000)
            page.wait_for_function(READY_JS, timeout=timeout * 1000, polling=200)
            page.wait_for_timeout(1500)  # startup toasts and messages settle
            page.keyboard.press("Escape")  # the first-run "Get started with a template" dialog
            page.evaluate(CLOSE_TOASTS_JS)
            console.clear()
            for name in names:
                loaded = Loaded(name)
                before = set(page.evaluate(TOASTS_JS))
                try:
                    loaded.view = page.evaluate(LOAD_JS, {"module": PACK_MODULE, "name": name})
                    loaded.error = loaded.view.pop("error", None)
                    page.wait_for_timeout(700)  # toasts appear after the load returns
                except Exception as exc:  # noqa: BLE001 - a page error is this workflow's result, go on
                    loaded.error = f"{type(exc).__name__}: {exc}"
                loaded.toasts = [t for t in page.evaluate(TOASTS_JS) if t not in before]
                loaded.console, console[:] = list(console), []
                if screenshots is not None:
                    screenshots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(screenshots / f"{name}.png"))
                if draw and loaded.error is None:
                    url = page.evaluate(DRAW_JS, MIN_SIDE)
                    drawings[name] = base64.b64decode(url.split(",", 1)[1])
                page.evaluate(CLOSE_TOASTS_JS)
                results.append(loaded)
        finally:
            browser.close()
    return results, drawings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True,
                        help="a ComfyUI with CharForge installed, e.g. http://127.0.0.1:8188")
    parser.add_argument("--write", action="store_true", help="write workflows/<name>.jpg thumbnails")
    parser.add_argument("--screenshots", type=Path, help="save a screenshot of the editor after each load here")
    parser.add_argument("--name", action="append", metavar="GLOB", help="only these workflows (repeatable)")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args(argv)
    names = workflow_names(args.name)
    missing = sorted(set(names) - set(served_templates(args.server)))
    if missing:
        print(f"the server does not list these as CharForge templates: {', '.join(missing)} (is the pack installed "
              "from this checkout?)", file=sys.stderr)
        return 2
    results, drawings = open_workflows(args.server, names, chromium=args.chromium, screenshots=args.screenshots,
                                       draw=args.write)
    for name, png in drawings.items():
        (WORKFLOWS_DIR / f"{name}.jpg").write_bytes(thumbnail_jpeg(png))
    failed = 0
    for loaded in results:
        problems = loaded.problems
        failed += bool(problems)
        print(f"{'ok ' if not problems else 'BAD'} {loaded.name}" + "".join(f"\n    {p}" for p in problems))
    if drawings:
        print(f"wrote {len(drawings)} thumbnails into {WORKFLOWS_DIR}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
