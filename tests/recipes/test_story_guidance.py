"""``charforge story`` reference guidance on CharForge's own guide nodes, pose scenes and the per-kind ablation.

Detection from /object_info (adapter files told apart by their published names, files of another family than
the checkpoint's never picked, clear errors naming the folder and file), the graphs (node types and wiring
against the real nodes' input declarations, served by the fake ComfyUI of test_story.py), the metadata's
wording and the ablation's rows when reference mode runs once per kind (``--guidance all``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from aiohttp import web
from fakes.comfy_server import NodeDef
from PIL import Image

from cf_testing.cli import run_charforge as run_cli
from charforge.driver.errors import UsageError
from charforge.engine.story import load_scenes
from charforge.recipes import story_guidance as sg
from charforge.recipes import story_pose as sp

_spec = importlib.util.spec_from_file_location("_story_fakes_g", Path(__file__).with_name("test_story.py"))
assert _spec is not None and _spec.loader is not None
story_fakes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(story_fakes)

SCENES = story_fakes.SCENES
DWPOSE = [{"name": "yolox_l.onnx"}, {"name": "dw-ll_ucoco_384.onnx"}]


def _info(files=(), vision=(), controlnets=(), nodes=()) -> dict:
    """An /object_info with CharForge's guide nodes, the given model lists and the stock img2img nodes."""
    info: dict = {
        n: {"input": {"required": {}}} for n in ("LoadImage", "VAEEncode", "RepeatLatentBatch", *nodes)
    }
    info[sg.LOAD_ADAPTER] = {"input": {"required": {"ipadapter_name": [list(files)]}}}
    info["CLIPVisionLoader"] = {"input": {"required": {"clip_name": [list(vision)]}}}
    info["ControlNetLoader"] = {"input": {"required": {"control_net_name": [list(controlnets)]}}}
    for node in (sg.APPLY_ADAPTER, sg.APPLY_FACEID):
        info[node] = {"input": {"required": {}}}
    return info


def test_adapter_files_are_told_apart_by_their_published_names():
    kinds = {
        name: (a.variant, a.family) if (a := sg.classify_adapter(name)) else None
        for name in (
            "ip-adapter_sd15.safetensors",
            "ip-adapter-plus_sd15.safetensors",
            "ip-adapter-plus-face_sdxl_vit-h.safetensors",
            "ip-adapter-full-face_sd15.safetensors",
            "ip-adapter-faceid_sd15.bin",
            "ip-adapter-faceid-plusv2_sdxl.bin",
            "ip-adapter-faceid-portrait_sd15.bin",
            "ip-adapter.bin",
            "notes.txt",
        )
    }
    assert kinds == {
        "ip-adapter_sd15.safetensors": ("base", "sd15"),
        "ip-adapter-plus_sd15.safetensors": ("plus", "sd15"),
        "ip-adapter-plus-face_sdxl_vit-h.safetensors": ("plus_face", "sdxl"),
        "ip-adapter-full-face_sd15.safetensors": ("full_face", "sd15"),
        "ip-adapter-faceid_sd15.bin": ("faceid", "sd15"),
        "ip-adapter-faceid-plusv2_sdxl.bin": ("faceid_plus", "sdxl"),
        "ip-adapter-faceid-portrait_sd15.bin": None,  # no node here takes FaceID Portrait
        "ip-adapter.bin": ("instantid", "sdxl"),  # InstantID's adapter as published
        "notes.txt": None,
    }
    assert sg.classify_adapter("ip-adapter_sdxl.safetensors").vision == "bigg"
    assert sg.classify_adapter("ip-adapter_sdxl_vit-h.safetensors").vision == "h"
    assert sg.checkpoint_family("sd_xl_base_1.0.safetensors", "")[0] == "sdxl"
    assert sg.checkpoint_family("anything.safetensors", "sd15") == ("sd15", "SD1.5 (read from the model)")
    assert sg.checkpoint_family("my_model.safetensors", "")[0] is None


