"""Opt-in: the CharForge sidebar tab in the real ComfyUI editor (headless Chromium through Playwright).

Runs when COMFYUI_DIR points at a ComfyUI with its frontend package, a Chromium is at ``$CHROMIUM`` or
``/usr/bin/chromium`` and Python Playwright is importable (no `playwright install`). Starts its own ComfyUI
(``--cpu``, loopback port, throwaway base directory) with the pack linked by install.py, a tiny SD1.5 in
``models/diffusers``, a kohya dataset in ``input/``, a dataset report made by the dataset nodes and one
character preset. Then, as a user in the editor: the tab appears; the shipped ``train_lora_sd15`` workflow,
pointed at the tiny model, is queued and its run shows up with a loss curve that grows while it trains;
Cancel in the panel stops it; Resume continues it to the end; the finished run's samples show and its LoRA goes
into the graph as a Load LoRA node; a dataset's report opens; a character card inserts a Load Character node
that runs; a checkpoint's recorded scores show beside its samples; the Dataset Report node's contact sheet opens
full size from the node's menu. Last, with the panel's scripts blocked the editor and the nodes still load.

A screenshot of each state goes to ``$CHARFORGE_PANEL_SCREENSHOTS`` (default: the test's temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cf_testing.models import build_tiny_sd15
from cf_testing.photos import write_training_folder
from cf_testing.real_comfyui import (
    CHROMIUM,
    browser_skip_reason,
    comfyui_dir,
    comfyui_python,
    install_pack,
    pack_import_failures,
    start_comfyui,
)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STEPS = 100  # a cancel pressed near step 20 must land before the end on an idle CPU too (~0.2 s a step)
SAMPLE_EVERY = 10


pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(browser_skip_reason() is not None, reason=str(browser_skip_reason())),
]

READY_JS = """() => !!(window.app && window.app.graph && window.app.canvas && window.app.vueAppReady
    && Object.keys(window.LiteGraph.registered_node_types).length > 0)"""
CLOSE_TOASTS_JS = (
    """() => document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach((b) => b.click())"""
)

# The shipped workflow, as the template browser opens it, pointed at the tiny model and dataset, then queued.
QUEUE_WORKFLOW_JS = """async ({settings}) => {
    const response = await fetch('api/workflow_templates/charforge/train_lora_sd15.json');
    await window.app.loadGraphData(await response.json(), true, true, 'train_lora_sd15');
    const node = window.app.graph.nodes.find((n) => n.type === 'CharForgeTrainLoRA');
    for (const [name, value] of Object.entries(settings)) {
        const widget = node.widgets.find((w) => w.name === name);
        if (!widget) throw new Error(`no widget ${name}`);
        widget.value = value;
    }
    await window.app.queuePrompt(0, 1);
    return node.widgets.map((w) => [w.name, w.value]);
}"""

CHART_POINTS_JS = """(run) => {
    const canvas = document.querySelector(`canvas[data-cf-chart="${run}"]`);
    return canvas ? Number(canvas.dataset.points) : -1;
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy = comfyui_dir()
    root = tmp_path_factory.mktemp("panel")
    base = root / "base"
    install_pack(comfy, base, capture_output=True)
    tiny = build_tiny_sd15(root / "tiny")
    shutil.copytree(tiny.diffusers_dir, base / "models" / "diffusers" / "tiny_sd15")
    rng = np.random.default_rng(0)
    write_training_folder(base / "input" / "img" / "3_sks person", rng)
    photos = base / "input" / "photos"
    photos.mkdir(parents=True)
    for index in range(4):
        Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(photos / f"photo_{index}.png")
    (photos / "photo_4.png").write_bytes(b"not an image")  # a rejection reason for the report to show
    characters = base / "models" / "charforge" / "characters"
    characters.mkdir(parents=True)
    (characters / "alice.yaml").write_text(
        "name: alice\ndisplay_name: Alice\ntrigger_words: [sks]\nloras:\n  - {name: alice.safetensors, weight: 0.8}\n"
        "prompt: photo of a woman, natural light\nthreshold: 0.35\nbase_model: sd15\n"
        "generation: {steps: 20, cfg: 6.5, width: 512, height: 512}\n"
    )
    running = start_comfyui(comfy, base, comfyui_python(comfy))
    try:
        assert not pack_import_failures(running.log(), "charforge"), running.log()[-3000:]
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(
        os.environ.get("CHARFORGE_PANEL_SCREENSHOTS") or tmp_path_factory.mktemp("panel_screenshots")
    )
    folder.mkdir(parents=True, exist_ok=True)
    print(f"panel screenshots: {folder}")
    return folder


def _make_dataset_report(server) -> list[dict]:
    """The dataset nodes write a dataset with its report (as the dataset_prep workflow does); returns the
    contact sheets the Dataset Report node shows (ComfyUI's image entries)."""
    prompt = {
        "1": {
            "class_type": "CharForgeLoadDataset",
            "inputs": {
                "folder": str(server.base_dir / "input" / "photos"),
                "name": "alice_photos",
                "recursive": False,
                "read_captions": True,
                "workers": 1,
            },
        },
        "2": {
            "class_type": "CharForgeDatasetReport",
            "inputs": {
                "dataset": ["1", 0],
                "trigger": "sks",
                "thumbnail_size": 64,
                "per_sheet": 48,
                "workers": 1,
            },
        },
    }
    prompt_id = str(uuid.uuid4())
    server.post("/prompt", {"prompt": prompt, "prompt_id": prompt_id})
    entry = server.wait_history(prompt_id, timeout=180)
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry["outputs"]["2"]["images"]


# A Dataset Report node in the graph showing the contact sheets it made (as after its run), then its context menu
# entry "View full size" (web/full_size.js) pressed: the dialog's image is the sheet at its own resolution.
FULL_SIZE_JS = """async ({images}) => {
    const node = window.LiteGraph.createNode('CharForgeDatasetReport');
    window.app.graph.add(node);
    node.images = images;
    const options = [];
    node.getExtraMenuOptions(window.app.canvas, options);
    const entry = options.find((o) => o && o.content === 'View full size');
    if (!entry) return {entries: options.filter(Boolean).map((o) => o.content)};
    entry.callback();
    const img = document.querySelector('.cf-dialog img.cf-full');
    await new Promise((resolve) => (img.complete ? resolve() : img.addEventListener('load', resolve)));
    const result = {src: img.src, width: img.naturalWidth, height: img.naturalHeight, shown: img.clientWidth};
    window.app.graph.remove(node);
    return result;
}"""


@pytest.fixture
def page(server):
    from playwright.sync_api import sync_playwright

    origin = server.url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 900})
            # Only the ComfyUI server: the editor's calls elsewhere (release notes, registry) would just wait.
            context.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(origin) or not route.request.url.startswith("http")
                    else route.abort("blockedbyclient")
                ),
            )
            page = context.new_page()
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(f"{error}\n{error.stack}"))
            page.on(
                "console",
                lambda m: page.errors.append(m.text) if m.type == "error" and "CharForge" in m.text else None,
            )
            _open_editor(page, origin)
            # The frontend itself throws once while it applies its settings at start; what happens from here on
            # (the panel, its requests, the nodes it inserts) must raise nothing.
            page.errors.clear()
            yield page
        finally:
            browser.close()


