"""The shipped pose + depth ControlNet workflow, described for ``layout.py`` (beside ``definitions.py``).

One reference photo becomes a DWPose pose map and a Depth Anything depth map (CharForge/Guide); each feeds its
own ComfyUI Apply ControlNet (Advanced), chained, so the character LoRA's image follows both the pose and the
depth of the reference.
"""

from __future__ import annotations

from definitions import SD_SAMPLING, _generation, sample, save_image


def controlnet_pose_depth(new):
    w = new("controlnet_pose_depth")
    w.note(
        "POSE + DEPTH CONTROLNETS + CHARACTER LoRA - the character in the pose and depth of a reference photo.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Checkpoint / Character LoRA: base model and models/loras/<your LoRA>.safetensors.\n"
        "- Load Image (reference): a photo of someone in the wanted pose. Pose Map draws its skeleton (body,\n"
        "  hands, face) in OpenPose colours; Depth Map makes its depth (near = white).\n"
        "- The two Apply ControlNet nodes are chained: pose at 0.8, depth at 0.5, both ending at 0.8 so the\n"
        "  LoRA's face comes through in the last steps.\n\n"
        "MODELS\n"
        "checkpoints/ (SD1.5 base), loras/ (character LoRA), controlnet/ (control_v11p_sd15_openpose,\n"
        "control_v11f1p_sd15_depth), dwpose/ (yolox_l.onnx, dw-ll_ucoco_384.onnx), depth_anything/<folder>\n"
        "(a Depth Anything folder from the Hugging Face hub, e.g. Depth-Anything-V2-Small-hf).\n\n"
        "RESULT\n"
        "output/charforge/pose_depth_*.png; both maps are previewed.")
    ckpt, lora, pos, neg, latent = _generation(w, ckpt="v1-5-pruned-emaonly.safetensors",
                                               lora="my_character.safetensors", batch=1)
    w.group("3 - Reference -> pose and depth maps", "#a1309b")
    image = w.node("LoadImage", title="Load Image (reference)", height=320, image="example.png")
    pose = w.node("CharForgePoseMap", body=True, hands=True, face=True)
    depth = w.node("CharForgeDepthMap", model="Depth-Anything-V2-Small-hf", resolution=518)
    w.link(image, "IMAGE", pose, "images")
    w.link(image, "IMAGE", depth, "images")
    maps = ((pose, "pose_map"), (depth, "depth_map"))
    for (node, output), title in zip(maps, ("Pose map", "Depth map"), strict=True):
        preview = w.node("PreviewImage", title=title, height=260)
        w.link(node, output, preview, "images")
    w.group("4 - Two ControlNets & sample", "#b58b2a")
    positive, negative = (pos, "CONDITIONING"), (neg, "CONDITIONING")
    for (node, output), name, strength in zip(maps, ("control_v11p_sd15_openpose.pth",
                                                     "control_v11f1p_sd15_depth.pth"), (0.8, 0.5), strict=True):
        loader = w.node("ControlNetLoader", control_net_name=name)
        apply = w.node("ControlNetApplyAdvanced", title=f"Apply ControlNet ({name.split('_')[2]})",
                       strength=strength, start_percent=0.0, end_percent=0.8)
        w.link(positive[0], positive[1], apply, "positive")
        w.link(negative[0], negative[1], apply, "negative")
        w.link(loader, "CONTROL_NET", apply, "control_net")
        w.link(node, output, apply, "image")
        w.link(ckpt, "VAE", apply, "vae")
        positive, negative = (apply, "positive"), (apply, "negative")
    _, decode = sample(w, (lora, "MODEL"), positive, negative, latent, (ckpt, "VAE"), **SD_SAMPLING)
    save_image(w, (decode, "IMAGE"), "charforge/pose_depth")
    return w


BUILDERS = (controlnet_pose_depth,)
