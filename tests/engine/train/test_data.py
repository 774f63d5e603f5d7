"""Training data: kohya folders, manifests, buckets, captions, epoch order and content-keyed caches."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from charforge.engine.train.data import (
    DatasetError,
    DataSettings,
    TensorCache,
    TrainingData,
    TrainItem,
    bucket_sizes,
    choose_bucket,
    items_from_pairs,
    load_items,
    mask_file,
    prepare_image,
    prepare_mask,
    process_caption,
    read_kohya_folder,
    tag_frequency,
)


def _image(path, size=(64, 48), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def kohya(tmp_path):
    root = tmp_path / "img"
    _image(root / "10_ohwx woman" / "a.png")
    (root / "10_ohwx woman" / "a.txt").write_text("ohwx woman, red dress\nsecond line ignored\n")
    _image(root / "10_ohwx woman" / "b.jpg", seed=1)  # no sidecar: the class tokens are its caption
    _image(root / "2_ohwx woman, outdoors" / "c.png", (48, 96), seed=2)
    (root / "notes").mkdir()
    (root / "readme.txt").write_text("not an image")
    return root


def test_kohya_folder(kohya):
    items = read_kohya_folder(kohya)
    assert [(i.caption, i.repeats, i.subset) for i in items] == [
        ("ohwx woman, red dress", 10, "10_ohwx woman"),
        ("ohwx woman", 10, "10_ohwx woman"),
        ("ohwx woman, outdoors", 2, "2_ohwx woman, outdoors"),
    ]
    # Pointing at the inner folder (the most common mistake) works too.
    inner = read_kohya_folder(kohya / "10_ohwx woman")
    assert [i.image for i in inner] == [items[0].image, items[1].image]
    assert tag_frequency(items) == {
        "10_ohwx woman": {"ohwx woman": 2, "red dress": 1},
        "2_ohwx woman, outdoors": {"ohwx woman": 1, "outdoors": 1},
    }


def test_kohya_folder_errors_say_what_to_do(tmp_path):
    (tmp_path / "empty" / "photos").mkdir(parents=True)
    with pytest.raises(DatasetError, match="CONTAINS the '<repeats>_<name>' folders"):
        read_kohya_folder(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found"):
        read_kohya_folder(tmp_path / "missing")
    (tmp_path / "zero" / "0_x").mkdir(parents=True)
    _image(tmp_path / "zero" / "0_x" / "a.png")
    with pytest.raises(DatasetError, match="at least 1"):
        read_kohya_folder(tmp_path / "zero")


def test_other_sources(tmp_path, kohya):
    image = _image(tmp_path / "p.png")
    assert load_items([(str(image), "sks")]) == [TrainItem(str(image), "sks", 1, "images")]
    with pytest.raises(DatasetError, match="not found"):
        items_from_pairs([(str(tmp_path / "gone.png"), "x")])
    assert len(load_items(str(kohya))) == 3
    with pytest.raises(DatasetError, match="cannot train on"):
        load_items(42)


def test_dataset_manifest_source(tmp_path, kohya):
    manifest_module = pytest.importorskip("charforge.engine.dataset.manifest")
    a, b = _image(tmp_path / "ds" / "a.png"), _image(tmp_path / "ds" / "b.png", seed=3)
    (tmp_path / "ds" / "b.txt").write_text("sidecar caption")
    entries = [
        manifest_module.ImageEntry(id="1", source=str(a), file=str(a), caption="ohwx, smiling"),
        manifest_module.ImageEntry(id="2", source=str(b), file=str(b)),
        manifest_module.ImageEntry(id="3", source=str(a), file=str(a), rejected=["blurry"]),
    ]
    manifest = manifest_module.DatasetManifest(name="alice", folder=str(tmp_path / "ds"), entries=entries)
    items = load_items(manifest)
    assert [(i.caption, i.subset) for i in items] == [
        ("ohwx, smiling", "alice"),
        ("sidecar caption", "alice"),
    ]
    path = manifest.save()
    assert [i.caption for i in load_items(path)] == ["ohwx, smiling", "sidecar caption"]
    manifest.export_dir = str(kohya)  # after Export Dataset: its kohya folder (repeats, final captions) wins
    assert [i.repeats for i in load_items(manifest)] == [10, 10, 2]


# --------------------------------------------------------------------------------------------------
# Buckets and images


def test_bucket_sizes_keep_the_area_and_steps():
    buckets = bucket_sizes(1024, 64, 256, 2048)
    assert (1024, 1024) in buckets and (832, 1216) in buckets and (1216, 832) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert min(width, height) >= 256 and max(width, height) <= 2048
        assert width * height <= 1024 * 1024
    assert choose_bucket(3000, 2000, buckets)[0] > choose_bucket(3000, 2000, buckets)[1]
    assert choose_bucket(1000, 1000, buckets) == (1024, 1024)
    portrait = choose_bucket(832, 1216, buckets)
    assert portrait == (832, 1216)


def test_prepare_image_covers_the_bucket_and_centre_crops(tmp_path):
    path = _image(tmp_path / "wide.png", (100, 50))
    prepared = prepare_image(str(path), (64, 64))
    assert prepared.pixels.shape == (3, 64, 64)
    assert prepared.pixels.min() >= -1.0 and prepared.pixels.max() <= 1.0
    assert prepared.original_size == (50, 100) and prepared.crop_top_left == (0, 32)
    flipped = prepare_image(str(path), (64, 64), flip=True)
    torch.testing.assert_close(flipped.pixels, prepared.pixels.flip(-1))


def test_captions_shuffle_after_keep_tokens_and_drop():
    caption = "ohwx woman, red dress, smiling, outdoors, sunny"
    settings = DataSettings(shuffle_caption=True, keep_tokens=1)
    seen = {process_caption(caption, settings, random.Random(i)) for i in range(20)}
    assert len(seen) > 5
    assert all(
        c.startswith("ohwx woman, ") and sorted(c.split(", ")) == sorted(caption.split(", ")) for c in seen
    )
    assert process_caption(caption, DataSettings(), random.Random(0)) == caption
    dropped = [
        process_caption(caption, DataSettings(caption_dropout=0.5), random.Random(i)) for i in range(200)
    ]
    assert 60 < dropped.count("") < 140


def test_epoch_batches_are_deterministic_and_single_bucket(tmp_path, kohya):
    settings = DataSettings(resolution=64, bucket_step=32, min_bucket=32, max_bucket=128)
    data = TrainingData.prepare(read_kohya_folder(kohya), settings)
    assert len(set(data.buckets)) == 2  # landscape and portrait
    assert data.num_samples == 22
    first = data.epoch_batches(0, 4, seed=1)
    assert first == data.epoch_batches(0, 4, seed=1)
    assert first != data.epoch_batches(1, 4, seed=1)
    assert sorted(i for batch in first for i in batch) == [0] * 10 + [1] * 10 + [2] * 2
    for batch in first:
        assert len({data.buckets[i] for i in batch}) == 1 and 1 <= len(batch) <= 4


# --------------------------------------------------------------------------------------------------
# Caches


def _fake_vae(pixels):
    # Stands in for VAE.encode: 8x smaller, 4 channels, depends on the pixels.
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


@pytest.mark.parametrize("to_disk", [False, True])
def test_latent_cache_is_keyed_by_content(tmp_path, to_disk):
    folder = tmp_path / "img" / "1_x"
    _image(folder / "a.png")
    settings = DataSettings(resolution=64, bucket_step=32, min_bucket=32, flip=True, cache_to_disk=to_disk)
    data = TrainingData.prepare(read_kohya_folder(tmp_path / "img"), settings, cache_dir=tmp_path / "cache")
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        return _fake_vae(pixels)

    assert data.cache_latents(encode, "vae1") == 2  # the image and its mirror
    latent, mirrored = data.latent(0, False, "vae1"), data.latent(0, True, "vae1")
    assert latent.shape == (4, 8, 8)
    torch.testing.assert_close(mirrored, latent.flip(-1))
    assert data.cache_latents(encode, "vae1") == 0  # cached
    assert data.cache_latents(encode, "vae2") == 2  # another VAE: new keys
    if to_disk:
        assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 4
        again = TrainingData.prepare(
            read_kohya_folder(tmp_path / "img"), settings, cache_dir=tmp_path / "cache"
        )
        assert again.cache_latents(encode, "vae1") == 0  # found on disk
        _image(folder / "a.png", seed=9)  # the photo changed: its old latents are not used
        changed = TrainingData.prepare(
            read_kohya_folder(tmp_path / "img"), settings, cache_dir=tmp_path / "cache"
        )
        assert changed.cache_latents(encode, "vae1") == 2


def test_text_cache_includes_the_empty_caption_when_dropping(tmp_path):
    _image(tmp_path / "img" / "1_x" / "a.png")
    data = TrainingData.prepare(
        read_kohya_folder(tmp_path / "img"), DataSettings(resolution=64, caption_dropout=0.1)
    )
    assert data.captions_to_cache() == ["x", ""]
    encoded = data.cache_text(lambda captions: {"hidden": torch.ones(len(captions), 77, 8)}, "te")
    assert encoded == 2 and data.text("", "te")["hidden"].shape == (77, 8)


def test_unreadable_images_are_named(tmp_path):
    folder = tmp_path / "img" / "1_x"
    _image(folder / "good.png")
    (folder / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="bad.png"):
        TrainingData.prepare(read_kohya_folder(tmp_path / "img"), DataSettings(resolution=64))


def test_masks_from_a_sidecar_or_transparency(tmp_path):
    folder = tmp_path / "img" / "1_x"
    photo = _image(folder / "a.png", (64, 32))
    mask = np.zeros((32, 64), np.uint8)
    mask[:, 32:] = 255  # train on the right half only
    Image.fromarray(mask).save(folder / "a_mask.png")
    assert mask_file(photo) == folder / "a_mask.png"
    assert [Path(i.image).name for i in read_kohya_folder(tmp_path / "img")] == ["a.png"]  # not a photo
    weights = prepare_mask(str(photo), (64, 32))
    assert weights.shape == (1, 4, 8)
    assert weights[0, :, :4].max() == 0 and weights[0, :, 4:].min() == 1
    torch.testing.assert_close(prepare_mask(str(photo), (64, 32), flip=True), weights.flip(-1))

    rgba = np.full((16, 16, 4), 255, np.uint8)
    rgba[:8, :, 3] = 0  # transparent top half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    weights = prepare_mask(str(tmp_path / "cutout.png"), (16, 16))
    assert weights[0, 0].max() == 0 and weights[0, 1].min() == 1
    assert prepare_mask(str(_image(tmp_path / "plain.png", (16, 16))), (16, 16)).min() == 1


def test_face_mask_weights_the_face_box(tmp_path):
    photo = _image(tmp_path / "a.png", (128, 128))
    box = (16.0, 16.0, 48.0, 48.0)  # a face in the top-left quarter
    weights = prepare_mask(str(photo), (128, 128), face_box=box, face_margin=0.0, face_background=0.25)
    assert weights.shape == (1, 16, 16)
    centre = weights[0, 4, 4]  # latent cell of pixel (32-39, 32-39): the box centre
    assert float(centre) == pytest.approx(1.0, abs=0.02)
    assert float(weights[0, 12:, 12:].max()) == pytest.approx(0.25, abs=0.01)  # far from the face
    mirrored = prepare_mask(str(photo), (128, 128), flip=True, face_box=box, face_margin=0.0)
    torch.testing.assert_close(mirrored, weights.flip(-1))
    grown = prepare_mask(str(photo), (128, 128), face_box=box, face_margin=0.5, face_background=0.25)
    assert float(grown.mean()) > float(weights.mean())  # the margin takes in hair and chin

    # A mask file is multiplied in only with masked_loss; face_mask alone ignores it.
    mask = np.zeros((128, 128), np.uint8)
    mask[:, 64:] = 255
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    both = prepare_mask(str(photo), (128, 128), face_box=box, face_margin=0.0)
    assert float(both[0, 4, 4]) == 0.0 and float(both[0, 12, 12]) == pytest.approx(0.25, abs=0.01)
    face_only = prepare_mask(str(photo), (128, 128), use_file_mask=False, face_box=box, face_margin=0.0)
    torch.testing.assert_close(face_only, weights)


def test_face_boxes_come_from_the_manifest(tmp_path):
    manifest_module = pytest.importorskip("charforge.engine.dataset.manifest")
    a, b = _image(tmp_path / "ds" / "a.png", (64, 64)), _image(tmp_path / "ds" / "b.png", (64, 64), seed=3)
    entries = [
        manifest_module.ImageEntry(
            id="0001",
            source=str(a),
            file=str(a),
            caption="ohwx",
            faces=manifest_module.FaceInfo(count=1, box=[8, 8, 40, 40]),
        ),
        manifest_module.ImageEntry(id="0002", source=str(b), file=str(b), caption="ohwx"),
    ]
    manifest = manifest_module.DatasetManifest(name="alice", folder=str(tmp_path / "ds"), entries=entries)
    items = load_items(manifest)
    assert [i.face_box for i in items] == [(8.0, 8.0, 40.0, 40.0), None]
    export = tmp_path / "ds" / "kohya" / "img" / "10_ohwx"
    _image(export / "0001.png", (64, 64)), _image(export / "0002.png", (64, 64), seed=3)
    manifest.export_dir = str(export.parent)
    assert [(Path(i.image).name, i.face_box) for i in load_items(manifest)] == [
        ("0001.png", (8.0, 8.0, 40.0, 40.0)),
        ("0002.png", None),
    ]

    data = TrainingData.prepare(
        load_items(manifest),
        DataSettings(
            resolution=64, min_bucket=64, face_mask=True, face_mask_margin=0.0, face_mask_background=0.0
        ),
    )
    assert data.settings.uses_masks
    assert float(data.mask(0)[0, 0, 0]) == 0.0 and float(data.mask(0)[0, 3, 3]) > 0.9
    assert float(data.mask(1).min()) == 1.0  # no face found: the plain loss
    hashes = data.mask_hashes()
    assert hashes[0].startswith(":face") and hashes[1] == ""
    with pytest.raises(ValueError, match="face_mask_background"):
        DataSettings(face_mask_background=1.5)


def test_tensor_cache_in_memory_says_which_key_is_missing():
    # Found by mypy: without a folder, a key never put used to fail as None / "key.safetensors" (TypeError).
    cache = TensorCache()
    cache.put("a", {"x": torch.ones(1)})
    assert "a" in cache and "b" not in cache
    with pytest.raises(KeyError, match="b"):
        cache.get("b")