def test_auto_picks_the_strongest_kind_of_the_checkpoints_family_and_says_why():
    files = [
        "ip-adapter_sd15.safetensors",
        "ip-adapter-plus-face_sd15.safetensors",
        "ip-adapter-faceid_sdxl.bin",
        "ip-adapter-faceid_sd15.bin",
    ]
    vision = ["CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"]
    offer = sg.Offer(_info(files, vision), "sd15", identity={"name": "anna"})
    (auto,) = sg.choose_guidance(offer, "auto")
    assert (auto.kind, auto.ipadapter_file) == ("faceid", "ip-adapter-faceid_sd15.bin")
    assert auto.reason.startswith("FaceID (ip-adapter-faceid_sd15.bin): identity 'anna'")
    assert "instantid: InstantID is made for SDXL bases" in auto.reason  # why nothing stronger
    kinds = sg.choose_guidance(offer, "all")
    assert [g.kind for g in kinds] == ["faceid", "ipadapter", "img2img"]
    image = kinds[1]  # the plus-face file beats the base one; ViT-H for an SD1.5 file, not bigG
    assert (image.ipadapter_file, image.clip_vision) == (
        "ip-adapter-plus-face_sd15.safetensors",
        "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    )
    # an SDXL checkpoint gets the SDXL FaceID file; no SDXL image adapter is there, so none is picked
    sdxl = sg.Offer(_info(files, vision), "sdxl", identity={"folder": "x", "source": "/photos"})
    assert [(g.kind, g.ipadapter_file) for g in sg.choose_guidance(sdxl, "all")] == [
        ("faceid", "ip-adapter-faceid_sdxl.bin"),
        ("img2img", ""),
    ]
    with pytest.raises(UsageError) as err:
        sg.choose_guidance(sdxl, "ipadapter")
    assert "models/ipadapter" in str(err.value) and "ip-adapter-plus-face_sd15.safetensors (SD1.5)" in str(
        err.value
    )


def test_explicit_kinds_fail_with_the_folder_and_file_to_put_in_place():
    bare = sg.Offer(_info(), "sd15", identity={"name": "anna"})
    with pytest.raises(
        UsageError, match=r"--guidance faceid: no FaceID file .*ip-adapter-faceid_sd15\.bin.*"
    ):
        sg.choose_guidance(bare, "faceid")
    no_vision = sg.Offer(_info(["ip-adapter_sd15.safetensors"]), "sd15")
    with pytest.raises(UsageError, match=r"CLIP-ViT-H-14.*models/clip_vision"):
        sg.choose_guidance(no_vision, "ipadapter")
    with pytest.raises(UsageError, match="lacks the node"):
        sg.choose_guidance(sg.Offer({"LoadImage": {}}, "sd15"), "faceid")
    with pytest.raises(UsageError, match="InstantID is made for SDXL"):
        sg.choose_guidance(bare, "instantid")
    with pytest.raises(UsageError, match="not in the server's models/ipadapter"):
        sg.choose_guidance(bare, "faceid", ipadapter_file="missing.bin")
    for bad in ("sometimes", "all,faceid", ""):
        with pytest.raises(UsageError, match="--guidance takes"):
            sg.parse_kinds(bad)
    assert sg.parse_kinds("faceid, img2img") == ["faceid", "img2img"]


def test_pose_support_needs_a_pose_controlnet_of_the_family_and_dwpose():
    nodes = ("CharForgePoseMap", "ControlNetApplyAdvanced")
    controlnets = [
        "thibaud_xl_openpose.safetensors",
        "control_v11p_sd15_openpose.pth",
        "control_sd15_depth.pth",
    ]
    offer = sg.Offer(_info(controlnets=controlnets, nodes=nodes), "sd15")
    dwpose = [d["name"] for d in DWPOSE]
    assert sp.pose_support(offer, dwpose).controlnet == "control_v11p_sd15_openpose.pth"
    assert "dw-ll_ucoco_384.onnx" in sp.pose_support(offer, ["yolox_l.onnx"]).why_not
    assert "does not list its models/dwpose" in sp.pose_support(offer, None).why_not
    sd15_only = sg.Offer(_info(controlnets=controlnets[1:], nodes=nodes), "sdxl")
    why = sp.pose_support(sd15_only, dwpose).why_not
    assert (
        "no pose ControlNet for the checkpoint's family (SDXL)" in why and "control_v11p_sd15_openpose" in why
    )
    assert (
        "CharForgePoseMap"
        in sp.pose_support(sg.Offer(_info(controlnets=controlnets), "sd15"), dwpose).why_not
    )


def test_faceid_and_pose_graph_wiring():
    guidance = sg.Guidance("faceid", "ip-adapter-faceid_sd15.bin")
    pose = sp.PoseSupport(controlnet="control_v11p_sd15_openpose.pth")
    graph = story_fakes.tiny_frame_graph(
        mode="reference",
        identity={"folder": "refs"},
        guidance=guidance,
        ipadapter_weight=0.6,
        pose_image="charforge_story/run_pose_01.png",
        pose=pose,
    )
    kinds = {k: v["class_type"] for k, v in graph.items()}
    assert kinds["31"] == "CharForgeLoadIPAdapter" and kinds["33"] == "CharForgeApplyIPAdapterFaceID"
    faceid = graph["33"]["inputs"]
    assert faceid["model"] == ["20", 0] and faceid["ipadapter"] == ["31", 0] and faceid["weight"] == 0.6
    assert faceid["identity"] == ["9", 0] and kinds["9"] == "CharForgeBuildIdentity"
    assert graph["6"]["inputs"]["model"] == ["33", 0] and "30" not in graph  # FaceID needs no guide image
    assert [kinds[k] for k in ("40", "41", "42", "43")] == [
        "LoadImage",
        "CharForgePoseMap",
        "ControlNetLoader",
        "ControlNetApplyAdvanced",
    ]
    control = graph["43"]["inputs"]
    assert (
        control["positive"] == ["3", 0] and control["negative"] == ["4", 0] and control["image"] == ["41", 0]
    )
    assert control["control_net"] == ["42", 0] and control["vae"] == ["1", 2]
    assert graph["6"]["inputs"]["positive"] == ["43", 0] and graph["6"]["inputs"]["negative"] == ["43", 1]
    assert graph["41"]["inputs"]["images"] == ["40", 0]


def test_scene_pose_images_are_read_relative_to_the_scene_file(tmp_path):
    path = tmp_path / "story" / "scenes.yaml"
    path.parent.mkdir()
    path.write_text("scenes:\n  - prompt: a portrait\n  - {prompt: waving, pose: poses/wave.png}\n")
    scenes = load_scenes(path)
    assert scenes[0].pose == "" and scenes[1].pose == str(path.parent / "poses" / "wave.png")
    assert scenes[1].to_dict() == {"prompt": "waving", "caption": "waving", "pose": scenes[1].pose}
    assert "pose" not in scenes[0].to_dict()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "pose": 3}]))
    with pytest.raises(ValueError, match="'pose' must be the path of an image"):
        load_scenes(bad)


