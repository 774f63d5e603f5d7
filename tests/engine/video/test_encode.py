"""Video files (write, decode back, ComfyUI's naming convention) and optical-flow interpolation."""

import numpy as np
import pytest

from charforge.engine.video.encode import (
    SaveOutsideOutputError,
    read_video,
    save_path,
    save_video,
    write_video,
)
from charforge.engine.video.interpolate import interpolate_frames, interpolated_count


def moving_square(count=12, height=64, width=96, step=4):
    frames = np.zeros((count, height, width, 3), np.float32)
    frames[..., 2] = 0.2
    for i in range(count):
        frames[i, 20:36, 8 + step * i : 24 + step * i] = (1.0, 0.8, 0.1)
    return frames


@pytest.mark.parametrize(
    ("fmt", "fps"), [("mp4", 8.0), ("mp4", 12.5), ("webm", 24.0), ("gif", 8.0), ("webp", 10.0)]
)
def test_saved_file_decodes_with_its_frames_size_and_fps(tmp_path, fmt, fps):
    frames = moving_square()
    saved = save_video(frames, tmp_path, "video/clip", fps=fps, fmt=fmt, metadata={"comment": "seed 1"})
    assert saved.filename == f"clip_00001_.{fmt}" and saved.subfolder == "video"
    assert saved.ui_entry() == {"filename": saved.filename, "subfolder": "video", "type": "output"}
    decoded = read_video(saved.path)
    assert (decoded.frame_count, decoded.width, decoded.height) == (12, 96, 64)
    assert decoded.fps == pytest.approx(fps, rel=0.01)
    # Lossy, but the picture survives: the square is where it was drawn.
    square = decoded.frames[5, 22:34, 30:42].astype(np.float32) / 255
    assert square[..., 0].mean() > 0.8 and decoded.frames[5, 50:60, 70:90, 2].mean() / 255 == pytest.approx(
        0.2, abs=0.08
    )


def test_save_path_follows_comfyui_counters(tmp_path):
    (tmp_path / "video").mkdir()
    for name in ("clip_00004_.png", "clip_00002_.mp4", "clipper_00009_.mp4", "clip_notes.txt"):
        (tmp_path / "video" / name).write_bytes(b"")
    target = save_path("video/clip", tmp_path)
    assert (target.counter, target.filename, target.subfolder) == (5, "clip", "video")  # any extension counts
    assert target.file("webm").endswith("video/clip_00005_.webm")
    assert (
        save_path("new/sub/clip_%width%x%height%", tmp_path, 96, 64)
        .file("mp4")
        .endswith("new/sub/clip_96x64_00001_.mp4")
    )
    with pytest.raises(SaveOutsideOutputError):
        save_path("../escape", tmp_path)


def test_odd_sizes_and_bad_values(tmp_path):
    path = write_video(moving_square(4, 63, 95), tmp_path / "odd.mp4", 8)
    assert (read_video(path).width, read_video(path).height) == (96, 64)  # yuv420p: padded to even
    with pytest.raises(ValueError, match="format"):
        write_video(moving_square(2), tmp_path / "x.avi", 8, fmt="avi")
    with pytest.raises(ValueError, match="fps"):
        write_video(moving_square(2), tmp_path / "x.mp4", 0)


@pytest.mark.parametrize(("multiplier", "loop"), [(2, False), (4, False), (2, True)])
def test_interpolation_multiplies_the_frames(multiplier, loop):
    frames = moving_square(8, step=6)
    out = interpolate_frames(frames, multiplier, loop)
    expected = 8 * multiplier if loop else 7 * multiplier + 1
    assert len(out) == expected == interpolated_count(8, multiplier, loop)
    assert out.shape[1:] == frames.shape[1:] and out.dtype == np.float32
    assert np.array_equal(out[multiplier], frames[1])  # originals stay in place


def test_interpolated_frame_is_in_between():
    frames = moving_square(2, step=8)
    middle = interpolate_frames(frames, 2)[1]

    def centre_x(image):
        ys, xs = np.nonzero(image[..., 0] > 0.5)
        return xs.mean()

    assert centre_x(middle) == pytest.approx((centre_x(frames[0]) + centre_x(frames[1])) / 2, abs=1.0)
    assert middle[..., 0].max() > 0.9  # moved, not cross-faded (a cross-fade would peak at 0.5 per copy)
