"""The driver against a hostile or broken server and bad local input (issue 16): secrets stay hidden, replies
and downloads are bounded, terminal escapes never act, malformed JSON is a protocol error, cycles and damaged
files are named, and nothing is submitted when the local side is wrong."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from fakes.batch_checks import batch_run, records, sweep_file
from fakes.comfy_server import FakeComfyServer, image_workflow
from fakes.runpod_api import FakeRunPod
from fakes.ui_workflows import classic

from cf_testing.cli import run_driver_cli as run_cli
from charforge.driver import cli
from charforge.driver.client import ComfyClient
from charforge.driver.secrets import mask, mask_body
from charforge.driver.terminal import safe_text

TOKEN = "tok-7d1e5c0a9b3f42e8a1c6"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHARFORGE_CONFIG", str(tmp_path / "none.yaml"))
    for name in (
        "CHARFORGE_SERVER",
        "CHARFORGE_PROFILE",
        "CHARFORGE_TOKEN",
        "CHARFORGE_MAX_DOWNLOAD_MB",
        "CHARFORGE_MAX_REPLY_MB",
        "RUNPOD_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)


def write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def leaked(secret: str, text: str) -> bool:
    """True when any 6 consecutive characters of ``secret`` appear in ``text`` (a cut-off prefix counts)."""
    return any(secret[i : i + 6] in text for i in range(len(secret) - 5))


def posted_prompt(server: FakeComfyServer) -> bool:
    return any(r.path.endswith("/prompt") and r.method == "POST" for r in server.requests)


# ---- 1. secrets ------------------------------------------------------------------------------------------------


def test_token_straddling_the_old_cut_of_a_500_body_is_masked(fake_comfy, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARFORGE_TOKEN", TOKEN)
    fake_comfy.knobs.require_headers = {"Authorization": f"Bearer {TOKEN}"}
    # The body echoes the token across character 300, where error bodies used to be cut before masking.
    fake_comfy.knobs.fail_body = "e" * 290 + TOKEN + " and more"
    fake_comfy.knobs.fault_paths = ("/prompt",)
    wf = write(tmp_path / "wf.json", image_workflow())
    for extra in ((), ("--json",)):
        fake_comfy.knobs.fail_next = 1
        code, out, err = run_cli(
            "run", str(wf), "--server", fake_comfy.url, "--out", str(tmp_path / "o"), *extra
        )
        assert code == 3, err
        assert "HTTP 500" in out + err
        assert not leaked(TOKEN, out + err), out + err


def test_runpod_api_error_echoing_the_key_is_masked(fake_comfy, monkeypatch):
    with FakeRunPod(default_upstream=fake_comfy) as runpod:
        for name, value in runpod.env().items():
            monkeypatch.setenv(name, value)
        key = runpod.api_key
        for body in ("x" * 290 + "{key} tail", '{"error": "bad key {key}"}'):
            runpod.knobs.fail_next, runpod.knobs.fail_body = 1, body
            for extra in ((), ("--json",)):
                runpod.knobs.fail_next = 1
                code, out, err = run_cli("runpod", "pods", *extra)
                assert code == 3, out + err
                assert "HTTP 400" in out + err and not leaked(key, out + err), out + err


def test_runpod_reply_over_the_limit_is_refused(fake_comfy, monkeypatch):
    monkeypatch.setenv("CHARFORGE_MAX_REPLY_MB", "1")
    with FakeRunPod(default_upstream=fake_comfy) as runpod:
        for name, value in runpod.env().items():
            monkeypatch.setenv(name, value)
        runpod.knobs.fail_next, runpod.knobs.fail_body = 1, "y" * (3 * 1024 * 1024)
        code, out, err = run_cli("runpod", "pods")
        assert code == 3 and "larger than 1 MiB" in err and "CHARFORGE_MAX_REPLY_MB" in err, err


def test_credentials_in_urls_are_never_shown(fake_comfy):
    code, out, err = run_cli("status", "--server", "http://me:pw-s3cr3t-value@127.0.0.1:9", "--json")
    assert code == 3 and not leaked("pw-s3cr3t-value", out + err), out + err
    code, _, err = run_cli("status", "--server", "http://me:pw-s3cr3t-value@[::1")
    assert code == 2 and "invalid server URL" in err and not leaked("pw-s3cr3t-value", err), err
    # unknown secrets in text from elsewhere: URL userinfo, bearer credentials, credential query parameters
    text = mask(
        "see https://bob:hunter2x@example.com/a?x=1&token=abcdef123 with Bearer zzzz.yyyy.xxxx.wwww "
        "and Authorization: Basic dXNlcjpwYXNz"
    )
    assert "hunter2x" not in text and "abcdef123" not in text and "zzzz" not in text and "bob:***@" in text
    assert "dXNlcjpwYXNz" not in text
    ordinary = "a basic pose, key=light, a bearer of gifts"  # prompt text: nothing looks like a credential
    assert mask(ordinary) == ordinary


def test_masking_happens_before_cutting():
    body = ("a" * 296 + TOKEN).encode()
    assert not leaked(TOKEN, mask_body(body, [TOKEN], limit=300))
    # past the decoded window a secret cut by the window must not leave its start behind either
    huge = (" " * 6000 + "b" * 290 + TOKEN + "c" * 10000).encode()
    assert not leaked(TOKEN, mask_body(huge, [TOKEN], limit=300))


def test_json_records_mask_secrets_that_json_would_escape():
    secret = 'pa"ss\\word-with-quote'
    buf = io.StringIO()
    out = cli.Output(True, stdout=buf, stderr=io.StringIO())
    out.secrets = [secret]
    out.record("error", message=f"refused {secret}", details={"echo": [secret]})
    text = buf.getvalue()
    assert not leaked(json.dumps(secret)[1:-1], text) and not leaked(secret, text), text
    assert json.loads(text)["details"] == {"echo": ["***"]}


# ---- 2. bounds ------------------------------------------------------------------------------------------------


def test_endless_view_stream_stops_at_the_download_cap_and_leaves_no_file(fake_comfy, tmp_path, monkeypatch):
    fake_comfy.knobs.view_mode = "infinite"
    wf = write(tmp_path / "wf.json", image_workflow())
    out_dir = tmp_path / "o"
    start = time.monotonic()
    code, _, err = run_cli(
        "run", str(wf), "--server", fake_comfy.url, "--out", str(out_dir), "--max-download-mb", "0.25"
    )
    assert code == 3 and time.monotonic() - start < 10, err
    assert "larger than 0.25 MiB" in err and "--max-download-mb" in err and "CHARFORGE_MAX_DOWNLOAD_MB" in err
    assert not [p for p in out_dir.rglob("*") if p.is_file()]
    assert fake_comfy.hostile_bytes_sent < 64 * 1024 * 1024
    # the same limit from the environment
    monkeypatch.setenv("CHARFORGE_MAX_DOWNLOAD_MB", "0.1")
    code, _, err = run_cli("run", str(wf), "--server", fake_comfy.url, "--out", str(out_dir))
    assert code == 3 and "larger than 0.1 MiB" in err, err
    assert not [p for p in out_dir.rglob("*") if p.is_file()]


def test_trickling_view_is_bounded_by_the_job_timeout(fake_comfy, tmp_path):
    fake_comfy.knobs.view_mode = "trickle"
    fake_comfy.knobs.trickle_seconds = 0.2  # one byte every 0.2 s: each read is quick, the whole is endless
    wf = write(tmp_path / "wf.json", image_workflow())
    out_dir = tmp_path / "o"
    start = time.monotonic()
    code, _, err = run_cli(
        "run", str(wf), "--server", fake_comfy.url, "--out", str(out_dir), "--timeout", "2"
    )
    assert code == 124, err
    assert time.monotonic() - start < 6
    assert "downloading the outputs" in err
    assert not [p for p in out_dir.rglob("*") if p.is_file()]


def test_batch_downloads_are_bounded_by_the_job_timeout_and_the_size_limit(fake_comfy, tmp_path, monkeypatch):
    spec = sweep_file(tmp_path, [1])
    fake_comfy.knobs.view_mode = "trickle"
    fake_comfy.knobs.trickle_seconds = 0.2
    start = time.monotonic()
    code, _, err = batch_run(spec, tmp_path / "a", fake_comfy.url, "--timeout", "2", "--backoff", "0.05")
    assert code == 1 and time.monotonic() - start < 10, err
    ends = [r for r in records(tmp_path / "a") if r["ev"] == "timed_out"]
    assert len(ends) == 1 and "downloading its outputs did not finish within 2 s" in ends[0]["reason"]
    assert not [p for p in (tmp_path / "a").rglob("*.png")]
    # over the size limit: failed at once with the reason, never retried (the same request gets the same answer)
    fake_comfy.knobs.view_mode = "infinite"
    monkeypatch.setenv("CHARFORGE_MAX_DOWNLOAD_MB", "0.1")
    code, _, err = batch_run(spec, tmp_path / "b", fake_comfy.url, "--backoff", "0.05")
    assert code == 1, err
    journal = records(tmp_path / "b")
    failed = [r for r in journal if r["ev"] == "failed"]
    assert len(failed) == 1 and "larger than 0.1 MiB" in failed[0]["reason"]
    assert not [r for r in journal if r["ev"] == "retry"]


def test_huge_history_reply_is_refused_without_reading_it_all(fake_comfy, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARFORGE_MAX_REPLY_MB", "1")
    fake_comfy.knobs.huge_history_bytes = 1536 * 1024 * 1024  # 1.5 GB, streamed by the fake
    wf = write(tmp_path / "wf.json", image_workflow())
    start = time.monotonic()
    code, _, err = run_cli(
        "run", str(wf), "--server", fake_comfy.url, "--out", str(tmp_path / "o"), "--timeout", "60"
    )
    assert code == 3 and time.monotonic() - start < 15, err
    assert "larger than 1 MiB" in err and "CHARFORGE_MAX_REPLY_MB" in err
    assert fake_comfy.hostile_bytes_sent < 100 * 1024 * 1024


def test_oversize_websocket_message_is_dropped_and_the_job_still_finishes(fake_comfy, monkeypatch):
    from charforge.driver.client import websocket

    fake_comfy.knobs.oversize_ws_bytes = 1024 * 1024
    fake_comfy.knobs.start_delay = 2.0  # the job outlasts the drop, so the socket reconnects while it runs
    # Every event the socket broadcasts, also those sent before the job was submitted (and so before it had a
    # listener): the fake sends the oversize message as soon as the socket connects.
    broadcast = []
    original = websocket.EventSocket._broadcast

    def record(self, event):
        broadcast.append(event)
        return original(self, event)

    monkeypatch.setattr(websocket.EventSocket, "_broadcast", record)
    with ComfyClient(fake_comfy.url, poll_interval=0.5, max_reply_bytes=64 * 1024) as client:
        result = client.run(image_workflow(), timeout=30)
    assert result.files
    reasons = [e.data.get("reason", "") for e in broadcast if e.type == "connection_lost"]
    assert any("WebSocket message larger than 0.0625 MiB" in r for r in reasons), (reasons, broadcast)
    assert any(e.type == "reconnected" for e in broadcast)


# ---- 3. terminal escapes ----------------------------------------------------------------------------------------

EVIL = "\x1b]0;pwned\x07\x1b[2J\x1b[1K\r\x9b31m"


@pytest.mark.parametrize("mode", ["plain", "json"])
def test_control_sequences_from_the_server_and_the_file_are_neutralised(fake_comfy, tmp_path, mode):
    wf = image_workflow()
    wf["2"]["_meta"]["title"] = f"Resize{EVIL}"
    path = write(tmp_path / "wf.json", wf)
    fake_comfy.knobs.fail_node = "ImageScale"
    fake_comfy.knobs.fail_message = f"boom {EVIL} end"
    extra = ("--json",) if mode == "json" else ("--progress", "plain")
    code, out, err = run_cli("run", str(path), "--server", fake_comfy.url, *extra)
    assert code == 1, err
    for ch in ("\x1b", "\x07", "\r", "\x9b"):
        assert ch not in out + err
    if mode == "plain":
        assert "boom \\x1b]0;pwned\\x07\\x1b[2J" in err
    else:
        record = json.loads(out.splitlines()[-1])
        assert record["exception_message"] == f"boom {EVIL} end"  # the data is intact, only escaped


def test_rich_progress_shows_server_text_literally():
    from rich.console import Console

    from charforge.driver.events import Event
    from charforge.driver.progress import JobView, RichRenderer

    evil = EVIL + "[bold red]markup[/]"
    buf = io.StringIO()
    view = JobView({"1": {"class_type": f"K{evil}", "_meta": {"title": f"T{evil}"}}}, ["1"])
    renderer = RichRenderer(view, Console(file=buf, force_terminal=False, color_system=None, width=300))
    renderer.start()
    for event in (
        Event("executing", {"node": "1"}, "p"),
        Event("execution_error", {"node_id": "1"}, "p"),
        Event("connection_lost", {"reason": f"why{evil}"}, "p"),
    ):
        renderer.handle(event)
    renderer.close()
    text = buf.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
    assert "[bold red]markup[/]" in text  # server text is never taken as rich markup


def test_safe_text_keeps_newlines_and_tabs_unless_one_line():
    assert safe_text("a\tb\nc\x1b[2J") == "a\tb\nc\\x1b[2J"
    assert safe_text("a\nb", one_line=True) == "a\\x0ab"


# ---- 4. malformed JSON ----------------------------------------------------------------------------------------


def _entry(value):
    return lambda request: {request.path.rsplit("/", 1)[1]: value}


@pytest.mark.parametrize(
    "path,reply",
    [
        ("/history/", _entry({"status": "success", "outputs": {}})),
        ("/history/", _entry(["not", "an", "entry"])),
        ("/history/", _entry({"status": {"messages": "oops"}})),
        ("/history/", ["a", "list"]),
        ("/queue", {"queue_running": [5], "queue_pending": []}),
        ("/queue", {"queue_running": [], "queue_pending": "busy"}),
        ("/queue", "busy"),
    ],
)
def test_malformed_json_is_a_protocol_error(fake_comfy, path, reply):
    fake_comfy.knobs.replies = {path: reply}
    code, out, err = run_cli("status", "some-prompt-id", "--server", fake_comfy.url)
    assert code == 3, out + err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "ComfyUI server" in err


@pytest.mark.parametrize("command", ["status", "validate"])
def test_non_object_replies_are_protocol_errors(fake_comfy, tmp_path, command):
    fake_comfy.knobs.replies = {"/system_stats": [1, 2], "/object_info": "nope"}
    args = [str(write(tmp_path / "wf.json", image_workflow()))] if command == "validate" else []
    code, _, err = run_cli(command, *args, "--server", fake_comfy.url)
    assert code == 3 and len(err.strip().splitlines()) == 1 and "answered a " in err, err


def test_malformed_history_while_following_a_job_ends_it(fake_comfy, tmp_path):
    fake_comfy.knobs.replies = {"/history/": _entry({"status": "error"})}
    wf = write(tmp_path / "wf.json", image_workflow())
    start = time.monotonic()
    code, _, err = run_cli(
        "run", str(wf), "--server", fake_comfy.url, "--timeout", "30", "--progress", "plain"
    )
    assert code == 3 and time.monotonic() - start < 10, err
    assert "history entry" in err and "'status' is a string" in err


# ---- 5. cycles ------------------------------------------------------------------------------------------------


def test_validate_names_the_nodes_of_a_cycle(fake_comfy, tmp_path):
    wf = image_workflow()
    wf["1"] = {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["2", 0],
            "upscale_method": "nearest-exact",
            "width": 8,
            "height": 8,
            "crop": "disabled",
        },
    }
    path = write(tmp_path / "wf.json", wf)
    code, _, err = run_cli("validate", str(path), "--server", fake_comfy.url)
    assert code == 2, err
    assert "dependency cycle: 1 (ImageScale) -> 2 (ImageScale) -> 1 (ImageScale)" in err
    code, _, err = run_cli("run", str(path), "--server", fake_comfy.url, "--out", str(tmp_path / "o"))
    assert code == 2 and "dependency cycle" in err and not posted_prompt(fake_comfy)


# ---- 6. bad local input ----------------------------------------------------------------------------------------


def test_invalid_server_url_is_a_usage_error(tmp_path):
    wf = write(tmp_path / "wf.json", image_workflow())
    code, _, err = run_cli("run", str(wf), "--server", "http://[::1")
    assert code == 2 and err.startswith("error: invalid server URL 'http://[::1'") and "Traceback" not in err


def test_out_below_a_file_is_refused_before_submitting(fake_comfy, tmp_path):
    wf = write(tmp_path / "wf.json", image_workflow())
    (tmp_path / "somefile.txt").write_text("x")
    code, _, err = run_cli(
        "run", str(wf), "--server", fake_comfy.url, "--out", str(tmp_path / "somefile.txt" / "x")
    )
    assert code == 2 and "is a file, not a folder" in err, err
    assert not posted_prompt(fake_comfy)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("widgets_values", 512, "'widgets_values' is int, expected a list"),
        ("widgets_values", "512", "'widgets_values' is a string, expected a list"),
        ("inputs", {"clip": 3}, "'inputs' is an object, expected a list"),
        ("inputs", 7, "'inputs' is int, expected a list"),
        ("mode", "muted", "'mode' is a string, expected a number"),
    ],
)
def test_damaged_editor_node_is_a_conversion_error_naming_it(fake_comfy, tmp_path, field, value, expected):
    ui = classic()
    node = next(n for n in ui["nodes"] if n["type"] == "EmptyLatentImage")
    node[field] = value
    path = write(tmp_path / "ui.json", ui)
    code, _, err = run_cli("run", str(path), "--server", fake_comfy.url, "--out", str(tmp_path / "o"))
    assert code == 2, err
    assert f"node {node['id']} (EmptyLatentImage): {expected}" in err and "Traceback" not in err
    assert not posted_prompt(fake_comfy)


@pytest.mark.parametrize(
    "links,expected",
    [
        ({"1": [1, 4, 0, 6, 0, "MODEL"]}, "'links' is dict, expected a list"),
        (
            [[1, 4, "first", 6, 0, "MODEL"]],
            "link [1, 4, 'first', 6, 0, 'MODEL'] of the workflow is malformed",
        ),
        ([[[1], 4, 0, 6, 0, "MODEL"]], "link [[1], 4, 0, 6, 0, 'MODEL'] of the workflow is malformed"),
    ],
)
def test_damaged_links_are_a_conversion_error(fake_comfy, tmp_path, links, expected):
    ui = classic()
    ui["links"] = links
    code, _, err = run_cli("run", str(write(tmp_path / "ui.json", ui)), "--server", fake_comfy.url)
    assert code == 2 and expected in err and "Traceback" not in err, err
    assert not posted_prompt(fake_comfy)