async def _pose_map(ctx, images, body, hands, face, **_):
    return (images,), None


async def _controlnet(ctx, control_net_name):
    return (f"CN:{control_net_name}",), None


async def _apply_controlnet(
    ctx, positive, negative, control_net, image, strength, start_percent, end_percent, **_
):
    return (f"{positive}+{control_net}", f"{negative}+{control_net}"), None


def _pose_nodes() -> list[NodeDef]:
    from charforge.nodes.guide_maps import PoseMap

    declared = PoseMap.INPUT_TYPES()
    strength = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01})
    percent = ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001})
    return [
        NodeDef(
            "CharForgePoseMap",
            declared["required"],
            hidden=declared["hidden"],
            outputs=PoseMap.RETURN_TYPES,
            run=_pose_map,
        ),
        NodeDef(
            "ControlNetLoader",
            {"control_net_name": (["control_v11p_sd15_openpose.pth", "thibaud_xl_openpose.safetensors"],)},
            outputs=("CONTROL_NET",),
            run=_controlnet,
        ),
        NodeDef(
            "ControlNetApplyAdvanced",
            {
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "control_net": ("CONTROL_NET",),
                "image": ("IMAGE",),
                "strength": strength,
                "start_percent": percent,
                "end_percent": percent,
            },
            optional={"vae": ("VAE",)},
            outputs=("CONDITIONING", "CONDITIONING"),
            run=_apply_controlnet,
        ),
    ]


