"""Caption sidecars and captioning a dataset manifest (skip existing / overwrite / append)."""

import os
from pathlib import Path

import pytest
from PIL import Image

from charforge.engine.caption.backends.base import Captioner
from charforge.engine.caption.dataset import caption_dataset
from charforge.engine.caption.postprocess import CaptionRules
from charforge.engine.caption.sidecars import read_sidecar, sidecar_path, write_sidecar
from charforge.engine.dataset import AugmentSettings, CropSettings, augment, crop_dataset, load_folder


class FakeCaptioner(Captioner):
    """Names each image by its colour; records what it was asked."""

    name = "fake"

    def __init__(self, batch_size=2, blank=()):
        self.batch_size = batch_size
        self.calls = []
        self.blank = set(blank)
        self.closed = False

    def caption(self, images):
        self.calls.append(len(images))
        out = []
        for image in images:
            r, g, b = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
            colour = "red" if r > 128 else "green" if g > 128 else "blue"
            out.append("" if colour in self.blank else f"a {colour} square, A {colour} Square")
        return out

    def close(self):
        self.closed = True


def _photo(path, color, size=(64, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    _photo(folder / "a.png", (255, 0, 0))
    _photo(folder / "b.png", (0, 255, 0))
    _photo(folder / "c.png", (0, 0, 255))
    (folder / "c.txt").write_text("my own caption of c\n", encoding="utf-8")
    return folder


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_write_and_read_sidecar_one_line_utf8_atomic(tmp_path):
    path = write_sidecar(tmp_path / "sub" / "x.txt", "ohwx,  café\n smiling")
    assert path.read_bytes() == "ohwx, café smiling\n".encode()
    assert read_sidecar(path) == "ohwx, café smiling"
    assert [p.name for p in path.parent.iterdir()] == ["x.txt"]  # no temporary file left behind
    with pytest.raises(ValueError, match="empty caption"):
        write_sidecar(tmp_path / "y.txt", "  \n ")
    (tmp_path / "bom.txt").write_bytes("\ufeff\n  first line \nsecond".encode())
    assert read_sidecar(tmp_path / "bom.txt") == "first line"
    assert read_sidecar(tmp_path / "missing.txt") is None


def test_sidecars_never_go_next_to_source_photos(tmp_path, photos):
    before = _snapshot(photos)
    ds = load_folder(photos, tmp_path / "ds")
    for entry in ds.entries:
        assert entry.file == entry.source  # no crop yet: the working file is the user's photo
        assert sidecar_path(ds, entry) == tmp_path / "ds" / "captions" / f"{entry.id}.txt"
    run = caption_dataset(ds, FakeCaptioner(), CaptionRules(trigger="ohwx"), mode="overwrite")
    assert _snapshot(photos) == before  # the photo folder is untouched
    assert sorted(p.name for p in (tmp_path / "ds" / "captions").iterdir()) == [
        "0001.txt",
        "0002.txt",
        "0003.txt",
    ]
    assert len(run.captioned) == 3


def test_sidecars_next_to_cropped_working_files(tmp_path, photos):
    ds = crop_dataset(
        load_folder(photos, tmp_path / "ds"), CropSettings(bucket_set="sd15", square=True, upscale=True)
    )
    run = caption_dataset(ds, FakeCaptioner(), CaptionRules(trigger="ohwx"), mode="overwrite")
    for entry in run.manifest.accepted:
        assert os.path.dirname(entry.file) != str(photos)
        sidecar = sidecar_path(run.manifest, entry)
        assert sidecar == sidecar.with_name(os.path.basename(entry.file)).with_suffix(".txt")
        assert read_sidecar(sidecar) == entry.caption


def test_skip_existing_then_overwrite_then_append(tmp_path, photos):
    ds = load_folder(photos, tmp_path / "ds")
    rules = CaptionRules(trigger="ohwx", class_tokens="woman", template="{trigger} {class}, {caption}")
    fake = FakeCaptioner(batch_size=2)
    first = caption_dataset(ds, fake, rules)  # skip existing is the default
    by_name = {e.name: e for e in first.manifest.entries}
    assert by_name["c.png"].caption == "my own caption of c"  # picked up by Load, kept
    assert by_name["a.png"].caption == "ohwx woman, a red square"  # trigger first, repeat removed
    assert first.skipped == [by_name["c.png"].id] and len(first.captioned) == 2
    assert fake.calls == [2]  # c.png never reached the model
    assert ds.entries[0].caption is None  # the manifest given was not changed

    # Second run on the result: everything captioned, nothing sent to the model.
    fake2 = FakeCaptioner()
    second = caption_dataset(first.manifest, fake2, rules)
    assert fake2.calls == [] and len(second.skipped) == 3

    # A sidecar written by a previous run counts as captioned even when the manifest lost it.
    bare = load_folder(photos, tmp_path / "ds", read_captions=False)
    third = caption_dataset(bare, FakeCaptioner(), rules)
    assert sorted(third.skipped) == sorted(first.captioned)

    over = caption_dataset(first.manifest, FakeCaptioner(), rules, mode="overwrite")
    assert {e.name: e.caption for e in over.manifest.entries}["c.png"] == "ohwx woman, a blue square"

    app = caption_dataset(first.manifest, FakeCaptioner(), rules, mode="append")
    captions = {e.name: e.caption for e in app.manifest.entries}
    assert captions["c.png"] == "ohwx woman, my own caption of c, a blue square"
    assert captions["a.png"] == "ohwx woman, a red square"  # appended text already there: kept once
    assert read_sidecar(sidecar_path(app.manifest, app.manifest.entries[2])) == captions["c.png"]


def test_blank_captions_and_unreadable_files_are_reported(tmp_path, photos):
    ds = load_folder(photos, tmp_path / "ds", read_captions=False)
    os.remove(ds.entries[0].file)  # a.png vanished after loading
    run = caption_dataset(ds, FakeCaptioner(blank={"green"}), CaptionRules(trigger="ohwx"), mode="overwrite")
    assert set(run.failed) == {ds.entries[0].id, ds.entries[1].id}
    assert "unreadable" in run.failed[ds.entries[0].id]
    assert "no caption" in run.failed[ds.entries[1].id]
    assert run.captioned == [ds.entries[2].id]
    assert not sidecar_path(run.manifest, run.manifest.entries[1]).exists()
    assert "without caption" in run.summary


def test_augmented_copies_share_their_originals_new_caption(tmp_path, photos):
    ds = augment(load_folder(photos, tmp_path / "ds", read_captions=False), AugmentSettings(flip=True))
    fake = FakeCaptioner(batch_size=8)
    run = caption_dataset(ds, fake, CaptionRules(trigger="ohwx"), mode="overwrite")
    assert fake.calls == [3]  # only the originals went to the model
    by_id = run.manifest.by_id()
    for entry in run.manifest.entries:
        if entry.parent:
            assert entry.caption == by_id[entry.parent].caption
            assert read_sidecar(sidecar_path(run.manifest, entry)) == entry.caption
    assert len(run.copied) == 3


def test_progress_per_image_and_bad_mode(tmp_path, photos):
    ds = load_folder(photos, tmp_path / "ds", read_captions=False)
    seen = []
    caption_dataset(
        ds,
        FakeCaptioner(batch_size=2),
        CaptionRules(),
        mode="overwrite",
        on_image=lambda d, t: seen.append((d, t)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="skip existing"):
        caption_dataset(ds, FakeCaptioner(), CaptionRules(), mode="replace")


def test_loading_a_folder_reads_sidecars_through_the_one_sidecar_reader(tmp_path, monkeypatch):
    # Issue 17: sidecar reading has one home (caption.sidecars); dataset loading must use it, not a copy.
    from charforge.engine.caption import sidecars
    from charforge.engine.dataset.load import read_caption

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("\n  ohwx, smiling  \n", encoding="utf-8")
    assert read_caption(tmp_path / "a.png") == "ohwx, smiling"
    seen = []
    monkeypatch.setattr(
        sidecars, "read_sidecar", lambda path: seen.append(Path(path).name) or "from the one reader"
    )
    assert read_caption(tmp_path / "a.png") == "from the one reader"
    assert seen == ["a.txt"]
