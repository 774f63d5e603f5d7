"""What CharForge's nodes write on a RunPod serverless worker comes home through S3-compatible storage: the
driver appends one Send Outputs to Storage node wired to the job's Save Video, Storyboard Sheet and score
outputs; on the fake worker (worker-comfyui's behaviour: only ``images`` entries come back, the worker's disk
never reachable) the real nodes write a real mp4, a storyboard folder and a score sheet, the real storage node
sends them to a real S3-compatible server on loopback (moto) and returns its receipt image; ``charforge run``
and ``charforge batch run`` bring every file into --out at its place below the output folder, byte-identical
and listed in the manifest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer
from fakes.moto_s3 import ACCESS_KEY, SECRET_KEY, corrupt_uploads
from fakes.runpod_api import FakeRunPod
from fakes.serverless_worker import serverless_endpoint
from fakes.storage_outputs import add_output_nodes, video_story_graph
from fakes.train_lora import add_store_node, add_train_node, lora_bytes

from cf_testing.cli import run_driver_cli

pytest.importorskip("boto3")
pytest.importorskip("moto")
pytest.importorskip("av")

OUTPUTS = "CharForgeSendOutputsToStorage"
FRAMES = [f"frame_{i:02d}.png" for i in range(1, 5)]


@pytest.fixture
def worker(
    comfy_env, monkeypatch, tmp_path, s3_endpoint
) -> Iterator[tuple[FakeRunPod, FakeComfyServer, str]]:
    """A serverless endpoint ``ep1`` whose worker runs the real Save Video, Storyboard Sheet and Send Outputs to
    Storage; the driver's and the worker's AWS variables point at moto."""
    nodes = (add_output_nodes, add_train_node, add_store_node)
    with serverless_endpoint(monkeypatch, tmp_path, s3_endpoint, comfy_env.base_dir, *nodes) as endpoint:
        yield endpoint


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _check_home(folder: Path, worker_output: Path, video: str, board: str) -> dict:
    """The video, the storyboard folder and the score sheet are in `folder` at their place below the worker's
    output folder, byte-identical to the worker's; the manifest lists every file in `folder` with its sha256."""
    assert (folder / video).read_bytes() == (worker_output / video).read_bytes()
    assert (folder / video).read_bytes()[4:8] == b"ftyp"  # an mp4
    names = sorted(p.name for p in (worker_output / board).iterdir())
    assert names == sorted([*FRAMES, "sheet.png", "metadata.json"])
    for name in names:
        assert (folder / board / name).read_bytes() == (worker_output / board / name).read_bytes()
    assert json.loads((folder / board / "metadata.json").read_text())["frames"][0]["image"] == "frame_01.png"
    [sheet] = [p for p in (folder / "charforge" / "scores").rglob("*.json")]
    assert sheet.name == "4_CharForgeClipScore.json" and json.loads(sheet.read_text())["metric"] == "identity"

    manifest = json.loads((folder / "manifest.json").read_text())
    listed = {f["path"]: f for f in manifest["files"]}
    assert set(listed) == _files(folder) - {"manifest.json"}
    for rel, entry in listed.items():
        assert entry["sha256"] == hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    assert listed[video]["node_id"] == "2" and listed[video]["class_type"] == "CharForgeSaveVideo"
    assert listed[f"{board}/metadata.json"]["class_type"] == "CharForgeStoryboardSheet"
    assert listed[f"{board}/metadata.json"]["title"] == "Storyboard"
    # the worker returned the mp4 and the frames base64 too: each file is here once, at its place
    assert not [p for p in listed if "/" not in p and p.endswith((".mp4", ".png")) and "results" not in p]
    return manifest