async def _models_listing(request):
    kinds = request.query.get("kinds", "").split(",")
    return web.json_response({"models": {k: DWPOSE if k == "dwpose" else [] for k in kinds}})


@pytest.fixture
def refs(tmp_path) -> Path:
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 30 * i, 10)).save(folder / f"ref{i}.png")
    return folder


def _scenes(tmp_path, pose: bool) -> Path:
    Image.new("RGB", (40, 40), (10, 200, 10)).save(tmp_path / "wave.png")
    items = [{"prompt": s, **({"pose": "wave.png"} if pose and i == 2 else {})} for i, s in enumerate(SCENES)]
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps(items))
    return path


def _run(tmp_path, server, scenes, refs, *extra):
    return run_cli(
        "story", "She sails.", "--server", server.url, "--scenes", str(scenes), "--lora", "hero.safetensors",
        "--reference", str(refs), "--candidates", "2", "--seed", "7", "--retries", "0", "--out",
        str(tmp_path / "out"), *extra,
    )  # fmt: skip


def test_guidance_all_runs_reference_once_per_kind_with_poses_and_ablation_rows(tmp_path, refs):
    out = tmp_path / "out"
    server = story_fakes.StoryServer(
        ipadapter=True, extra_routes=(("GET", "/charforge/transfer/models", _models_listing),)
    )
    server.nodes.update({n.name: n for n in _pose_nodes()})
    with server:
        code, stdout, stderr = _run(tmp_path, server, _scenes(tmp_path, pose=True), refs, "--guidance", "all")
        prompts = server.prompts()
        uploaded_pose = [
            p.name for p in (server.input_dir / "charforge_story").iterdir() if "_pose_" in p.name
        ]
    assert code == 0, stderr
    assert len(prompts) == 30 and len(uploaded_pose) == 1  # simple, 3 reference kinds, base: 6 frames each
    boards = [prompts[i : i + 6] for i in range(0, 30, 6)]
    simple, faceid, ipadapter, img2img, base = boards
    for board in boards:  # the same scenes and seeds in every storyboard; scene 3 posed in each
        assert [p["6"]["inputs"]["seed"] for p in board] == list(range(7, 13))
        assert [("43" in p) for p in board] == [False, False, True, False, False, False]
        assert board[2]["6"]["inputs"]["positive"] == ["43", 0]
        assert board[2]["42"]["inputs"]["control_net_name"] == "control_v11p_sd15_openpose.pth"  # SD1.5's
    assert all(p["33"]["class_type"] == "CharForgeApplyIPAdapterFaceID" for p in faceid)  # every frame
    assert all(p["33"]["inputs"]["identity"] == ["9", 0] for p in faceid)
    assert faceid[0]["31"]["inputs"]["ipadapter_name"] == "ip-adapter-faceid_sd15.bin"
    # IP-Adapter: frame 1 by the first reference photo, frames 2+ by frame 1 (both selected against it)
    assert ipadapter[0]["30"]["inputs"]["image"] == "charforge_story/hero_refs/ref0.png"
    assert ipadapter[0]["33"]["class_type"] == "CharForgeApplyIPAdapter"
    assert all("_reference_ipadapter_frame_01" in p["30"]["inputs"]["image"] for p in ipadapter[1:])
    assert "30" not in img2img[0] and all(p["34"]["class_type"] == "VAEEncode" for p in img2img[1:])
    assert all("33" not in p for p in simple + base + img2img)

    expected = {
        "reference/faceid": (
            "faceid",
            "FaceID (ip-adapter-faceid_sd15.bin): identity from the reference photos",
        ),
        "reference/ipadapter": ("ipadapter", "IP-Adapter plus-face (ip-adapter-plus-face_sd15.safetensors"),
        "reference/img2img": ("img2img", "image-to-image from frame 1"),
    }
    for key, (kind, reason) in expected.items():
        data = json.loads((out / key / "metadata.json").read_text())
        assert data["name"] == key and data["guidance"] == kind and data["mode"] == "reference"
        assert data["models"]["guidance"]["kind"] == kind and data["models"]["guidance"]["reason"].startswith(
            reason
        )
        assert any(
            n.startswith(f"{'every frame' if kind == 'faceid' else 'frames'} guided by {reason}")
            for n in data["notes"]
        )
        assert data["models"]["pose"]["controlnet"] == "control_v11p_sd15_openpose.pth"
        assert [f["pose"] for f in data["frames"]] == ["", "", "wave.png", "", "", ""]
    faceid_frames = json.loads((out / "reference/faceid/metadata.json").read_text())["frames"]
    assert [f["guidance"] for f in faceid_frames] == ["faceid"] * 6
    ablation = json.loads((out / "ablation.json").read_text())
    assert [r["mode"] for r in ablation["modes"]] == [
        "simple",
        "reference/faceid",
        "reference/ipadapter",
        "reference/img2img",
        "base",
    ]
    markdown = (out / "ablation.md").read_text()
    assert "| reference-guided: IP-Adapter FaceID (the character's identity) | 6 | 6 |" in markdown
    assert "| reference-guided: image-to-image from frame 1 | 6 | 6 |" in markdown
    summary = json.loads((out / "metadata.json").read_text())
    assert summary["storyboards"]["reference/faceid"] == "reference/faceid/metadata.json"
    assert summary["scenes"][2]["pose"].endswith("wave.png") and "reference/faceid" in stdout


