"""Reference editor-to-API conversions made by the real ComfyUI frontend, driven in headless Chromium.

For every editor-format (UI) template workflow this script loads the workflow into the ComfyUI editor that a
running server serves, asks the editor for the API-format prompt it would queue, and writes that prompt to
``OUT/<template>.api.json``. The outputs are the yardstick for CharForge's own converter
(``charforge.driver.workflow.convert``): the frontend is the reference implementation of the conversion.

Usage::

    python tests/integration/frontend_reference.py --server http://127.0.0.1:8400 --out /tmp/frontend-ref \
        [--templates DIR] [--name GLOB ...] [--limit N] [--timeout SECONDS]

Without ``--templates`` the templates come from the server itself (``/templates/index.json``, which ComfyUI
serves from the ``comfyui_workflow_templates`` package); with it, every ``*.json`` file in DIR that is an
editor workflow is used. Templates that need node types the server does not have (``/object_info``) and that
the frontend does not define itself (notes, reroutes, primitives, subgraphs) are skipped, as are templates
that fail to load or convert; ``OUT/summary.json`` lists every template with its outcome.

Needs: Python Playwright (``pip install playwright``; no ``playwright install`` - the browser is the system
Chromium, ``--chromium`` / ``$CHROMIUM`` / ``/usr/bin/chromium``). Conversion needs no models: the
"missing models" and "missing nodes" dialogs are turned off for each load.

Exit status: 0 when every template with installed nodes converted, 1 when some could not be read, loaded
or converted (or timed out), 2 when the run could not start (server or browser unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import importlib.util
import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Skip reasons (the keys of summary.json's "skipped_by_reason").
MISSING_NODES = "missing node types"
INVALID = "not readable"
LOAD_FAILED = "load failed"
CONVERT_FAILED = "conversion failed"
TIMEOUT = "timeout"

# Ready: the app object exists, its graph too, and the server's node definitions are registered.
READY_JS = """() => !!(window.app && window.app.graph && window.app.vueAppReady && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 0)"""

PAGE_INFO_JS = """() => ({
    registered: Object.keys(window.LiteGraph.registered_node_types),
    frontendVersion: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
})"""

# A probe extension: the editor runs its afterConfigureGraph hook only when a load got through configuring the
# graph. A graph that fails to configure is not thrown to the caller: the editor logs the error, shows it in a
# dialog and returns early, so this flag is how the script tells a finished load from an aborted one.
PROBE_JS = """() => {
    window.__referenceConfigured = false;
    window.app.registerExtension({
        name: 'charforge.frontendReference.probe',
        afterConfigureGraph() { window.__referenceConfigured = true; },
    });
}"""

# Load one workflow the way the editor opens a file, then serialise it the way "Queue" does. Messages the
# editor logs with console.error while loading are collected for the report.
CONVERT_JS = """async (workflow) => {
    const logged = [];
    const original = console.error;
    console.error = (...args) => {
        logged.push(args.map((a) => (a instanceof Error ? `${a.name}: ${a.message}` : String(a))).join(' '));
        original.apply(console, args);
    };
    window.__referenceConfigured = false;
    let loadError = null;
    try {
        await window.app.loadGraphData(workflow, true, false, null,
            { showMissingNodesDialog: false, showMissingModelsDialog: false });
    } catch (error) {
        loadError = String(error && error.stack ? error.stack : error);
    } finally {
        console.error = original;
    }
    const loadedNodes = window.app.graph.nodes.length;
    if (loadError === null && !window.__referenceConfigured) {
        loadError = 'the editor aborted the load: ' + (logged.join(' | ') || 'no message');
    }
    if (loadError !== null) return { stage: 'load', error: loadError, logged, loadedNodes };
    try {
        const { output } = await window.app.graphToPrompt();
        return { stage: 'done', output, logged, loadedNodes };
    } catch (error) {
        return { stage: 'convert', error: String(error && error.stack ? error.stack : error), logged,
                 loadedNodes };
    }
}"""


@dataclass
class Template:
    """One template workflow: its name, where it came from, and its parsed content (None if unreadable)."""

    name: str
    source: str
    workflow: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class Outcome:
    """What happened to one template."""

    name: str
    source: str  # the template's file or URL
    status: str  # "converted" or "skipped"
    reason: str | None = None
    detail: Any = None
    file: str | None = None
    nodes: int | None = None
    seconds: float | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value not in (None, [])}


def http_json(url: str, timeout: float = 60) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def is_editor_workflow(data: Any) -> bool:
    """True for the editor (UI) format: a dict with a ``nodes`` list (API prompts are keyed by node id)."""
    return isinstance(data, dict) and isinstance(data.get("nodes"), list)


def templates_from_dir(directory: Path) -> tuple[list[Template], list[str]]:
    """Every editor workflow in ``directory`` (sorted by name), and the JSON files that are not workflows."""
    templates, ignored = [], []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            templates.append(Template(path.stem, str(path), error=f"{type(error).__name__}: {error}"))
            continue
        if is_editor_workflow(data):
            templates.append(Template(path.stem, str(path), data))
        else:
            ignored.append(path.name)
    return templates, ignored


def templates_from_server(server: str) -> tuple[list[Template], list[str]]:
    """The templates the server's template browser offers (``/templates/index.json``), fetched from it."""
    index = http_json(f"{server}/templates/index.json")
    names = sorted({entry["name"] for category in index for entry in category.get("templates", [])})
    templates, ignored = [], []
    for name in names:
        url = f"{server}/templates/{urllib.parse.quote(name)}.json"
        try:
            data = http_json(url)
        except (OSError, ValueError) as error:
            templates.append(Template(name, url, error=f"{type(error).__name__}: {error}"))
            continue
        if is_editor_workflow(data):
            templates.append(Template(name, url, data))
        else:
            ignored.append(name)
    return templates, ignored


