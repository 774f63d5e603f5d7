"""``charforge train --backend replicate:...`` and the driver's training module against the fake Replicate: from a
dataset folder to a LoRA that CharForge's LoRA Info reads, in the loras folder, with a character preset."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakes.comfy_server import png_bytes
from fakes.replicate_api import PRICES, TRAINER, FakeReplicate, fake_lora, trainer_fake

from cf_testing.cli import run_charforge as cli
from charforge.driver.errors import ProtocolError
from charforge.driver.replicate.training import TrainingParams, dataset_archive, extract_lora, trainer_input


@pytest.fixture
def replicate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeReplicate]:
    with trainer_fake(monkeypatch, tmp_path, "me/alice") as fake:
        yield fake


def train(data: Path, destination: str, trigger: str, *options: str) -> tuple[int, str, str]:
    """``charforge train DATA --backend replicate:TRAINER --destination D --trigger-word T OPTIONS``."""
    return cli(
        "train",
        str(data),
        "--backend",
        f"replicate:{TRAINER}",
        "--destination",
        destination,
        "--trigger-word",
        trigger,
        *options,
    )


def dataset(folder: Path, captions: bool = True) -> Path:
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(png_bytes(16, 16, (40 * i, 80, 120)))
        if captions:
            (folder / f"img{i}.txt").write_text(f"alicetok, photo {i}", encoding="utf-8")
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    return folder


def test_train_from_dataset_to_a_loaded_lora_and_a_preset(replicate: FakeReplicate, tmp_path: Path) -> None:
    replicate.knobs.lose_create_answers = 1  # the create answer is lost: found again, not trained twice
    replicate.knobs.rate_limit_next = 2
    data = dataset(tmp_path / "data")
    loras, chars, out_dir = tmp_path / "loras", tmp_path / "characters", tmp_path / "out"
    code, out, err = train(
        data,
        "me/alice",
        "alicetok",
        "--name",
        "Alice",
        "--steps",
        "30",
        "--rank",
        "8",
        "--learning-rate",
        "0.0004",
        "--resolution",
        "512",
        "--input",
        "batch_size=2",
        "--base-model",
        "sd15",
        "--out",
        str(out_dir),
        "--loras-dir",
        str(loras),
        "--characters-dir",
        str(chars),
        "--json",
    )
    assert code == 0, err
    (job,) = replicate.jobs.values()
    assert job.kind == "training" and job.destination == "me/alice" and job.status == "succeeded"
    sent = dict(job.input)
    images_url = sent.pop("input_images")
    assert sent == {
        "trigger_word": "alicetok",
        "steps": 30,
        "lora_rank": 8,
        "learning_rate": 0.0004,
        "resolution": "512",
        "autocaption": False,
        "batch_size": 2,
    }
    archive = zipfile.ZipFile(io.BytesIO(replicate.files[images_url.rsplit("/", 1)[-1]][2]))
    assert sorted(archive.namelist()) == [f"img{i}.{ext}" for i in range(3) for ext in ("png", "txt")]
    result = json.loads(out.splitlines()[-1])
    lora = Path(result["lora"])
    assert lora.parent == loras and lora.is_file()
    assert (result["format"], result["base_model"], result["modules"]) == ("kohya", "sd15", 6)
    assert result["new_version"].startswith("me/alice:") and replicate.models["me/alice"].versions
    assert result["cost_usd"] == pytest.approx(replicate.bill("training"), rel=1e-3)
    assert result["cost_usd"] == pytest.approx(job.predict_time * PRICES["gpu-h100"], rel=1e-3)
    preset = (chars / "Alice.yaml").read_text()
    assert lora.name in preset and "alicetok" in preset and "base_model: sd15" in preset
    record = json.loads(next(out_dir.glob("*.training.json")).read_text())
    assert record["training_id"] == job.id and record["images"] == 3 and record["captions"] == 3
    assert "step 30/30" in out  # the trainer's log lines as progress
    assert replicate.token not in out + err + json.dumps(record) + preset


def test_wrong_base_family_and_missing_destination_are_reported(
    replicate: FakeReplicate, tmp_path: Path
) -> None:
    data = dataset(tmp_path / "data", captions=False)
    code, _, err = train(
        data,
        "me/alice",
        "tok",
        "--base-model",
        "sdxl",
        "--out",
        str(tmp_path / "out"),
        "--characters-dir",
        str(tmp_path / "chars"),
    )
    assert code == 1 and "is for sd15, not sdxl" in err
    assert not (tmp_path / "chars").exists()  # no preset for a LoRA that cannot be used
    (job,) = replicate.jobs.values()
    assert "autocaption" not in job.input  # no captions of ours: the trainer captions
    code, _, err = train(data, "me/nobody", "tok", "--out", str(tmp_path / "out2"))
    assert code == 2 and "create the destination model first" in err
    code, _, err = train(tmp_path / "empty-not-there", "me/alice", "tok")
    assert code == 2 and "does not exist" in err
    code, _, err = cli(
        "train",
        str(data),
        "--backend",
        "http://127.0.0.1:1",
        "--destination",
        "me/alice",
        "--trigger-word",
        "tok",
    )
    assert code == 2 and "only Replicate trainers" in err


def test_archive_inputs_and_lora_extraction(tmp_path: Path) -> None:
    data = dataset(tmp_path / "data")
    raw, images, captions = dataset_archive(data)
    assert (images, captions) == (3, 3) and "notes.md" not in zipfile.ZipFile(io.BytesIO(raw)).namelist()
    body = trainer_input(
        TrainingParams("tok", rank=4),
        "https://x/f",
        captions=False,
        names={"rank": "network_dim", "images": "instance_data"},
    )
    assert body == {"instance_data": "https://x/f", "trigger_word": "tok", "network_dim": 4}
    lora = fake_lora("sdxl", 4, "tok")
    # a tar with lora.safetensors among other files, a zip with exactly one, and the bare file
    tar_path = tmp_path / "w.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, blob in (
            ("../evil/lora.safetensors", lora),
            ("out/optimizer.pt", b"x"),
            ("out/other.safetensors", b"y"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert extract_lora(tar_path, tmp_path / "a" / "l.safetensors").read_bytes() == lora
    assert not (tmp_path / "evil").exists()  # member names never become paths
    zip_path = tmp_path / "w.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("model/weights.safetensors", lora)
    assert extract_lora(zip_path, tmp_path / "b.safetensors").read_bytes() == lora
    bare = tmp_path / "weights.download"
    bare.write_bytes(lora)
    assert extract_lora(bare, tmp_path / "c.safetensors").read_bytes() == lora
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("a.safetensors", lora)
        archive.writestr("b.safetensors", lora)
    with pytest.raises(ProtocolError, match="cannot tell which"):
        extract_lora(zip_path, tmp_path / "d.safetensors")


def test_a_lora_with_nan_weights_or_no_lora_keys_is_refused(tmp_path: Path) -> None:
    from charforge.recipes.train import check_lora

    good = tmp_path / "good.safetensors"
    good.write_bytes(fake_lora("sdxl", 4, "tok"))
    info, problems = check_lora(good, "sdxl")
    assert problems == [] and info.format == "kohya" and info.base_model == "sdxl"
    assert check_lora(good, "sd15")[1] == ["it is for sdxl, not sd15"]
    nan = tmp_path / "nan.safetensors"
    nan.write_bytes(fake_lora("sdxl", 4, "tok").replace(b"\x00\x00" * 8, b"\x00\x7e" * 8, 1))
    _, problems = check_lora(nan, None)
    assert len(problems) == 1 and "NaN" in problems[0]
    other = tmp_path / "other.safetensors"
    other.write_bytes(fake_lora("sdxl", 4, "tok").replace(b"lora_unet_down_blocks", b"model.diffusion_xxxxx"))
    _, problems = check_lora(other, None)
    assert problems and "not a LoRA CharForge can read" in problems[0]