def test_without_a_pose_controlnet_the_pose_is_ignored_with_a_note(tmp_path, refs):
    with story_fakes.StoryServer() as server:
        code, _, stderr = _run(
            tmp_path, server, _scenes(tmp_path, pose=True), refs, "--mode", "simple", "--no-base"
        )
        prompts = server.prompts()
    assert code == 0, stderr
    assert all("43" not in p for p in prompts) and "are ignored: the server lacks the node(s)" in stderr
    data = json.loads((tmp_path / "out" / "simple" / "metadata.json").read_text())
    assert "pose" not in data["models"] and [f["pose"] for f in data["frames"]] == [""] * 6
    assert any("the pose image(s) of scene(s) 3 were ignored: the server lacks" in n for n in data["notes"])
    # auto on a server without adapters: img2img, and the reason says what stronger kinds lack
    with story_fakes.StoryServer() as server:
        code, _, stderr = _run(
            tmp_path, server, _scenes(tmp_path, pose=False), refs, "--mode", "reference", "--no-base"
        )
    assert code == 0, stderr
    guidance = json.loads((tmp_path / "out" / "reference" / "metadata.json").read_text())["models"][
        "guidance"
    ]
    assert (
        guidance["kind"] == "img2img"
        and "faceid: the server lacks the node(s) CharForgeLoadIPAdapter" in guidance["reason"]
    )


async def _apply_instantid(ctx, model, instantid, control_net, face_models, image, positive, negative, **_):
    assert (
        instantid.startswith("IPA:") and control_net.startswith("CN:") and face_models == "FACES:antelopev2"
    )
    return (f"{model}+InstantID", f"{positive}+ID", f"{negative}+ID", image), None