def node_types(workflow: dict[str, Any]) -> set[str]:
    """Node types a workflow uses, top level and inside subgraph definitions, minus the subgraph types."""
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    subgraph_ids = {subgraph.get("id") for subgraph in subgraphs}
    nodes = list(workflow.get("nodes") or [])
    for subgraph in subgraphs:
        nodes.extend(subgraph.get("nodes") or [])
    return {node.get("type") for node in nodes if node.get("type") not in subgraph_ids}


def output_name(name: str, taken: set[str]) -> str:
    """A file name for a template's output: whitespace becomes ``_``; clashes get a numeric suffix."""
    stem = re.sub(r"\s", "_", name) or "template"
    candidate, number = stem, 2
    while candidate in taken:
        candidate, number = f"{stem}-{number}", number + 1
    taken.add(candidate)
    return f"{candidate}.api.json"


class Editor:
    """The ComfyUI editor in a headless Chromium page, reopened after anything that may have wedged it."""

    def __init__(self, browser, server: str, ready_timeout: float) -> None:
        self.browser = browser
        self.server = server.rstrip("/")
        self.origin = urllib.parse.urlsplit(self.server)._replace(path="", query="", fragment="").geturl()
        self.ready_timeout = ready_timeout
        self.context = None
        self.page = None

    async def open(self) -> dict[str, Any]:
        """Open a fresh page on the server and wait until the app is ready; returns the page's node registry."""
        await self.close()
        self.context = await self.browser.new_context(viewport={"width": 1280, "height": 800})
        # Only the ComfyUI server is reachable: the editor's calls elsewhere (release notes, registry) would
        # only wait for a network that is not there.
        await self.context.route("**/*", self._only_server)
        self.page = await self.context.new_page()
        await self.page.goto(self.server + "/", timeout=self.ready_timeout * 1000)
        await self.page.wait_for_function(READY_JS, timeout=self.ready_timeout * 1000, polling=200)
        await self.page.evaluate(PROBE_JS)
        return await self.page.evaluate(PAGE_INFO_JS)

    async def _only_server(self, route) -> None:
        url = route.request.url
        if url.startswith(self.origin + "/") or url == self.origin or not url.startswith(("http:", "https:")):
            await route.continue_()
        else:
            await route.abort("blockedbyclient")

    async def convert(self, workflow: dict[str, Any], timeout: float) -> dict[str, Any]:
        return await asyncio.wait_for(self.page.evaluate(CONVERT_JS, workflow), timeout)

    async def close(self) -> None:
        if self.context is not None:
            with contextlib.suppress(Exception):  # a wedged page must not stop the run
                await self.context.close()
        self.context = self.page = None


