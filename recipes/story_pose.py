"""Scenes' pose images in ``charforge story``: a scene with a ``pose`` image gets a pose ControlNet in every mode.

The frame adds LoadImage (the pose photo, uploaded to the server's input folder) -> CharForge's Pose Map (DWPose)
-> ComfyUI's ControlNetLoader + ControlNetApplyAdvanced on the prompt and negative conditioning, when the server
has the nodes, a pose ControlNet of the checkpoint's family (a ``models/controlnet`` file whose name holds
"openpose" or "pose") and DWPose's two ONNX files (which no node input lists: CharForge's model listing route
tells); else the poses are ignored with a note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from charforge.driver.client import ComfyClient
from charforge.driver.errors import DriverError

from .story_guidance import FAMILY_NAMES, Offer, name_family

POSE_NODES = ("LoadImage", "CharForgePoseMap", "ControlNetLoader", "ControlNetApplyAdvanced")
DWPOSE_FILES = ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")  # engine/guide/pose.py DETECTOR_FILE, POSE_FILE


def server_model_files(client: ComfyClient, kind: str) -> list[str] | None:
    """The files of model folder `kind` the server lists (CharForge's model listing route), or None when it
    cannot say (no CharForge routes, or one that does not list this folder)."""
    from charforge.driver.sync import call
    from charforge.driver.sync._http import path, request_json

    async def listing(async_client: Any) -> Any:
        _, answer = await request_json(async_client, "GET", path("models"), params={"kinds": kind})
        return answer or {}

    try:
        answer = call(client, listing)
    except DriverError:
        return None
    entries = (answer.get("models") or {}).get(kind)
    return None if entries is None else [str(e.get("name", "")) for e in entries]


@dataclass
class PoseSupport:
    """Whether frames can follow a scene's pose: the pose ControlNet file, or why not."""

    controlnet: str = ""
    why_not: str = ""
    strength: float = 0.8

    def record(self) -> dict[str, Any]:
        return {"controlnet": self.controlnet, "strength": self.strength, "map": "CharForgePoseMap (DWPose)"}


def pose_support(offer: Offer, dwpose_files: list[str] | None) -> PoseSupport:
    """A pose ControlNet of the checkpoint's family ("openpose" or "pose" in its name) and DWPose's files."""
    missing = [n for n in POSE_NODES if n not in offer.info]
    if missing:
        return PoseSupport(why_not=f"the server lacks the node(s) {', '.join(missing)}")
    files = [c for c in offer.files("ControlNetLoader", "control_net_name") if "pose" in c.lower()]
    fitting = [c for c in files if name_family(c) == offer.family and offer.family is not None]
    untold = [c for c in files if name_family(c) is None and "instantid" not in c.lower()]
    chosen = (sorted(fitting, key=lambda c: "openpose" not in c.lower()) or untold or [""])[0]
    if not chosen:
        others = ", ".join(files)
        return PoseSupport(
            why_not="no pose ControlNet for the checkpoint's family "
            f"({FAMILY_NAMES.get(offer.family or '', 'unknown')}) in the server's models/controlnet (a file "
            f"whose name holds 'openpose' or 'pose'{'; of another family: ' + others if others else ''})"
        )
    if dwpose_files is None:
        return PoseSupport(
            why_not="the server does not list its models/dwpose folder (an older CharForge pack): pose maps "
            "need DWPose's " + " and ".join(DWPOSE_FILES)
        )
    absent = [f for f in DWPOSE_FILES if not any(PurePosixPath(n).name == f for n in dwpose_files)]
    if absent:
        return PoseSupport(
            why_not=f"pose maps need DWPose's {' and '.join(absent)} in the server's models/dwpose"
        )
    return PoseSupport(controlnet=chosen)


def plan_poses(run: Any, offer: Offer, poses: list[int]) -> None:
    """`run.pose` for the scenes `poses` (indices) and, when it can be used, their photos uploaded into
    `run.pose_images`; notes which scenes follow a pose or why they do not."""
    if run.flow is not None:
        support = PoseSupport(
            why_not=f"pose ControlNets are used with SD1.5/SDXL bases, not {run.flow.family}"
        )
    else:
        dwpose = None if "CharForgePoseMap" not in run.info else server_model_files(run.client, "dwpose")
        support = pose_support(offer, dwpose)
    run.pose = support
    scenes = ", ".join(str(i + 1) for i in poses)
    if support.controlnet:
        for i in poses:
            path = Path(run.scenes[i].pose).expanduser()
            uploaded = run.client.upload(
                path,
                filename=f"{run.run_id}_pose_{i + 1:02d}{path.suffix.lower()}",
                subfolder="charforge_story",
                overwrite=True,
            )
            run.pose_images[i] = uploaded.reference
        run.note(f"scene(s) {scenes} follow their pose image (Pose Map -> {support.controlnet})")
    else:
        run.note(f"the pose image(s) of scene(s) {scenes} are ignored: {support.why_not}")


def add_pose(
    add: Callable[..., list],
    support: PoseSupport,
    pose_image: str,
    positive: list,
    negative: list,
    vae: list,
) -> tuple[list, list]:
    """LoadImage(pose photo) -> Pose Map -> ControlNetApplyAdvanced with the pose ControlNet; (positive,
    negative) conditioning sockets."""
    photo = add("40", "LoadImage", "Pose reference", image=pose_image)
    pose_map = add("41", "CharForgePoseMap", "Pose map", images=photo, body=True, hands=True, face=True)
    control = add("42", "ControlNetLoader", "Pose ControlNet", control_net_name=support.controlnet)
    add(
        "43",
        "ControlNetApplyAdvanced",
        "Follow the scene's pose",
        positive=positive,
        negative=negative,
        control_net=control,
        image=pose_map,
        strength=support.strength,
        start_percent=0.0,
        end_percent=1.0,
        vae=vae,
    )
    return ["43", 0], ["43", 1]


def pose_notes(scenes: list, support: PoseSupport | None, uploaded: dict[int, str]) -> list[str]:
    posed = [i for i, scene in enumerate(scenes) if getattr(scene, "pose", "")]
    if not posed or support is None:
        return []
    listed = ", ".join(str(i + 1) for i in posed)
    if uploaded:
        return [f"frame(s) {listed} follow their scene's pose image (Pose Map -> {support.controlnet})"]
    return [f"the pose image(s) of scene(s) {listed} were ignored: {support.why_not}"]
