"""Face-driven motion node (menu: CharForge/Video): a driving video's face as ControlNet control frames.

Face Motion from Video reads a driving video from ComfyUI's input folder (or takes IMAGE frames), tracks the face
with the Load Face Models pack (its detector and landmark models), and returns white-dot face maps of the output
size for ComfyUI's own Load ControlNet Model / Apply ControlNet (Advanced), the driving frames at the same size for
video to video, the frame rate, and a per-frame head-pose table. The work is ``charforge.engine.video.face_motion``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import bridge
from ..deps import require
from .convert import input_files, resolve_input_file

CATEGORY = "CharForge/Video"
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif", ".webp")
NO_VIDEO = "(no video files in the input folder)"
# Kept import-free (the engine module imports numpy); tests/nodes/test_video_face.py checks they match.
LANDMARKS = ("auto", "68", "106", "5")
STYLES = ("dots", "lines")


def video_choices() -> list[str]:
    """Video files in ComfyUI's input folder and its subfolders (as ``sub/name.mp4``)."""
    return input_files(VIDEO_SUFFIXES, NO_VIDEO)


def resolve_video(name: str) -> str:
    return resolve_input_file(
        name,
        NO_VIDEO,
        "driving video",
        "no driving video chosen: put a video of a face (mp4, webm, mov, gif) into ComfyUI's input folder {root} "
        "and reload the page, then pick it (or connect frames from a video loader to 'frames')",
    )


