"""Outputs: finding every file in the history, safe local names, no overwriting, the manifest."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fakes.comfy_server import webp_workflow

from charforge.driver.client import ComfyClient
from charforge.driver.config import BearerAuth
from charforge.driver.manifest import build_manifest, write_manifest
from charforge.driver.outputs import (
    OutputFile,
    collect_files,
    collect_values,
    local_path_for,
    safe_name,
    safe_subfolder,
)


def test_collect_files_finds_every_kind():
    outputs = {
        "9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]},
        "12": {"images": [{"filename": "v.webp", "subfolder": "anim", "type": "output"}], "animated": [True]},
        "13": {
            "gifs": [{"filename": "c.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4"}]
        },
        "14": {"audio": [{"filename": "s.flac", "subfolder": "audio", "type": "output"}]},
        "15": {"video": [{"filename": "m.mp4", "subfolder": "video", "type": "output"}], "text": ["hello"]},
        "16": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}]},
        "17": {"text": ["caption one", "caption two"], "score": [0.91]},
        "18": None,
    }
    files = collect_files(outputs)
    assert [(f.node_id, f.key, f.filename, f.animated) for f in files] == [
        ("9", "images", "a.png", False),
        ("12", "images", "v.webp", True),
        ("13", "gifs", "c.mp4", True),
        ("14", "audio", "s.flac", False),
        ("15", "video", "m.mp4", True),
        ("16", "images", "p.png", False),
    ]
    assert files[2].format == "video/h264-mp4" and files[5].type == "temp"
    values = {v.node_id: v.values for v in collect_values(outputs)}
    assert values == {
        "15": {"text": ["hello"]},
        "17": {"text": ["caption one", "caption two"], "score": [0.91]},
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../x.png", "x.png"),
        ("/etc/passwd", "passwd"),
        ("..", "output"),
        (".hidden", "_hidden"),
        ("C:\\Windows\\evil.png", "evil.png"),
        ("a\x00b?.png", "a_b_.png"),
        ("", "output"),
        ("ok_00001_.png", "ok_00001_.png"),
    ],
)
def test_safe_name(name, expected):
    assert safe_name(name) == expected


def test_safe_subfolder_drops_escapes():
    assert safe_subfolder("../../etc/./cron.d") == ["etc", "cron.d"]
    assert safe_subfolder("/abs/path") == ["abs", "path"]
    assert safe_subfolder("C:\\x\\..\\y") == ["x", "y"]
    assert safe_subfolder("") == []


def test_local_path_never_leaves_the_output_dir(tmp_path):
    out = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    os.symlink(elsewhere, out / "link")
    for file in [
        OutputFile("1", "images", 0, "../../a.png", "../.."),
        OutputFile("1", "images", 0, "b.png", "/etc/cron.d"),
        OutputFile("1", "images", 0, "c.png", "link"),
        OutputFile("1", "images", 0, "d.png", "", type="../temp"),
    ]:
        path = local_path_for(out, file)
        assert path.resolve().is_relative_to(out.resolve()), path
        assert not path.resolve().is_relative_to(elsewhere.resolve())


def _everything_workflow() -> dict:
    wf = webp_workflow(frames=4)
    wf["3"] = {
        "class_type": "CF_SaveGif",
        "inputs": {"images": ["1", 0], "filename_prefix": "gif/CF"},
        "_meta": {"title": "GIF"},
    }
    wf["4"] = {
        "class_type": "CF_SaveAudio",
        "inputs": {"filename_prefix": "audio/CF"},
        "_meta": {"title": "Audio"},
    }
    wf["5"] = {
        "class_type": "CF_ShowText",
        "inputs": {"text": "a caption", "number": 1.5},
        "_meta": {"title": "Cap"},
    }
    wf["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}, "_meta": {"title": "Peek"}}
    return wf


def test_download_everything_and_write_manifest(client, fake_comfy, tmp_path):
    result = client.run(_everything_workflow(), timeout=10)
    out = tmp_path / "out"
    downloads = client.download_outputs(result, out)
    rel = sorted(d.path.relative_to(out).as_posix() for d in downloads)
    assert rel[:3] == ["anim/clip_00001_.webp", "audio/CF_00001_.wav", "gif/CF_00001_.gif"]
    assert len(rel) == 7 and all(r.startswith("temp/ComfyUI_temp_") for r in rel[3:])  # 4 preview frames
    webp = next(d for d in downloads if d.source.key == "images" and d.source.type == "output")
    assert webp.source.animated and webp.class_type == "SaveAnimatedWEBP" and webp.title == "Save WEBP"
    data = webp.path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP" and b"ANIM" in data
    assert data == (fake_comfy.output_dir / "anim" / "clip_00001_.webp").read_bytes()
    gif = next(d for d in downloads if d.source.key == "gifs")
    assert gif.path.read_bytes().startswith(b"GIF89a")

    manifest = build_manifest(result, downloads, out_dir=out, server=client.url, workflow_source="wf.json")
    path = write_manifest(out, manifest)
    loaded = json.loads(path.read_text())
    assert loaded["prompt_id"] == result.prompt_id
    by_path = {f["path"]: f for f in loaded["files"]}
    assert by_path["anim/clip_00001_.webp"]["node_id"] == "2"
    assert by_path["anim/clip_00001_.webp"]["animated"] is True
    assert by_path["gif/CF_00001_.gif"]["output"] == "gifs"
    assert loaded["values"]["5"]["text"] == ["a caption"] and loaded["values"]["5"]["number"] == [1.5]
    assert loaded["values"]["5"]["title"] == "Cap"
    assert loaded["timings"]["started_at"] and loaded["timings"]["execution_seconds"] is not None


def test_download_never_overwrites(client, tmp_path):
    result = client.run(webp_workflow(frames=2), timeout=10)
    out = tmp_path / "o"
    first = client.download_outputs(result, out)[0]
    first.path.write_bytes(b"user edits")
    second = client.download_outputs(result, out)[0]
    third = client.download_outputs(result, out)[0]
    assert first.path.read_bytes() == b"user edits"
    assert second.path.name == "clip_00001_-1.webp" and third.path.name == "clip_00001_-2.webp"
    assert second.sha256 == third.sha256
    m1 = write_manifest(out, {"a": 1})
    m2 = write_manifest(out, {"a": 2})
    assert (m1.name, m2.name) == ("manifest.json", "manifest-1.json")
    assert json.loads(m1.read_text()) == {"a": 1}


def test_hostile_server_file_names_cannot_escape(fake_comfy, client, tmp_path):
    fake_comfy.knobs.lenient_view = True
    result = client.run({"1": {"class_type": "CF_Hostile", "inputs": {}}}, timeout=10)
    out = tmp_path / "deep" / "out"
    downloads = client.download_outputs(result, out)
    assert len(downloads) == 4
    for item in downloads:
        assert item.path.resolve().is_relative_to(out.resolve())
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "deep" / "escape.png").exists()
    names = sorted(d.path.relative_to(out).as_posix() for d in downloads)
    assert names == ["escape.png", "etc/cron.d/abs.png", "output", "win.png"]


def test_manifest_contains_no_secrets(fake_comfy, tmp_path):
    token = "tok-very-secret-123"
    fake_comfy.knobs.require_headers = {"Authorization": f"Bearer {token}"}
    url = fake_comfy.url.replace("http://", "http://user:pw-secret-9@")
    with ComfyClient(url, auth=BearerAuth(token)) as client:
        result = client.run(webp_workflow(frames=2), timeout=10)
        downloads = client.download_outputs(result, tmp_path)
        manifest = build_manifest(
            result, downloads, out_dir=tmp_path, server=client.url, workflow_source=f"leaked {token}"
        )
        path = write_manifest(tmp_path, manifest, secrets=client.config.secrets())
    text = Path(path).read_text()
    assert token not in text and "pw-secret-9" not in text and "***" in text