async def convert_all(
    args: argparse.Namespace, templates: list[Template], object_info: dict[str, Any], out: Path
) -> tuple[list[Outcome], dict[str, Any]]:
    """Convert each template in the editor; returns the outcomes and facts about the page."""
    from playwright.async_api import async_playwright

    outcomes: list[Outcome] = []
    taken: set[str] = set()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True
        )
        editor = Editor(browser, args.server, args.ready_timeout)
        try:
            started = time.monotonic()
            info = await editor.open()
            page_facts = {
                "frontend_version": info["frontendVersion"],
                "page_ready_seconds": round(time.monotonic() - started, 2),
            }
            known = set(object_info) | set(info["registered"])
            page_facts["frontend_only_types"] = sorted(set(info["registered"]) - set(object_info))
            attempted = 0
            for template in templates:
                if template.workflow is None:
                    outcomes.append(
                        Outcome(template.name, template.source, "skipped", INVALID, template.error)
                    )
                    continue
                missing = sorted(t for t in node_types(template.workflow) if t not in known)
                if missing:
                    outcomes.append(
                        Outcome(template.name, template.source, "skipped", MISSING_NODES, missing)
                    )
                    continue
                if args.limit is not None and attempted >= args.limit:
                    continue  # counted as "not attempted"; skips above are still reported
                attempted += 1
                outcome = await convert_one(editor, template, args.timeout, out, taken)
                outcomes.append(outcome)
                print(
                    f"  {outcome.status:9} {template.name}"
                    + (f" ({outcome.reason})" if outcome.reason else ""),
                    flush=True,
                )
                if outcome.status != "converted":
                    # The page may be stuck or show an error dialog: start the next template from a clean one.
                    try:
                        await editor.open()
                    except Exception as error:  # noqa: BLE001 - keep what was converted so far
                        page_facts["aborted"] = f"the editor did not reopen: {type(error).__name__}: {error}"
                        break
        finally:
            await editor.close()
            await browser.close()
    return outcomes, page_facts