class FaceMotion:
    """Face landmarks and head pose of a driving video as ControlNet control frames."""

    DESCRIPTION = (
        "Tracks the face of a driving video (talking, expressions, head turns) with the face models' detector and "
        "landmark models (buffalo_l: 68 3D points from 1k3d68.onnx, 106 from 2d106det.onnx; else the detector's 5), "
        "smooths the track, fills frames without a face from their neighbours (listed in info), and draws each "
        "frame as white dots on black (OpenPose face style) at the output size. Feed control_frames to Generate "
        "Video's control_frames (or ComfyUI's Apply ControlNet) with a face / openpose-face ControlNet; driving_frames "
        "are the video at the same size for video to video. With a character image, the driving face is moved and scaled onto the character's face."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "IMAGE", "FLOAT", "INT", "STRING", "STRING")
    RETURN_NAMES = ("control_frames", "driving_frames", "fps", "frames", "pose_table", "info")
    OUTPUT_TOOLTIPS = (
        "One face map per frame: white landmark dots (and contours with style 'lines') on black.",
        "The driving video's frames at the output size (for VAE Encode, video to video).",
        "Frame rate of the frames (the video's, divided by frame_step).",
        "Number of frames.",
        "Per frame: source (detected / interpolated / held), yaw, pitch, roll in degrees, face box.",
        "Frames, landmark count, frames without a face.",
    )
    FUNCTION = "track"

    @classmethod
    def INPUT_TYPES(cls):
        files = video_choices()
        return {
            "required": {
                "face_models": (
                    "CHARFORGE_FACE_MODELS",
                    {
                        "tooltip": "From Load Face Models: the pack whose detector and landmark models track the face."
                    },
                ),
                "video": (
                    files,
                    {
                        "default": files[0],
                        "tooltip": "The driving video in ComfyUI's input folder (ignored when frames is connected).",
                    },
                ),
                "width": (
                    "INT",
                    {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Output width."},
                ),
                "height": (
                    "INT",
                    {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Output height."},
                ),
                "max_frames": (
                    "INT",
                    {
                        "default": 16,
                        "min": 0,
                        "max": 4096,
                        "tooltip": "Frames to use from the start; 0 = all.",
                    },
                ),
                "frame_step": (
                    "INT",
                    {
                        "default": 1,
                        "min": 1,
                        "max": 30,
                        "tooltip": "Use every n-th frame (2 halves the frame rate).",
                    },
                ),
                "landmarks": (
                    list(LANDMARKS),
                    {
                        "default": "auto",
                        "tooltip": "Points per face: auto takes the best the pack has (68 3D, 106, then the "
                        "detector's 5).",
                    },
                ),
                "style": (
                    list(STYLES),
                    {
                        "default": "dots",
                        "tooltip": "dots: OpenPose face style; lines: also the 68-point contours.",
                    },
                ),
                "smoothing_hz": (
                    "FLOAT",
                    {
                        "default": 1.5,
                        "min": 0.0,
                        "max": 30.0,
                        "step": 0.1,
                        "tooltip": "One-Euro minimum cutoff: lower = steadier, 0 = no smoothing. Run forwards and "
                        "backwards, so a steady motion is not delayed.",
                    },
                ),
                "smoothing_beta": (
                    "FLOAT",
                    {
                        "default": 0.05,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "How much a fast motion opens the filter (per pixel per second).",
                    },
                ),
            },
            "optional": {
                "frames": ("IMAGE", {"tooltip": "Driving frames instead of the video file."}),
                "frames_fps": (
                    "FLOAT",
                    {"default": 8.0, "min": 1.0, "max": 120.0, "tooltip": "Frame rate of connected frames."},
                ),
                "character_image": (
                    "IMAGE",
                    {
                        "tooltip": "The character's face at the output framing: the driving face's median box is "
                        "moved and scaled onto the face found here."
                    },
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, video, frames=None, **_):
        if frames is not None:
            return ""
        try:
            stat = os.stat(resolve_video(video))
        except (OSError, ValueError):
            return float("nan")
        return f"{stat.st_mtime_ns}-{stat.st_size}"

    def track(
        self,
        face_models,
        video,
        width,
        height,
        max_frames,
        frame_step,
        landmarks,
        style,
        smoothing_hz,
        smoothing_beta,
        frames=None,
        frames_fps=8.0,
        character_image=None,
        unique_id=None,
    ):
        np = require("numpy")
        torch = require("torch")
        from ..engine.faces import as_rgb_uint8
        from ..engine.video.face_motion import (
            FaceLandmarker,
            cover_frames,
            read_driving_video,
            render_track,
            retarget,
            track_faces,
        )

        if frames is not None:
            driving = (frames.detach().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)[::frame_step]
            if max_frames:
                driving = driving[:max_frames]
            fps, source = float(frames_fps) / frame_step, "connected frames"
        else:
            require("av")
            path = resolve_video(video)
            driving, fps = read_driving_video(path, int(max_frames), int(frame_step))
            source = Path(path).name
            if fps <= 0:
                fps = float(frames_fps)
        landmarker = FaceLandmarker.for_analyzer(face_models)
        control = bridge.control(len(driving) + 1, node_id=unique_id, label="face motion")
        track = track_faces(
            driving, fps, landmarker, landmarks, float(smoothing_hz), float(smoothing_beta), control=control
        )
        face_box = None
        if character_image is not None:
            reference = cover_frames(
                as_rgb_uint8(character_image[0].detach().cpu().numpy())[None], width, height
            )[0]
            faces = landmarker.analyzer.detect(reference)
            if not faces:
                raise ValueError(
                    "no face found in character_image: give a picture of the character's face framed as the clip "
                    "should be, or disconnect it to keep the driving video's framing"
                )
            face_box = faces[0].box
        placed = retarget(track, int(width), int(height), face_box)
        maps = render_track(placed, style, control)
        control.progress(len(driving) + 1)
        resized = cover_frames(driving, int(width), int(height))
        info = f"{source}: {track.summary()}; drawn at {width}x{height}" + (
            " on the character's face" if face_box is not None else ""
        )
        return (
            torch.from_numpy(maps.astype(np.float32) / 255.0),
            torch.from_numpy(resized.astype(np.float32) / 255.0),
            float(fps),
            len(driving),
            track.table(),
            info,
        )


NODE_CLASS_MAPPINGS = {"CharForgeFaceMotion": FaceMotion}
NODE_DISPLAY_NAME_MAPPINGS = {"CharForgeFaceMotion": "Face Motion from Video (CharForge)"}
