"""``charforge story`` against the loopback fake ComfyUI: the graphs it submits (ComfyUI's own generation
nodes + Storyboard Select), reference guidance (img2img, or IP-Adapter when the server has it), the files it
writes (frames, sheets, metadata.json, ablation) and its errors. The fake server is extended here with the
nodes a storyboard needs; its Storyboard Select plants scores that depend on the graph (LoRA or not, guided
or not), so the ablation's numbers are known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes.comfy_server import FakeComfyServer, FakeImage, NodeDef, lora_loader
from PIL import Image

from cf_testing.cli import run_charforge as run_cli
from charforge.common.characters import GenerationParams, default_size
from charforge.nodes.story import StoryboardSelect
from charforge.recipes.story import Character, Guidance, detect_guidance, frame_graph

LORA_IDENTITY, BASE_IDENTITY, GUIDE_IDENTITY, TEXT = 0.71, 0.23, 0.88, 0.31
SCENES = [
    "close-up portrait of the character, face clearly visible",
    "the character reads a letter",
    "the character walks to the harbour",
    "the character boards a boat",
    "the character at sea at sunset",
    "the character arrives on an island",
]


async def _vae_encode(ctx, pixels, vae):
    return ({"batch": pixels.batch, "width": pixels.width, "height": pixels.height},), None


async def _repeat(ctx, samples, amount):
    return (dict(samples, batch=amount),), None


async def _face_models(ctx, pack, det_size, provider):
    return (f"FACES:{pack}",), None


async def _build_identity(ctx, face_models, name, save, folder="", images=None):
    photos = [p for p in (ctx.server.input_dir / folder).iterdir() if p.is_file()]
    if not photos:
        raise ValueError(f"no photos in {folder}")
    return (f"IDENTITY:{name}:{len(photos)}", 0.3, f"{len(photos)} reference(s)", FakeImage(1, 8, 8)), {
        "text": [f"{len(photos)} reference(s)"]
    }


async def _load_identity(ctx, name):
    return (f"IDENTITY:{name}", 0.3, name), None


async def _load_clip(ctx, model, device, path=""):
    return (f"CLIP:{model}",), None


async def _load_adapter(ctx, ipadapter_name):
    return (f"IPA:{ipadapter_name}", "variant"), None


async def _clip_vision(ctx, clip_name):
    return (f"CV:{clip_name}",), None


async def _apply_adapter(ctx, model, ipadapter, clip_vision, image, weight, start_at, end_at, attn_mask=None):
    assert ipadapter.startswith("IPA:") and clip_vision.startswith("CV:")
    return (f"{model}+IPA({weight})",), None


async def _apply_faceid(ctx, model, ipadapter, identity, weight, start_at, end_at, shortcut_scale, **_):
    assert ipadapter.startswith("IPA:") and identity.startswith("IDENTITY:")
    return (f"{model}+FaceID({weight})",), None


ADAPTER_FILES = [
    "ip-adapter_sd15.safetensors",
    "ip-adapter-plus-face_sd15.safetensors",
    "ip-adapter-faceid_sd15.bin",
    "ip-adapter-plus-face_sdxl_vit-h.safetensors",
]


def guide_nodes(files: list[str], clip_vision: list[str]) -> list[NodeDef]:
    """CharForge's IP-Adapter nodes with their real input declarations (the model lists are the fake's)."""
    from charforge.nodes.guide import ApplyIPAdapter, ApplyIPAdapterFaceID, LoadIPAdapter

    def declared(node, run):
        spec = node.INPUT_TYPES()
        return dict(spec["required"]), dict(spec.get("optional") or {}), node.RETURN_TYPES, run

    nodes = [
        NodeDef(
            "CharForgeLoadIPAdapter",
            {"ipadapter_name": (files,)},
            outputs=LoadIPAdapter.RETURN_TYPES,
            run=_load_adapter,
        ),
        NodeDef(
            "CLIPVisionLoader", {"clip_name": (clip_vision,)}, outputs=("CLIP_VISION",), run=_clip_vision
        ),
    ]
    for name, node, run in (
        ("CharForgeApplyIPAdapter", ApplyIPAdapter, _apply_adapter),
        ("CharForgeApplyIPAdapterFaceID", ApplyIPAdapterFaceID, _apply_faceid),
    ):
        required, optional, outputs, run = declared(node, run)
        nodes.append(NodeDef(name, required, optional, outputs=outputs, run=run))
    return nodes


async def _select(
    ctx,
    images,
    prompts,
    face_models,
    identity,
    mode,
    identity_weight,
    text_weight,
    face_choice,
    seeds=None,
    captions=None,
    clip=None,
    reference=None,
    first_frame=1,
):
    """Planted scores: identity depends on whether the graph loads the LoRA, guide identity on the reference."""
    assert identity.startswith("IDENTITY:") and face_models.startswith("FACES:")
    lora = any(node["class_type"] == "LoraLoader" for node in ctx.prompt.values())
    frame = {
        "index": first_frame - 1,
        "prompt": prompts,
        "seed": seeds,
        "candidates": images.batch,
        "chosen": images.batch - 1,
        "identity": LORA_IDENTITY if lora else BASE_IDENTITY,
        "text": TEXT if clip else None,
        "guide_identity": GUIDE_IDENTITY if reference is not None else None,
        "combined": 0.5,
        "note": "",
    }
    return storyboard_output(images, mode, frame, (images.color + first_frame * 40) & 0xFFFFFF)


def storyboard_output(images, mode: str, frame: dict, color: int):
    """What a fake Storyboard Select returns: one chosen image of `color` and the one-frame storyboard record."""
    record = json.dumps({"format": "charforge.storyboard", "version": 1, "mode": mode, "frames": [frame]})
    return (FakeImage(1, images.width, images.height, color), record, "report", "SCORES"), {
        "text": ["report"],
        "storyboard": [record],
    }


def _select_def() -> NodeDef:
    """Storyboard Select with the input declarations of the real node (the driver must match them)."""
    declared = StoryboardSelect.INPUT_TYPES()
    return NodeDef(
        "CharForgeStoryboardSelect",
        dict(declared["required"]),
        dict(declared["optional"]),
        outputs=StoryboardSelect.RETURN_TYPES,
        output_node=True,
        category="CharForge/Story",
        python_module="custom_nodes.charforge",
        run=_select,
    )


class StoryServer(FakeComfyServer):
    """The fake ComfyUI plus the nodes a storyboard uses (ComfyUI's, CharForge's, optionally CharForge's
    IP-Adapter nodes with ADAPTER_FILES)."""

    def __init__(self, *, ipadapter: bool = False, clip: bool = True, **kw):
        super().__init__(**kw)
        nodes = [
            lora_loader(["hero.safetensors", "other.safetensors"]),
            NodeDef(
                "VAEEncode", {"pixels": ("IMAGE",), "vae": ("VAE",)}, outputs=("LATENT",), run=_vae_encode
            ),
            NodeDef(
                "RepeatLatentBatch",
                {"samples": ("LATENT",), "amount": ("INT", {"default": 1, "min": 1, "max": 64})},
                outputs=("LATENT",),
                run=_repeat,
            ),
            NodeDef(
                "CharForgeLoadFaceModels",
                {
                    "pack": (["antelopev2", "buffalo_l"],),
                    "det_size": ("INT", {"default": 640, "min": 160, "max": 1280}),
                    "provider": (["auto", "CPU"],),
                },
                outputs=("CHARFORGE_FACE_MODELS",),
                run=_face_models,
            ),
            NodeDef(
                "CharForgeBuildIdentity",
                {
                    "face_models": ("CHARFORGE_FACE_MODELS",),
                    "name": ("STRING", {}),
                    "save": ("BOOLEAN", {"default": True}),
                },
                optional={"images": ("IMAGE",), "folder": ("STRING", {"default": ""})},
                outputs=("CHARFORGE_IDENTITY", "FLOAT", "STRING", "IMAGE"),
                output_node=True,
                run=_build_identity,
            ),
            NodeDef(
                "CharForgeLoadIdentity",
                {"name": (["hero_saved"],)},
                outputs=("CHARFORGE_IDENTITY", "FLOAT", "STRING"),
                run=_load_identity,
            ),
            NodeDef(
                "CharForgeLoadClip",
                {
                    "model": (["clip-vit-b"] if clip else ["(no CLIP folder found)"],),
                    "device": (["auto", "cpu", "cuda"],),
                },
                optional={"path": ("STRING", {"default": ""})},
                outputs=("CHARFORGE_CLIP",),
                run=_load_clip,
            ),
            _select_def(),
        ]
        if ipadapter:
            nodes += guide_nodes(ADAPTER_FILES, ["CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"])
        self.nodes.update({n.name: n for n in nodes})

    def prompts(self) -> list[dict]:
        return [prompt for _, prompt in self.executed]


@pytest.fixture(autouse=True)
def no_user_config(monkeypatch, tmp_path):
    monkeypatch.setenv("CHARFORGE_CONFIG", str(tmp_path / "no-config.yaml"))
    for var in ("CHARFORGE_SERVER", "CHARFORGE_PROFILE", "CHARFORGE_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def refs(tmp_path) -> Path:
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 30 * i, 10)).save(folder / f"ref{i}.png")
    (folder / "notes.txt").write_text("not a photo")
    return folder


@pytest.fixture
def scenes(tmp_path) -> Path:
    path = tmp_path / "scenes.txt"
    path.write_text("\n".join(SCENES) + "\n")
    return path


def test_story_both_modes_and_base_write_frames_sheets_metadata_and_ablation(tmp_path, refs, scenes):
    out = tmp_path / "out"
    with StoryServer() as server:
        code, stdout, stderr = run_cli(
            "story",
            "She sails to the island.",
            "--server",
            server.url,
            "--scenes",
            str(scenes),
            "--lora",
            "hero.safetensors:0.8",
            "--trigger",
            "ohwx woman",
            "--reference",
            str(refs),
            "--candidates",
            "3",
            "--seed",
            "100",
            "--width",
            "64",
            "--height",
            "48",
            "--out",
            str(out),
        )
        prompts = server.prompts()
        uploaded = sorted(p.name for p in (server.input_dir / "charforge_story" / "hero_refs").iterdir())
    assert code == 0, stderr
    assert uploaded == ["ref0.png", "ref1.png"]  # photos only
    assert len(prompts) == 18  # 6 frames x (simple, reference, base)

    simple, reference, base = prompts[:6], prompts[6:12], prompts[12:]
    for i, prompt in enumerate(simple):
        assert (
            prompt["20"]["inputs"]["lora_name"] == "hero.safetensors"
            and prompt["20"]["inputs"]["strength_model"] == 0.8
        )
        assert prompt["3"]["inputs"]["text"] == f"ohwx woman, {SCENES[i]}"
        assert prompt["5"]["class_type"] == "EmptyLatentImage" and prompt["5"]["inputs"]["batch_size"] == 3
        assert prompt["6"]["inputs"]["seed"] == 100 + i and prompt["6"]["inputs"]["denoise"] == 1.0
        assert prompt["9"]["inputs"]["folder"] == "charforge_story/hero_refs"
        assert prompt["11"]["inputs"]["mode"] == "simple" and prompt["11"]["inputs"]["clip"] == ["10", 0]
    assert all(
        "20" not in p and p["3"]["inputs"]["text"] == s["3"]["inputs"]["text"]
        for p, s in zip(base, simple, strict=True)
    )
    assert [p["6"]["inputs"]["seed"] for p in base] == [p["6"]["inputs"]["seed"] for p in simple]
    assert reference[0]["5"]["class_type"] == "EmptyLatentImage" and "30" not in reference[0]
    for i, prompt in enumerate(reference[1:], start=2):
        assert prompt["34"]["class_type"] == "VAEEncode" and prompt["5"]["class_type"] == "RepeatLatentBatch"
        assert prompt["5"]["inputs"]["amount"] == 3 and prompt["6"]["inputs"]["denoise"] == 0.55
        assert prompt["30"]["inputs"]["image"].startswith("charforge_story/") and prompt["11"]["inputs"][
            "reference"
        ] == ["30", 0]
        assert prompt["11"]["inputs"]["first_frame"] == i and prompt["11"]["inputs"]["mode"] == "reference"

    for mode in ("simple", "reference", "base"):
        folder = out / mode
        names = sorted(p.name for p in folder.iterdir() if p.name != ".attempts")
        assert names == [f"frame_{i:02d}.png" for i in range(1, 7)] + ["metadata.json", "sheet.png"]
        # retries are on by default (every frame passes at once here); the base run is never retried
        assert (folder / ".attempts").is_dir() == (mode != "base")
        data = json.loads((folder / "metadata.json").read_text())
        assert data["mode"] == mode and data["story"] == "She sails to the island."
        assert [f["seed"] for f in data["frames"]] == list(range(100, 106))
        assert [f["image"] for f in data["frames"]] == names[:6] and data["frames"][0]["candidates"] == 3
        assert [len(f["attempts"]) for f in data["frames"]] == [0 if mode == "base" else 1] * 6
        assert ("retries" in data["settings"]) == (mode != "base")
        assert data["frames"][1]["caption"] == "the character reads a letter"
        assert data["models"]["checkpoint"] == "v1-5-pruned-emaonly.safetensors"
        assert data["models"]["loras"] == (
            [] if mode == "base" else [{"name": "hero.safetensors", "weight": 0.8}]
        )
        with Image.open(folder / "frame_01.png") as frame:  # (the fake LoadImage makes 64 x 64 frames 2+)
            assert frame.size == (64, 48)
        with Image.open(folder / "sheet.png") as sheet:
            assert sheet.width > 3 * 64
    ref = json.loads((out / "reference" / "metadata.json").read_text())
    assert [f["guidance"] for f in ref["frames"]] == [""] + ["img2img"] * 5
    assert ref["frames"][0]["guide_identity"] is None and ref["frames"][3]["guide_identity"] == GUIDE_IDENTITY
    assert ref["models"]["guidance"]["kind"] == "img2img" and ref["models"]["guidance"]["denoise"] == 0.55

    ablation = json.loads((out / "ablation.json").read_text())
    rows = {r["mode"]: r for r in ablation["modes"]}
    assert (
        rows["simple"]["identity_mean"] == LORA_IDENTITY
        and rows["reference"]["identity_mean"] == LORA_IDENTITY
    )
    assert rows["base"]["identity_mean"] == BASE_IDENTITY and rows["simple"]["text_mean"] == TEXT
    assert ablation["best_identity"] == "simple"
    assert "| base model without LoRA | 6 | 6 | 0.230 |" in (out / "ablation.md").read_text()
    summary = json.loads((out / "metadata.json").read_text())
    assert summary["storyboards"] == {m: f"{m}/metadata.json" for m in ("simple", "reference", "base")}
    assert len(summary["scenes"]) == 6 and "ablation" in stdout and "simple/sheet.png" in stdout


def test_story_with_llm_scenes_ipadapter_and_saved_identity(tmp_path, monkeypatch):
    from fakes.openai_chat import FakeChat, chat, scenes_json

    endpoint = FakeChat()
    endpoint.script = [(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}), chat(scenes_json(6))]
    monkeypatch.setenv("CF_STORY_TEST_KEY", "sk-secret")
    out = tmp_path / "out"
    try:
        with StoryServer(ipadapter=True, clip=False) as server:
            code, stdout, stderr = run_cli(
                "story",
                "She sails away.",
                "--server",
                server.url,
                "--mode",
                "reference",
                "--no-base",
                "--guidance",
                "ipadapter",
                "--lora",
                "hero.safetensors",
                "--reference",
                "hero_saved",
                "--llm-url",
                endpoint.url,
                "--llm-key-env",
                "CF_STORY_TEST_KEY",
                "--candidates",
                "2",
                "--json",
                "--out",
                str(out),
            )
            prompts = server.prompts()
    finally:
        endpoint.close()
    assert code == 0, stderr + stdout
    assert endpoint.requests[-1]["auth"] == "Bearer sk-secret" and "sk-secret" not in stdout + stderr
    assert len(prompts) == 6 and prompts[0]["9"] == {
        "class_type": "CharForgeLoadIdentity",
        "inputs": {"name": "hero_saved"},
        "_meta": {"title": "Character identity"},
    }
    assert "10" not in prompts[0]  # no CLIP folder on the server: no text agreement
    guided = prompts[3]  # CharForge's Load IP-Adapter picks the SD1.5 plus-face file (not the SDXL one)
    assert guided["31"]["inputs"]["ipadapter_name"] == "ip-adapter-plus-face_sd15.safetensors"
    assert guided["33"]["class_type"] == "CharForgeApplyIPAdapter" and guided["33"]["inputs"]["weight"] == 0.7
    assert guided["33"]["inputs"]["image"] == ["30", 0] and guided["33"]["inputs"]["clip_vision"] == ["32", 0]
    assert guided["6"]["inputs"]["model"] == ["33", 0] and guided["5"]["class_type"] == "EmptyLatentImage"
    assert "33" not in prompts[0]  # a saved identity has no photo: frame 1 is not guided
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["event"] == "result" and set(result["sheets"]) == {"reference"}
    data = json.loads((out / "reference" / "metadata.json").read_text())
    assert (
        data["frames"][0]["prompt"].startswith("close-up portrait")
        and data["frames"][2]["guidance"] == "ipadapter"
    )
    assert data["frames"][0]["text"] is None and data["models"]["guidance"]["kind"] == "ipadapter"
    assert json.loads((out / "ablation.json").read_text())["best_text"] is None


def test_story_errors_are_usage_errors(tmp_path, refs, scenes):
    with StoryServer() as server:
        common = ("--server", server.url, "--scenes", str(scenes), "--out", str(tmp_path / "o"))
        code, _, err = run_cli("story", *common, "--lora", "missing.safetensors", "--reference", str(refs))
        assert code == 2 and "'missing.safetensors' is not in the server's loras folder" in err
        code, _, err = run_cli("story", *common, "--lora", "hero.safetensors", "--reference", "nobody")
        assert code == 2 and "neither a local folder nor an identity saved" in err and "hero_saved" in err
        code, _, err = run_cli(
            "story",
            *common,
            "--lora",
            "hero.safetensors",
            "--reference",
            str(refs),
            "--guidance",
            "ipadapter",
        )
        assert code == 2 and "lacks the node(s) CharForgeLoadIPAdapter" in err
        assert server.prompts() == []
    code, _, err = run_cli("story", "x", "--scenes", str(scenes), "--out", str(tmp_path / "o"))
    assert code == 2 and "name the character" in err
    short = tmp_path / "short.txt"
    short.write_text("one\ntwo\n")
    code, _, err = run_cli(
        "story", "--scenes", str(short), "--lora", "a.safetensors", "--out", str(tmp_path / "o")
    )
    assert code == 2 and "has 2: add scenes" in err


def tiny_frame_graph(**changes) -> dict:
    """`frame_graph` of frame 1 for hero (LoRA a.safetensors at 1.0), checkpoint m, prompt p, seed 1, two
    candidates, simple mode, save prefix x; `changes` replace arguments or add more."""
    arguments = {
        "character": Character("hero", loras=[("a.safetensors", 1.0)]),
        "checkpoint": "m",
        "prompt": "p",
        "seed": 1,
        "candidates": 2,
        "mode": "simple",
        "identity": {"name": "hero"},
        "face_pack": "buffalo_l",
        "clip_model": None,
        "weights": (1.0, 0.5),
        "frame": 1,
        "save_prefix": "x",
    }
    return frame_graph(**(arguments | changes))


def test_guidance_detection_and_graph_shape():
    info = {"LoadImage": {}, "VAEEncode": {}, "RepeatLatentBatch": {}}
    assert detect_guidance(info).kind == "img2img"
    with pytest.raises(Exception, match="lacks the node"):
        detect_guidance(info, "ipadapter")
    character = Character("hero", loras=[("a.safetensors", 1.0), ("b.safetensors", 0.5)])
    graph = tiny_frame_graph(character=character, checkpoint="m.safetensors", save_prefix="x/frame_01")
    assert graph["21"]["inputs"]["model"] == ["20", 0] and graph["6"]["inputs"]["model"] == ["21", 0]
    assert graph["12"]["inputs"]["filename_prefix"] == "x/frame_01" and "10" not in graph
    guided = tiny_frame_graph(
        character=character,
        mode="reference",
        clip_model="c",
        frame=2,
        guide_image="f.png",
        guidance=Guidance("img2img"),
        denoise=0.4,
    )
    assert guided["6"]["inputs"]["denoise"] == 0.4 and guided["34"]["inputs"]["pixels"] == ["30", 0]


def test_a_character_from_flags_renders_with_the_preset_schemas_defaults():
    """One schema: without a preset the storyboard uses GenerationParams' settings, at the size default_size
    gives an unknown base model; metadata keeps the settings flat beside the rest."""
    character = Character("hero")
    assert character.generation == GenerationParams(width=default_size(""), height=default_size(""))
    graph = tiny_frame_graph(character=character, candidates=1)
    sampler, latent = graph["6"]["inputs"], graph["5"]["inputs"]
    assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (
        25,
        7.0,
        "euler",
        "normal",
    )
    assert (latent["width"], latent["height"]) == (512, 512)
    record = character.to_dict()
    assert list(record) == [
        "name",
        "trigger",
        "prompt",
        "negative",
        "loras",
        "reference",
        "reference_photos",
        "threshold",
        "checkpoint",
        "steps",
        "cfg",
        "width",
        "height",
        "sampler",
        "scheduler",
        "display_name",
    ]
    assert (record["width"], record["sampler"]) == (512, "euler")


def test_story_with_a_character_preset(tmp_path, monkeypatch, scenes):
    from charforge import bridge

    models = tmp_path / "models"
    (models / "charforge" / "characters").mkdir(parents=True)
    (models / "charforge" / "characters" / "mara.yaml").write_text(
        "display_name: Mara\ntrigger_words: [mara_cf]\n"
        "loras:\n  - {name: hero.safetensors, weight: 0.9, clip_weight: 0.5}\n"
        "negative_prompt: ugly\nidentity: hero_saved\nprompt: photo of a woman\n"
        "generation: {steps: 3, cfg: 5.0, width: 64, height: 48, sampler: euler, scheduler: normal}\n"
    )
    monkeypatch.setenv("CHARFORGE_MODELS_DIR", str(models))
    bridge.reset()
    try:
        with StoryServer() as server:
            code, _, stderr = run_cli(
                "story",
                "--character",
                "mara",
                "--server",
                server.url,
                "--scenes",
                str(scenes),
                "--mode",
                "simple",
                "--no-base",
                "--candidates",
                "1",
                "--out",
                str(tmp_path / "out"),
            )
            prompts = server.prompts()
    finally:
        bridge.reset()
    assert code == 0, stderr
    first = prompts[0]
    assert first["20"]["inputs"]["strength_model"] == 0.9 and first["20"]["inputs"]["strength_clip"] == 0.5
    assert first["3"]["inputs"]["text"] == f"mara_cf, {SCENES[0]}, photo of a woman"
    assert first["4"]["inputs"]["text"] == "ugly" and first["9"]["inputs"] == {"name": "hero_saved"}
    assert (
        first["6"]["inputs"]["steps"],
        first["6"]["inputs"]["sampler_name"],
        first["5"]["inputs"]["height"],
    ) == (3, "euler", 48)
    data = json.loads((tmp_path / "out" / "simple" / "metadata.json").read_text())
    assert data["character"]["display_name"] == "Mara"
    assert data["models"]["loras"] == [{"name": "hero.safetensors", "weight": 0.9, "clip_weight": 0.5}]
    code, _, err = run_cli(
        "story", "--character", "nobody", "--scenes", str(scenes), "--out", str(tmp_path / "o")
    )
    assert code == 2 and "nobody" in err