def test_instantid_on_an_sdxl_base_with_the_real_nodes_declarations(tmp_path, refs):
    from charforge.nodes.guide import LoadIPAdapter
    from charforge.nodes.guide_instantid import ApplyInstantID

    declared = ApplyInstantID.INPUT_TYPES()
    server = story_fakes.StoryServer(ipadapter=True)
    server.nodes.update(
        {
            n.name: n
            for n in [
                NodeDef(
                    "CharForgeLoadIPAdapter",
                    {"ipadapter_name": ([*story_fakes.ADAPTER_FILES, "ip-adapter.bin"],)},
                    outputs=LoadIPAdapter.RETURN_TYPES,
                    run=story_fakes._load_adapter,
                ),
                NodeDef(
                    "CharForgeApplyInstantID",
                    declared["required"],
                    declared["optional"],
                    hidden=declared["hidden"],
                    outputs=ApplyInstantID.RETURN_TYPES,
                    run=_apply_instantid,
                ),
                NodeDef(
                    "ControlNetLoader",
                    {"control_net_name": (["instantid_controlnet.safetensors"],)},
                    outputs=("CONTROL_NET",),
                    run=_controlnet,
                ),
            ]
        }
    )
    with server:
        code, _, stderr = _run(
            tmp_path, server, _scenes(tmp_path, pose=False), refs, "--checkpoint", "sd_xl_base_1.0.safetensors",
            "--mode", "reference", "--no-base", "--guidance", "all",
        )  # fmt: skip
        prompts = server.prompts()
    assert code == 0, stderr
    instantid, image_adapter = prompts[:6], prompts[6:12]
    for prompt in instantid:  # every frame: InstantID's MODEL and both conditionings go to the sampler
        node = prompt["33"]
        assert node["class_type"] == "CharForgeApplyInstantID"
        assert prompt["6"]["inputs"]["model"] == ["33", 0]
        assert (prompt["6"]["inputs"]["positive"], prompt["6"]["inputs"]["negative"]) == (
            ["33", 1],
            ["33", 2],
        )
        assert prompt["36"]["inputs"]["image"] == "charforge_story/hero_refs/ref0.png"
        assert prompt["31"]["inputs"]["ipadapter_name"] == "ip-adapter.bin"
        assert prompt["37"]["inputs"]["control_net_name"] == "instantid_controlnet.safetensors"
        assert prompt["38"]["inputs"]["pack"] == "antelopev2" and node["inputs"]["face_models"] == ["38", 0]
    # the SDXL image adapter (not the SD1.5 ones) for the ipadapter storyboard
    assert image_adapter[1]["31"]["inputs"]["ipadapter_name"] == "ip-adapter-plus-face_sdxl_vit-h.safetensors"
    data = json.loads((tmp_path / "out" / "reference" / "instantid" / "metadata.json").read_text())
    assert data["models"]["guidance"]["reason"].startswith(
        "InstantID (ip-adapter.bin, IdentityNet instantid_controlnet.safetensors, antelopev2): the face of the "
        "first reference photo (ref0.png)"
    )
    assert data["label"] == "reference-guided: InstantID (the character's identity and face keypoints)"
    rows = [r["mode"] for r in json.loads((tmp_path / "out" / "ablation.json").read_text())["modes"]]
    assert rows == ["reference/instantid", "reference/ipadapter", "reference/img2img"]
    # without a reference photo (a saved identity) InstantID cannot take a face: --guidance instantid says so
    info = _info(
        ["ip-adapter.bin"], controlnets=["instantid_controlnet.safetensors"], nodes=[sg.APPLY_INSTANTID]
    )
    info["CharForgeLoadFaceModels"] = {"input": {"required": {"pack": [["antelopev2", "buffalo_l"]]}}}
    with pytest.raises(UsageError, match="InstantID takes the face from a reference photo"):
        sg.choose_guidance(sg.Offer(info, "sdxl", identity={"name": "anna"}), "instantid")
    info["CharForgeLoadFaceModels"] = {"input": {"required": {"pack": [["buffalo_l"]]}}}
    with pytest.raises(UsageError, match="antelopev2 face models in models/insightface/models/antelopev2"):
        sg.choose_guidance(sg.Offer(info, "sdxl", identity={"photo": "a.png"}), "instantid")