async def convert_one(
    editor: Editor, template: Template, timeout: float, out: Path, taken: set[str]
) -> Outcome:
    """Load one template in the editor, convert it, and write its API prompt when that worked."""
    started = time.monotonic()

    def skipped(reason: str, detail: Any, warnings: list[str] | None = None) -> Outcome:
        return Outcome(
            template.name,
            template.source,
            "skipped",
            reason,
            detail,
            seconds=round(time.monotonic() - started, 2),
            warnings=warnings or [],
        )

    try:
        result = await editor.convert(template.workflow, timeout)
    except TimeoutError:
        return skipped(TIMEOUT, f"no result within {timeout:g}s")
    except Exception as error:  # noqa: BLE001 - the page threw something; record it, go on
        return skipped(LOAD_FAILED, f"{type(error).__name__}: {error}"[:2000])
    logged = [line[:500] for line in result.get("logged", [])]
    if result["stage"] != "done":
        return skipped(
            LOAD_FAILED if result["stage"] == "load" else CONVERT_FAILED, result["error"][:2000], logged
        )
    expected_nodes = len(template.workflow["nodes"])
    if result["loadedNodes"] != expected_nodes:
        # The editor catches errors while configuring the graph, shows them in a dialog and stops loading.
        problem = f"editor holds {result['loadedNodes']} of the workflow's {expected_nodes} nodes"
        return skipped(LOAD_FAILED, {"problem": problem, "console_errors": logged})
    file_name = output_name(template.name, taken)
    (out / file_name).write_text(
        json.dumps(result["output"], indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return Outcome(
        template.name,
        template.source,
        "converted",
        file=file_name,
        nodes=len(result["output"]),
        seconds=round(time.monotonic() - started, 2),
        warnings=logged,
    )


def select(templates: list[Template], patterns: list[str] | None) -> list[Template]:
    if not patterns:
        return templates
    return [t for t in templates if any(fnmatch.fnmatchcase(t.name, pattern) for pattern in patterns)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--server", required=True, help="ComfyUI base URL, e.g. http://127.0.0.1:8400")
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for <template>.api.json and summary.json"
    )
    parser.add_argument(
        "--templates",
        type=Path,
        help="folder of editor-format template JSON files (default: the server's templates)",
    )
    parser.add_argument(
        "--name", action="append", metavar="GLOB", help="only templates whose name matches (repeatable)"
    )
    parser.add_argument("--limit", type=int, help="convert at most N templates (skipped ones do not count)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds per template (default 60)")
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=120,
        help="seconds to wait for the editor to start (default 120)",
    )
    parser.add_argument(
        "--chromium",
        default=os.environ.get("CHROMIUM", "/usr/bin/chromium"),
        help="Chromium executable (default $CHROMIUM or /usr/bin/chromium)",
    )
    args = parser.parse_args(argv)
    args.server = args.server.rstrip("/")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    if importlib.util.find_spec("playwright") is None:
        print(
            "error: Python Playwright is missing: pip install playwright (its browsers are not needed)",
            file=sys.stderr,
        )
        return 2
    try:
        object_info = http_json(f"{args.server}/object_info")
        system = http_json(f"{args.server}/system_stats").get("system", {})
        if args.templates:
            templates, ignored = templates_from_dir(args.templates)
        else:
            templates, ignored = templates_from_server(args.server)
    except (OSError, ValueError) as error:
        print(f"error: cannot read from {args.server}: {error}", file=sys.stderr)
        return 2
    templates = select(templates, args.name)
    args.out.mkdir(parents=True, exist_ok=True)
    # Kept with the outputs so converters can be compared offline against the same node definitions.
    (args.out / "object_info.json").write_text(json.dumps(object_info, indent=1) + "\n", encoding="utf-8")
    print(f"{len(templates)} templates from {args.templates or args.server + '/templates'}", flush=True)
    try:
        outcomes, page_facts = asyncio.run(convert_all(args, templates, object_info, args.out))
    except Exception as error:  # noqa: BLE001 - browser missing, page never ready: report and stop
        print(f"error: the editor did not start: {type(error).__name__}: {error}", file=sys.stderr)
        return 2

    if "aborted" in page_facts:
        print(f"error: {page_facts['aborted']}", file=sys.stderr)
    converted = [o for o in outcomes if o.status == "converted"]
    skipped = [o for o in outcomes if o.status == "skipped"]
    by_reason = Counter(o.reason for o in skipped)
    missing_types = Counter(t for o in skipped if o.reason == MISSING_NODES for t in o.detail)
    summary = {
        "server": args.server,
        "comfyui_version": system.get("comfyui_version"),
        "templates_version": system.get("installed_templates_version"),
        **page_facts,
        "templates_source": str(args.templates) if args.templates else f"{args.server}/templates",
        "found": len(templates),
        "converted": len(converted),
        "skipped": len(skipped),
        "not_attempted": len(templates) - len(outcomes),
        "skipped_by_reason": dict(by_reason),
        "missing_node_types": dict(missing_types),
        "ignored_files": ignored,
        "seconds": round(time.monotonic() - started, 1),
        "templates": [o.as_dict() for o in outcomes],
    }
    (args.out / "summary.json").write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(
        f"found {len(templates)}, converted {len(converted)}, skipped {len(skipped)}"
        + (f" ({', '.join(f'{reason}: {n}' for reason, n in by_reason.items())})" if skipped else "")
        + (f", not attempted {summary['not_attempted']}" if summary["not_attempted"] else "")
        + f", {summary['seconds']}s; summary: {args.out / 'summary.json'}"
    )
    if "aborted" in page_facts:
        return 2
    failed = [o for o in skipped if o.reason != MISSING_NODES]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