def _open_editor(page, url: str) -> None:
    page.goto(url + "/", timeout=120_000)
    page.wait_for_function(READY_JS, timeout=120_000, polling=200)
    page.wait_for_timeout(1500)  # startup toasts and messages settle
    page.keyboard.press("Escape")  # the first-run "Get started with a template" dialog
    page.evaluate(CLOSE_TOASTS_JS)


def _widen_sidebar(page, width: int) -> None:
    """Drag the splitter between the sidebar and the canvas, as a user does for a roomier panel."""
    box = page.locator(".charforge-panel").bounding_box()
    gutter = page.locator(".p-splitter-gutter").first.bounding_box()
    if box is None or gutter is None:
        return
    y = gutter["y"] + gutter["height"] / 2
    page.mouse.move(gutter["x"] + gutter["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + width, y, steps=8)
    page.mouse.up()


def _shot(page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"))


def _run(server, name: str) -> dict:
    return next(r for r in server.get("/charforge/runs")["runs"] if r["name"] == name)


def _wait(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"waited {timeout}s for {what}")


@pytest.mark.timeout(1800)  # a tiny run still takes minutes on a busy CPU
def test_the_panel_in_the_editor(server, page, shots):
    sheets = _make_dataset_report(server)

    # The tab appears and opens.
    tab = page.locator(".charforge-tab-button")
    tab.wait_for(timeout=30_000)
    tab.click()
    page.locator(".charforge-panel").wait_for(timeout=10_000)
    _widen_sidebar(page, 460)
    page.get_by_text("No training runs yet").wait_for(timeout=10_000)
    _shot(page, shots, "01_tab_opened")

    # A tiny training run queued from the shipped workflow shows up; its loss curve grows while it trains.
    overrides = {
        "sample_steps": 2,
        "mixed_precision": "no",
        "bucket_step": 32,
        "min_bucket": 32,
        "sample_every": SAMPLE_EVERY,
        "checkpoint_every": SAMPLE_EVERY,
    }
    page.evaluate(
        QUEUE_WORKFLOW_JS,
        {
            "settings": {
                "base_model": "[diffusers] tiny_sd15",
                "dataset_folder": "img",
                "trigger_word": "sks",
                "output_name": "alice",
                "preset": "fast",
                "steps": STEPS,
                "learning_rate": 1e-4,
                "rank": 4,
                "resolution": 64,
                "seed": 0,
                "resume": "auto",
                "memory_profile": "off",
                "overrides": json.dumps(overrides),
            }
        },
    )
    run_card = page.locator('.cf-run[data-run="alice"]')
    run_card.wait_for(timeout=120_000)
    first = _wait(lambda: (n := page.evaluate(CHART_POINTS_JS, "alice")) >= 5 and n, 180, "the first steps")
    second = _wait(lambda: (n := page.evaluate(CHART_POINTS_JS, "alice")) > first and n, 60, "more steps")
    print(f"loss curve: {first} points, then {second}")
    page.locator('.cf-run[data-run="alice"] .cf-state-running').wait_for(timeout=5000)
    _shot(page, shots, "02_training_loss_curve_grows")

    # Cancel in the panel stops it promptly; it is resumable.
    seen = page.evaluate("() => document.querySelector('canvas[data-cf-chart=\"alice\"]').dataset.lastStep")
    page.locator('[data-action="cancel"]').click()
    page.locator('.cf-run[data-run="alice"] .cf-state-cancelled').wait_for(timeout=60_000)
    run = _run(server, "alice")
    stopped_at = run["step"]
    assert run["state"] == "cancelled" and run["resumable"] and stopped_at < STEPS, run
    print(f"cancel pressed with step {seen} on the chart; the run stopped at step {stopped_at}")
    _shot(page, shots, "03_cancelled")

    # Resume queues it again: it continues from where it stopped and finishes, with its samples.
    page.locator('[data-action="resume"]').click()
    # The few steps left can finish between two polls of the panel on an idle machine: running or
    # already completed both show the resume was taken; the history below proves where it resumed.
    page.locator(
        '.cf-run[data-run="alice"] .cf-state-running, .cf-run[data-run="alice"] .cf-state-completed'
    ).first.wait_for(timeout=60_000)
    _wait(lambda: page.evaluate(CHART_POINTS_JS, "alice") > stopped_at, 120, "steps after the resume")
    _shot(page, shots, "04_resumed")
    page.locator('.cf-run[data-run="alice"] .cf-state-completed').wait_for(timeout=600_000)

    def summaries() -> list[
        str
    ]:  # Train LoRA's summary of each finished prompt (the run folder is done first)
        return [
            out["text"][0]
            for entry in server.get("/history").values()
            for out in entry.get("outputs", {}).values()
            if "alice.safetensors" in (out.get("text") or [""])[0]
        ]

    texts = _wait(summaries, 60, "the resumed prompt in the history")
    assert any(f"resumed at step {stopped_at}" in text and f"{STEPS} steps" in text for text in texts), texts
    page.locator(".cf-sample").first.wait_for(timeout=30_000)
    page.wait_for_timeout(1000)
    samples = page.evaluate("""() => [...document.querySelectorAll('.cf-sample-row')].map((row) => [
        Number(row.dataset.step), [...row.querySelectorAll('img')].map((i) => i.complete && i.naturalWidth)])""")
    steps_with_samples = sorted(step for step, _ in samples)
    assert steps_with_samples == list(range(SAMPLE_EVERY, STEPS + 1, SAMPLE_EVERY)), samples
    assert all(all(width and width > 0 for width in widths) for _, widths in samples), samples
    assert page.evaluate(CHART_POINTS_JS, "alice") == STEPS
    _shot(page, shots, "05_completed_with_samples")

    # Scores Pick Checkpoint recorded in the run folder (engine/score/sets.py: what the node writes) show beside
    # each checkpoint's samples, the best marked.
    from charforge.engine.score import SetSummary
    from charforge.engine.score.sets import record_run_scores

    scored = [
        SetSummary(f"{step:06d}", 2, 2, 0.3 + step / 100, 0.3, 1.0, None, None, 0.3 + step / 100)
        for step in (SAMPLE_EVERY, 2 * SAMPLE_EVERY)
    ]
    run_dir = server.base_dir / "output" / "charforge" / "train_runs" / "alice"
    record_run_scores(run_dir, scored, {"identity": "alice", "clip_model": None})
    page.locator('.cf-run[data-run="alice"]').click()  # a click reads the run again
    best = page.locator(f'.cf-score.cf-best[data-score-step="{2 * SAMPLE_EVERY}"]')
    best.wait_for(timeout=15_000)
    assert "best" in best.inner_text() and "2/2 faces" in best.inner_text()
    assert page.locator(".cf-score").count() == 2
    _shot(page, shots, "05b_checkpoint_scores")

    # The node drew the curve too, and it stays out of the saved workflow and the prompt.
    on_node = page.evaluate("""async () => {
        const node = window.app.graph.nodes.find((n) => n.type === 'CharForgeTrainLoRA');
        const widget = node.widgets.find((w) => w.name === 'charforge_live_loss');
        const {output} = await window.app.graphToPrompt();
        return {points: widget ? Number(widget.element.dataset.points) : 0,
                saved: node.serialize().widgets_values.length, widgets: node.widgets.length,
                names: node.widgets.map((w) => w.name),
                inputs: Object.keys(output[String(node.id)].inputs)};
    }""")
    assert (
        # every widget is saved but the live curve and the editor's own image preview (the node's inputs grow
        # with new bases, so the count is read from the node)
        on_node["points"] > 0
        and on_node["saved"]
        == on_node["widgets"]
        - sum(n in on_node["names"] for n in ("charforge_live_loss", "$$canvas-image-preview"))
        and "charforge_live_loss" in on_node["names"]
        and "charforge_live_loss" not in on_node["inputs"]
    ), on_node

    # Its LoRA goes into the graph as a Load LoRA node.
    page.locator('[data-action="insert-lora"]').click()
    lora = page.evaluate("""() => window.app.graph.nodes.filter((n) => n.type === 'LoraLoader')
        .map((n) => n.widgets.find((w) => w.name === 'lora_name').value)""")
    assert lora == ["alice.safetensors"]

    # A dataset's report opens.
    page.locator('.cf-tab[data-view="datasets"]').click()
    card = page.locator('.cf-card[data-dataset="alice_photos"]')
    card.wait_for(timeout=10_000)
    assert "4 accepted · 1 rejected · 5 in all" in card.inner_text()
    page.wait_for_function(
        "() => [...document.querySelectorAll('.cf-sheet')].every((i) => i.naturalWidth > 0)", timeout=10_000
    )
    _shot(page, shots, "06_datasets")
    card.locator('[data-action="report"]').click()
    report = page.frame_locator("iframe.cf-report")
    report.get_by_text("Why photos were rejected").wait_for(timeout=10_000)
    page.wait_for_timeout(500)
    _shot(page, shots, "07_dataset_report")
    page.keyboard.press("Escape")
    assert page.locator(".cf-dialog").count() == 0

    # The Dataset Report node's contact sheet opens full size from the node's context menu.
    with Image.open(
        server.base_dir / sheets[0]["type"] / sheets[0]["subfolder"] / sheets[0]["filename"]
    ) as sheet:
        size = sheet.size
    full = page.evaluate(FULL_SIZE_JS, {"images": sheets})
    assert (full.get("width"), full.get("height")) == size and "/view?" in full["src"], full
    _shot(page, shots, "07b_contact_sheet_full_size")
    page.keyboard.press("Escape")
    assert page.locator(".cf-dialog").count() == 0

    # A character card inserts a Load Character node, and that node runs.
    page.locator('.cf-tab[data-view="characters"]').click()
    character = page.locator('.cf-card[data-character="alice"]')
    character.wait_for(timeout=10_000)
    assert "sks" in character.inner_text() and "alice.safetensors · model 0.8" in character.inner_text()
    character.locator('[data-action="insert-character"]').click()
    node = page.evaluate("""async () => {
        const node = window.app.graph.nodes.find((n) => n.type === 'CharForgeLoadCharacter');
        const {output} = await window.app.graphToPrompt();
        return {character: node.widgets.find((w) => w.name === 'character').value, api: output[String(node.id)]};
    }""")
    assert node["character"] == "alice" and node["api"]["class_type"] == "CharForgeLoadCharacter"
    page.wait_for_timeout(300)
    _shot(page, shots, "08_character_inserted")
    prompt_id = str(uuid.uuid4())
    server.post(
        "/prompt",
        {
            "prompt_id": prompt_id,
            "prompt": {"1": node["api"], "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}},
        },
    )
    entry = server.wait_history(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert "sks" in json.dumps(entry["outputs"]["2"])
    assert page.errors == [], page.errors


def test_the_editor_and_the_nodes_work_without_the_panel_scripts(server, shots):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            blocked = []
            # Playwright asks the route registered last first.
            page.route(
                "**/*",
                lambda route: (
                    route.continue_()
                    if route.request.url.startswith(server.url) or not route.request.url.startswith("http")
                    else route.abort("blockedbyclient")
                ),
            )
            page.route(
                "**/extensions/charforge/**", lambda route: blocked.append(route.request.url) or route.abort()
            )
            _open_editor(page, server.url)
            assert blocked, "the editor did not ask for the panel's scripts"
            assert page.locator(".charforge-tab-button").count() == 0
            assert page.evaluate("() => 'CharForgeTrainLoRA' in window.LiteGraph.registered_node_types")
            page.evaluate("""async () => {
                const response = await fetch('api/workflow_templates/charforge/train_lora_sd15.json');
                await window.app.loadGraphData(await response.json(), true, true, 'train_lora_sd15');
            }""")
            assert page.evaluate("() => window.app.graph.nodes.some((n) => n.type === 'CharForgeTrainLoRA')")
            _shot(page, shots, "09_without_panel_scripts")
        finally:
            browser.close()
