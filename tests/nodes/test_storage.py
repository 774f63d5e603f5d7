"""Send Training to Storage (nodes/storage.py, engine/transfer/storage.py) against moto on loopback: the LoRA
and run folder go up with their sha256, a second run sends nothing, a wrong destination or missing run is
refused with the reason, and the receipt image holds the text the driver reads back."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fakes.moto_s3 import ACCESS_KEY, SECRET_KEY, use_s3

pytest.importorskip("boto3")
pytest.importorskip("moto")


def _run(tmp_path: Path):
    from charforge.engine.train.run import TrainingRun

    run_dir = tmp_path / "output" / "charforge" / "train_runs" / "pip"
    (run_dir / "samples").mkdir(parents=True)
    (run_dir / "samples" / "s.png").write_bytes(b"\x89PNG sample")
    (run_dir / "pip.safetensors").write_bytes(b"lora" * 1000)
    (run_dir / ".state").write_bytes(b"hidden bookkeeping")
    lora = tmp_path / "models" / "loras" / "pip.safetensors"
    lora.parent.mkdir(parents=True)
    lora.write_bytes(b"lora" * 1000)
    return TrainingRun("pip", str(run_dir), "completed", 8, 8, 0.25, str(lora), "pip.safetensors")


def test_the_run_goes_up_once_and_the_receipt_reads_back(comfy_env, s3_endpoint, tmp_path, monkeypatch):
    import boto3
    from PIL import Image

    from charforge.driver.runpod.results import receipt
    from charforge.driver.sync import parse_train_summary
    from charforge.nodes.storage import SendTrainingToStorage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    run = _run(tmp_path)
    answer = SendTrainingToStorage().send(run, f"s3://{bucket}/runs/a1", unique_id="9")
    assert answer["result"] == (f"s3://{bucket}/runs/a1",)
    client = boto3.client("s3")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        "runs/a1/lora/pip.safetensors",
        "runs/a1/run/pip/pip.safetensors",
        "runs/a1/run/pip/samples/s.png",
    ]  # hidden files stay on the server
    meta = client.head_object(Bucket=bucket, Key="runs/a1/lora/pip.safetensors")["Metadata"]
    assert meta["sha256"] == hashlib.sha256(b"lora" * 1000).hexdigest()

    [shown] = answer["ui"]["images"]
    path = Path(comfy_env.base_dir) / "output" / shown["subfolder"] / shown["filename"]
    Image.open(path).verify()  # a real image: the worker returns it, the editor shows it
    found = receipt(shown["filename"], path.read_bytes())
    assert found["node"] == "9" and [f["sent"] for f in found["files"]] == [True, True, True]
    trained = parse_train_summary(found["summary"])
    assert (trained.lora, trained.run_dir) == ("pip.safetensors", f"s3://{bucket}/runs/a1/run/pip")
    assert SECRET_KEY not in str(answer) and ACCESS_KEY not in str(answer)

    again = SendTrainingToStorage().send(run, f"s3://{bucket}/runs/a1", unique_id="9")
    assert "sent 0 of 3 files" in again["ui"]["text"][0]


def test_bad_destinations_and_missing_runs_are_refused(comfy_env, s3_endpoint, tmp_path, monkeypatch):
    from charforge.nodes.storage import SendTrainingToStorage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    run = _run(tmp_path)
    with pytest.raises(RuntimeError, match="not an s3://bucket/prefix"):
        SendTrainingToStorage().send(run, "/tmp/somewhere")
    with pytest.raises(RuntimeError, match=r"'\.\.' parts"):
        SendTrainingToStorage().send(run, f"s3://{bucket}/a/../b")
    with pytest.raises(RuntimeError, match="NoSuchBucket") as caught:
        SendTrainingToStorage().send(run, "s3://no-such-bucket-cf/x")
    assert SECRET_KEY not in str(caught.value) and ACCESS_KEY not in str(caught.value)
    Path(run.lora_path).unlink()
    (Path(run.run_dir) / "pip.safetensors").unlink()
    with pytest.raises(RuntimeError, match="is not there; nothing was sent"):
        SendTrainingToStorage().send(run, f"s3://{bucket}/x")


def test_fetch_keeps_the_layout_checks_every_file_and_refuses_a_mismatch(
    comfy_env, s3_endpoint, tmp_path, monkeypatch
):
    import boto3

    from charforge.nodes.storage import FetchFromStorage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    client = boto3.client("s3")

    def put(key, body, sha=None):
        meta = {"sha256": sha or hashlib.sha256(body).hexdigest()}
        client.put_object(Bucket=bucket, Key=key, Body=body, Metadata=meta)

    put("ds/10_pip woman/a.png", b"\x89PNG a")
    put("ds/10_pip woman/a.txt", b"pip woman")
    answer = FetchFromStorage().fetch(f"s3://{bucket}/ds", "pip")
    [folder] = answer["result"]
    assert Path(folder) == Path(comfy_env.base_dir) / "input" / "charforge" / "pip"
    assert (Path(folder) / "10_pip woman" / "a.txt").read_bytes() == b"pip woman"
    again = FetchFromStorage().fetch(f"s3://{bucket}/ds", "pip")
    assert "(0 fetched, 2 already here)" in again["ui"]["text"][0]

    put("bad/x.png", b"other bytes", sha="0" * 64)
    with pytest.raises(RuntimeError, match="do not match the sha256"):
        FetchFromStorage().fetch(f"s3://{bucket}/bad", "bad")
    assert not list((Path(comfy_env.base_dir) / "input" / "charforge" / "bad").rglob("*.png*"))
    put("hidden/.uploads/x.png", b"x")
    with pytest.raises(RuntimeError, match="refused"):
        FetchFromStorage().fetch(f"s3://{bucket}/hidden", "hidden")
    with pytest.raises(ValueError, match="folder_name"):
        FetchFromStorage().fetch(f"s3://{bucket}/ds", "../escape")
    with pytest.raises(RuntimeError, match="holds no files"):
        FetchFromStorage().fetch(f"s3://{bucket}/nothing-here", "")


def test_send_outputs_sends_what_the_wired_outputs_name_inside_the_output_folder_only(
    comfy_env, s3_endpoint, tmp_path, monkeypatch
):
    """Send Outputs to Storage, as the driver wires it: a video file, a storyboard folder (its hidden file left
    out), a dataset manifest's folder, a report's folder and a score sheet go up below files/ with their sha256;
    a path outside ComfyUI's output folder (also through a link) is noted and never sent; a second run sends
    nothing; the receipt (image and receipt.json) lists every file with the node that wrote it."""
    import json
    from types import SimpleNamespace

    import boto3

    from charforge import bridge
    from charforge.driver.runpod.results import receipt
    from charforge.nodes.storage import SendOutputsToStorage

    bucket = use_s3(monkeypatch, s3_endpoint, str(tmp_path))
    out = Path(bridge.output_directory())
    (out / "video").mkdir(parents=True)
    (out / "video" / "v_00001_.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 video")
    board = out / "charforge" / "storyboard_00001"
    board.mkdir(parents=True)
    (board / "frame_01.png").write_bytes(b"\x89PNG frame")
    (board / ".lock").write_bytes(b"hidden")
    dataset = out / "charforge" / "datasets" / "pip"
    (dataset / "report").mkdir(parents=True)
    (dataset / "manifest.json").write_text("{}")
    (dataset / "report" / "report.html").write_text("<html>")
    outside = tmp_path / "secret.txt"
    outside.write_text("not an output")
    (out / "link.txt").symlink_to(outside)
    prompt = {
        "2": {"class_type": "CharForgeSaveVideo"},
        "3": {"class_type": "CharForgeStoryboardSheet"},
        "5": {"class_type": "CharForgeExportDataset"},
        "6": {"class_type": "CharForgeDatasetReport"},
        "7": {"class_type": "CharForgeClipScore"},
        "8": {"class_type": "CharForgeSaveVideo"},
        "9": {"class_type": "CharForgeSaveVideo"},
    }
    wired = {
        "from_2__0": str(out / "video" / "v_00001_.mp4"),
        "from_3__1": str(board),
        "from_5__0": SimpleNamespace(folder=str(dataset)),
        "from_6__1": str(dataset / "report" / "report.html"),
        "from_7__3": json.dumps({"rows": [1, 2]}),
        "from_8__0": str(outside),
        "from_9__0": str(out / "link.txt"),
    }
    node = SendOutputsToStorage()
    answer = node.send(f"s3://{bucket}/o/1", prompt=prompt, unique_id="cf", **wired)
    client = boto3.client("s3")
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"])
    [sheet] = [k for k in keys if k.endswith("7_CharForgeClipScore.json")]
    assert keys == sorted(
        [
            "o/1/files/video/v_00001_.mp4",
            "o/1/files/charforge/storyboard_00001/frame_01.png",
            "o/1/files/charforge/datasets/pip/manifest.json",
            "o/1/files/charforge/datasets/pip/report/report.html",
            sheet,
            "o/1/receipt.json",
        ]
    )
    assert json.loads(client.get_object(Bucket=bucket, Key=sheet)["Body"].read()) == {"rows": [1, 2]}
    notes = "\n".join(answer["ui"]["text"][1:])
    assert "CharForgeSaveVideo 8" in notes and "CharForgeSaveVideo 9" in notes

    [shown] = answer["ui"]["images"]
    png = (out / shown["subfolder"] / shown["filename"]).read_bytes()
    found = receipt(shown["filename"], png)
    assert found is not None and found["kind"] == "outputs" and found["node"] == "cf"
    by_path = {f["path"]: f for f in found["files"]}
    assert by_path["video/v_00001_.mp4"]["node"] == "2"
    assert by_path["charforge/datasets/pip/report/report.html"]["node"] == "5"  # sent once, first owner
    assert all(f["sent"] for f in found["files"])
    stored = json.loads(client.get_object(Bucket=bucket, Key="o/1/receipt.json")["Body"].read())
    assert stored["files"] == found["files"]

    again = node.send(f"s3://{bucket}/o/1", prompt=prompt, unique_id="cf", **wired)
    assert "(0 sent" in again["ui"]["text"][0]


def test_the_output_table_names_outputs_the_nodes_have():
    """Every entry of OUTPUT_VALUES is an output of that node class of the right type."""
    from charforge.common.transfer import OUTPUT_VALUES
    from charforge.nodes import NODE_CLASS_MAPPINGS

    expected = {"file": "STRING", "folder": "STRING", "folder_of": "STRING", "sheet": "STRING"}
    for class_type, outputs in OUTPUT_VALUES.items():
        cls = NODE_CLASS_MAPPINGS[class_type]
        assert getattr(cls, "OUTPUT_NODE", False), class_type
        for index, kind in outputs.items():
            returned = cls.RETURN_TYPES[index]
            assert returned == expected.get(kind, "CHARFORGE_DATASET"), (class_type, index, returned)


def test_without_boto3_the_pack_loads_and_the_storage_nodes_name_the_install(
    comfy_env, monkeypatch, tmp_path
):
    """boto3 is in requirements.txt, but a ComfyUI whose install of it failed still loads the pack: the storage
    module imports without it, and a storage node run says what to install."""
    import importlib
    import sys

    from charforge import bridge

    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setitem(sys.modules, "botocore", None)
    monkeypatch.setitem(sys.modules, "botocore.config", None)
    from charforge.nodes import storage

    importlib.reload(storage)
    assert set(storage.NODE_CLASS_MAPPINGS) == {
        "CharForgeSendTrainingToStorage",
        "CharForgeSendOutputsToStorage",
        "CharForgeFetchFromStorage",
    }
    video = Path(bridge.output_directory()) / "v.mp4"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"video")
    with pytest.raises(RuntimeError, match=r"needs boto3 .*pip install boto3"):
        storage.SendOutputsToStorage().send(
            "s3://bucket/o", prompt={"1": {"class_type": "CharForgeSaveVideo"}}, from_1__0=str(video)
        )
    with pytest.raises(RuntimeError, match=r"pip install boto3"):
        storage.FetchFromStorage().fetch("s3://bucket/ds", "ds")