def test_run_brings_a_video_and_a_storyboard_folder_home_through_storage(worker, tmp_path, monkeypatch):
    runpod, comfy, bucket = worker
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    (tmp_path / "story.json").write_text(json.dumps(video_story_graph()))
    out = tmp_path / "out"
    code, stdout, err = run_driver_cli(
        "run", str(tmp_path / "story.json"), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err

    # the job went with one Send Outputs to Storage node wired to the outputs that name files
    [body] = runpod.run_bodies
    [store] = [n for n in body["input"]["workflow"].values() if n["class_type"] == OUTPUTS]
    assert {k: v for k, v in store["inputs"].items() if k != "destination"} == {
        "from_2__0": ["2", 0],
        "from_3__1": ["3", 1],
        "from_4__3": ["4", 3],
    }
    assert store["inputs"]["destination"].startswith(f"s3://{bucket}/results/outputs/")

    manifest = _check_home(out, comfy.output_dir, "video/CharForge_00001_.mp4", "charforge/storyboard_00001")
    assert manifest["server"] == "runpod-serverless:ep1"
    for text in ((out / "manifest.json").read_text(), stdout, err):
        assert SECRET_KEY not in text and ACCESS_KEY not in text

    # on S3: every file below <destination>/files/ with its sha256, and the receipt listing them
    import boto3

    client = boto3.client("s3")
    prefix = store["inputs"]["destination"].split("/", 3)[3] + "/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert prefix + "receipt.json" in keys and prefix + "files/video/CharForge_00001_.mp4" in keys
    for key in keys:
        assert len(client.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"]) == 64


def test_run_of_a_training_job_brings_the_lora_and_run_folder_home_with_the_video(
    worker, tmp_path, monkeypatch
):
    """``charforge run`` (no batch runner to bring the LoRA home afterwards): one job trains and saves a video;
    the LoRA, its run folder and the video all arrive in --out, listed in the manifest."""
    runpod, comfy, bucket = worker
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    graph = video_story_graph()
    del graph["3"], graph["4"]
    graph["9"] = {"class_type": "CharForgeTrainLoRA", "inputs": {"output_name": "pip", "steps": 4}}
    (tmp_path / "train.json").write_text(json.dumps(graph))
    out = tmp_path / "out"
    code, _, err = run_driver_cli(
        "run", str(tmp_path / "train.json"), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert (out / "lora" / "pip.safetensors").read_bytes() == lora_bytes("pip")
    run = out / "lora" / "run" / "pip"
    assert (run / "loss.png").read_bytes() == (
        comfy.output_dir / "charforge/train_runs/pip/loss.png"
    ).read_bytes()
    assert (out / "video/CharForge_00001_.mp4").is_file()
    listed = {f["path"]: f for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert set(listed) == _files(out) - {"manifest.json"}
    assert listed["lora/pip.safetensors"]["class_type"] == "CharForgeTrainLoRA"
    assert listed["lora/pip.safetensors"]["sha256"] == hashlib.sha256(lora_bytes("pip")).hexdigest()


def test_batch_brings_each_jobs_files_home_and_a_rerun_downloads_nothing(worker, tmp_path, monkeypatch):
    runpod, comfy, bucket = worker
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    (tmp_path / "story.json").write_text(json.dumps(video_story_graph()))
    spec = tmp_path / "sweep.json"
    spec.write_text(
        json.dumps({"workflow": "story.json", "axes": {"seed": {"set": "Frames.seed", "values": [0, 1]}}})
    )
    out = tmp_path / "out"
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert len(runpod.run_bodies) == 2
    folders = sorted(p.parent for p in out.glob("*/manifest.json"))
    assert len(folders) == 2
    videos = set()
    for folder in folders:
        [video] = [p.relative_to(folder).as_posix() for p in (folder / "video").glob("*.mp4")]
        [board] = [p.relative_to(folder).as_posix() for p in (folder / "charforge").glob("storyboard_*")]
        _check_home(folder, comfy.output_dir, video, board)
        videos.add((folder / video).read_bytes())
    assert len(videos) == 2  # two seeds, two videos

    stamps = {p: p.stat().st_mtime_ns for folder in folders for p in folder.rglob("*") if p.is_file()}
    code, _, err = run_driver_cli(
        "batch", "run", str(spec), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert len(runpod.run_bodies) == 2  # nothing sent again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing downloaded or rewritten


def test_a_worker_that_returns_one_image_still_brings_every_file_home(worker, tmp_path, monkeypatch):
    """worker-comfyui before 5.0 returns one image (``message``), not the receipt: the driver reads the receipt
    the node left at the destination it gave it."""
    runpod, comfy, bucket = worker
    runpod.knobs.output_schema = "old"
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    (tmp_path / "story.json").write_text(json.dumps(video_story_graph()))
    out = tmp_path / "out"
    code, _, err = run_driver_cli(
        "run", str(tmp_path / "story.json"), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert (out / "video/CharForge_00001_.mp4").read_bytes() == (
        comfy.output_dir / "video/CharForge_00001_.mp4"
    ).read_bytes()
    assert (out / "charforge/storyboard_00001/metadata.json").is_file()


def test_without_a_results_location_the_job_runs_and_says_what_stays_on_the_worker(
    worker, tmp_path, monkeypatch
):
    runpod, _, _ = worker
    monkeypatch.delenv("CHARFORGE_SERVERLESS_RESULTS", raising=False)
    (tmp_path / "story.json").write_text(json.dumps(video_story_graph()))
    out = tmp_path / "out"
    code, _, err = run_driver_cli(
        "run", str(tmp_path / "story.json"), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code == 0, err
    assert "CHARFORGE_SERVERLESS_RESULTS" in err and "CharForgeStoryboardSheet" in err
    [body] = runpod.run_bodies
    assert OUTPUTS not in {n["class_type"] for n in body["input"]["workflow"].values()}
    assert not (out / "charforge").exists()  # metadata.json stayed on the worker
    assert list(out.glob("*.mp4"))  # what worker-comfyui returns itself: the images entries, flat


def test_add_outputs_node_wires_only_outputs_that_name_files():
    from charforge.driver.runpod.results import add_outputs_node

    prompt = {
        "1": {"class_type": "CharForgeSaveVideo", "inputs": {}},
        "2": {"class_type": "CharForgeDatasetReport", "inputs": {}},
        "3": {"class_type": "SaveImage", "inputs": {}},
        "4": {"class_type": "CharForgeCompareSets", "inputs": {}},
    }
    new, note = add_outputs_node(prompt, "s3://b/r")
    assert note is None and set(new) == {"1", "2", "3", "4", "charforge_outputs"}
    inputs = new["charforge_outputs"]["inputs"]
    assert {k: v for k, v in inputs.items() if k != "destination"} == {
        "from_1__0": ["1", 0],
        "from_2__1": ["2", 1],
        "from_4__1": ["4", 1],
        "from_4__2": ["4", 2],
    }
    again, _ = add_outputs_node(new, "s3://b/r")
    assert again is new  # one node per job
    plain = {"3": {"class_type": "SaveImage", "inputs": {}}}
    assert add_outputs_node(plain, "s3://b/r") == (plain, None)


def test_a_receipt_naming_a_path_outside_out_is_refused(tmp_path):
    from charforge.driver.errors import UsageError
    from charforge.driver.runpod.results import outputs_home

    for bad in ("../escape.mp4", ".hidden/x", "/abs/x"):
        receipt = {
            "destination": "s3://b/r",
            "files": [{"key": f"files/{bad}", "path": bad, "sha256": "0" * 64}],
        }
        with pytest.raises(UsageError, match="refused"):
            outputs_home(receipt, tmp_path, storage=object())
    assert not list(tmp_path.iterdir())


def test_a_stored_file_whose_bytes_do_not_match_is_refused(worker, tmp_path, monkeypatch):
    """The mp4 on storage replaced by other bytes (its recorded sha256 kept): the download is refused with the
    reason and nothing of it is left in --out."""
    runpod, _, bucket = worker
    monkeypatch.setenv("CHARFORGE_SERVERLESS_RESULTS", f"s3://{bucket}/results")
    corrupt_uploads(monkeypatch, ".mp4", b"not the video")
    (tmp_path / "story.json").write_text(json.dumps(video_story_graph()))
    out = tmp_path / "out"
    code, _, err = run_driver_cli(
        "run", str(tmp_path / "story.json"), "--server", "runpod-serverless:ep1", "--out", str(out)
    )
    assert code != 0 and "do not match" in err and "CharForge_00001_.mp4" in err
    assert not list(out.rglob("*.mp4")) and not list(out.rglob("*.part"))
