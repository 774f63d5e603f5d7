"""Decompression bombs: every image is checked against the pixel limit before it is decoded."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from fakes.comfy_server import png_chunk
from PIL import Image

from charforge.engine import images
from charforge.engine.dataset import load_folder, read_rgb, scan_folder, write_report
from charforge.engine.images import ImageTooLarge, check_size, max_image_pixels, open_image

SIDE = 13000


def bomb_png(path: Path, side: int = SIDE) -> Path:
    """A 1-bit greyscale PNG of side x side white pixels, written row by row (about 20 KB on disk)."""
    row = b"\x00" + b"\xff" * ((side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
        + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def test_the_bomb_is_small_on_disk_and_refused_by_every_reader(bomb):
    assert bomb.stat().st_size < 100_000
    with Image.open(bomb) as img:
        assert img.size == (SIDE, SIDE) and img.mode == "1"
    with pytest.raises(ImageTooLarge, match=f"too large: {SIDE} x {SIDE}") as info:
        open_image(bomb)
    assert str(bomb) in str(info.value) and "CHARFORGE_MAX_IMAGE_PIXELS" in str(info.value)
    with pytest.raises(ImageTooLarge):
        read_rgb(bomb, max_side=256)
    result = scan_folder(bomb.parent, verify=True)
    assert result.images == [] and result.rejected[0].reason.startswith(f"too large: {SIDE} x {SIDE}")


def test_dataset_report_shows_too_large(bomb, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "bomb.png").write_bytes(bomb.read_bytes())
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photos / "fine.png")
    manifest = load_folder(photos, tmp_path / "ds", workers=2)
    by_name = {e.name: e for e in manifest.entries}
    assert by_name["fine.png"].rejected == []
    assert (
        by_name["bomb.png"]
        .rejected[0]
        .startswith(f"too large: {SIDE} x {SIDE} (169.0 MP; the limit is 50 MP")
    )
    out = write_report(manifest, thumb_size=64, workers=2)
    data = json.loads(Path(out["json"]).read_text(encoding="utf-8"))
    assert data["rejection_reasons"] == {"too large": 1}
    row = next(r for r in data["images"] if r["name"] == "bomb.png")
    assert row["reasons"][0].startswith(f"too large: {SIDE} x {SIDE}")


def test_the_bomb_is_never_decoded_memory_stays_flat(bomb, tmp_path):
    # In a fresh process: peak RSS after loading, analysing and reporting a folder with the bomb barely moves
    # (decoding it would take at least 169 MB, as 8-bit greyscale; RGB 507 MB).
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "bomb.png").write_bytes(bomb.read_bytes())
    script = f"""
import resource
import cv2, numpy, PIL.Image  # imported first, so that import memory counts in the baseline
from charforge.engine.dataset import analyse, load_folder, write_report
from charforge.engine.dataset.analyse import measure_entry
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
manifest = analyse(load_folder({str(photos)!r}, {str(tmp_path / "ds")!r}, workers=2), None, workers=2)
assert measure_entry(manifest.entries[0], None).error.startswith("too large")  # a stage that does not skip it
write_report(manifest, thumb_size=64, workers=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_mb = int(done.stdout.strip().splitlines()[-1])
    assert grown_mb < 60, f"peak RSS grew by {grown_mb} MB"


def test_the_limit_comes_from_the_environment_or_the_argument(tmp_path, monkeypatch):
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    assert max_image_pixels() == 50_000_000
    monkeypatch.setenv("CHARFORGE_MAX_IMAGE_PIXELS", "399")
    with pytest.raises(ImageTooLarge, match="too large: 20 x 20.*limit is 0.000399 MP"):
        open_image(small)
    with open_image(small, max_pixels=400) as img:  # the argument wins
        assert img.size == (20, 20)
    monkeypatch.setenv("CHARFORGE_MAX_IMAGE_PIXELS", "100_000_000")
    assert max_image_pixels() == 100_000_000
    monkeypatch.setenv("CHARFORGE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match=r"\$CHARFORGE_MAX_IMAGE_PIXELS must be a number of pixels.*'lots'"):
        check_size((1, 1), small)


def test_decoding_threads_share_one_pixel_budget(monkeypatch):
    monkeypatch.setenv("CHARFORGE_MAX_IMAGE_PIXELS", "25")  # budget = 4 x 25 = 100 pixels
    peak = []

    def decode(pixels: int) -> None:
        with images.decode_slot(pixels):
            peak.append(images._BUDGET.used)
            time.sleep(0.02)

    threads = [threading.Thread(target=decode, args=(60,)) for _ in range(4)]
    threads += [threading.Thread(target=decode, args=(10_000,))]  # bigger than the budget: runs alone
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(peak) == 5 and max(peak) <= 100
    assert images._BUDGET.used == 0
