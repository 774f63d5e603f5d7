"""The shipped workflows (workflows/*.json): editor and API twins agree, and both fit the node definitions.

CharForge's node definitions come from the pack itself; ComfyUI's built-in ones from the snapshot recorded from
a real ComfyUI 0.3.64 in workflows/object_info/builtin.json. Workflows made only of CharForge nodes (plus
ComfyUI's PreviewImage) also run through the harness on generated photos and tiny models.

(Over 600 lines on purpose: every shipped workflow is checked against the same definitions, snapshot and
twins here, so a new workflow adds its case beside the others.)
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cf_testing.comfyui import REPO_ROOT, load_script, run_node
from cf_testing.threads import one_torch_thread
from charforge.driver.workflow.convert import _control_count, _widget_specs
from charforge.driver.workflow.preflight import preflight

WORKFLOWS = REPO_ROOT / "workflows"
EXPECTED = {"dataset_prep", "caption_dataset", "build_identity", "score_best_of_n", "generate_best_of_n_clip",
            "train_lora_sd15", "train_lora_sdxl", "controlnet_lora", "video_animatediff", "character_lora",
            "character_pipeline", "synthesize_dataset", "flux_lora", "flux_best_of_n", "flux_storyboard", "sd35_lora",
            "sd35_best_of_n", "sd35_storyboard", "video_audio_reactive", "video_face_motion",
            "video_hotshot_xl", "two_characters", "two_characters_faceid", "controlnet_pose_depth"}
UI_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


build_api = load_script(WORKFLOWS / "build_api.py", "charforge_workflows_build_api")
EDITOR_FILES = build_api.editor_files()
IDS = [p.stem for p in EDITOR_FILES]


@pytest.fixture(scope="module")
def object_info() -> dict[str, Any]:
    return build_api.object_info()


def _editor(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _api(path: Path) -> dict[str, Any]:
    return json.loads(build_api.api_path(path).read_text(encoding="utf-8"))


def _accepting_model_files(info: dict[str, Any], prompt: dict[str, Any]) -> dict[str, Any]:
    """object_info whose model-file choices contain the file names the workflow uses (they are the user's)."""
    info = copy.deepcopy(info)
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if (node["class_type"], name) in build_api.MODEL_FILE_INPUTS and isinstance(value, str):
                for section in ("required", "optional"):
                    declared = info[node["class_type"]]["input"].get(section) or {}
                    if name in declared:
                        spec = list(declared[name])
                        if spec[0] == "COMBO":  # the newer form: the choices are in the options
                            spec[1] = {**spec[1], "options": [*spec[1].get("options", []), value]}
                        else:
                            spec[0] = [*spec[0], value]
                        declared[name] = spec
    return info


def test_the_expected_workflows_are_shipped():
    assert set(IDS) >= EXPECTED
    for path in EDITOR_FILES:
        assert build_api.api_path(path).exists(), f"{path.name} has no API twin; run python workflows/build_api.py"
    twins = {p.stem for p in (WORKFLOWS / build_api.API_DIR_NAME).glob("*.json")}
    assert twins == set(IDS), "an API workflow has no editor file"


def test_builtin_snapshot_holds_the_builtins_used_and_nothing_else():
    builtin = build_api.builtin_object_info()
    used = {n["type"] for p in EDITOR_FILES for n in _editor(p)["nodes"]} - UI_ONLY
    charforge = set(build_api.charforge_object_info())
    assert used - charforge <= set(builtin), "record the missing classes from a real ComfyUI"
    assert set(builtin) <= used, "the snapshot holds classes no workflow uses"
    assert not set(builtin) & charforge


@pytest.mark.parametrize("path", EDITOR_FILES, ids=IDS)
def test_api_twin_is_the_converted_editor_file(path, object_info):
    text = build_api.render(build_api.convert(path, object_info))
    assert build_api.api_path(path).read_text(encoding="utf-8") == text, \
        f"{build_api.api_path(path).name} is out of date: run python workflows/build_api.py"


def test_build_api_check_passes():
    assert build_api.main(["--check"]) == 0


@pytest.mark.parametrize("path", EDITOR_FILES, ids=IDS)
def test_api_workflow_validates_against_node_definitions(path, object_info):
    prompt = _api(path)
    problems = preflight(prompt, _accepting_model_files(object_info, prompt))
    assert problems == [], "\n".join(str(p) for p in problems)
    # Every node runs: each one is an output node or feeds one.
    from charforge.driver.workflow.preflight import nodes_to_run

    assert set(nodes_to_run(prompt, object_info)) == set(prompt)


def _check_value(where: str, kind: Any, options: dict[str, Any], value: Any) -> None:
    if isinstance(kind, list):
        assert value in kind, f"{where}: {value!r} not among {kind}"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} not a number"
        if kind == "INT":
            assert isinstance(value, int), f"{where}: {value!r} is not an integer"
        assert options.get("min", value) <= value <= options.get("max", value), \
            f"{where}: {value} outside [{options.get('min')}, {options.get('max')}]"


@pytest.mark.parametrize("path", EDITOR_FILES, ids=IDS)
def test_charforge_widget_values_are_within_declared_ranges(path, object_info):
    for node_id, node in _api(path).items():
        if not node["class_type"].startswith("CharForge"):
            continue
        info = object_info[node["class_type"]]
        for name, kind, options in _widget_specs(info):
            where = f"{path.name} node {node_id} {node['class_type']}.{name}"
            assert name in node["inputs"], f"{where} is missing"
            value = node["inputs"][name]
            if isinstance(value, list):  # converted to a socket
                continue
            if (node["class_type"], name) == ("CharForgeVideoLoRA", "lora_name") and value == "(none)":
                # Only with the trained LoRA's name linked into lora_name_from (the one-graph pipeline).
                assert isinstance(node["inputs"].get("lora_name_from"), list), f"{where}: no LoRA at all"
                continue
            if (node["class_type"], name) == ("CharForgeGenerateVideo", "controlnet") and value == "(none)":
                continue  # no ControlNet: the plain clip
            if (node["class_type"], name) in build_api.MODEL_FILE_INPUTS:
                assert isinstance(value, str) and value and not value.startswith("("), f"{where}: {value!r}"
                continue
            _check_value(where, kind, options, value)


@pytest.mark.parametrize("path", EDITOR_FILES, ids=IDS)
def test_editor_widgets_values_match_the_node_definitions(path, object_info):
    """Each node saves exactly one value per widget (plus the editor's control values after seeds)."""
    for node in _editor(path)["nodes"]:
        if node["type"] in UI_ONLY:
            continue
        specs = _widget_specs(object_info[node["type"]])
        expected = sum(1 + _control_count(name, kind, options) for name, kind, options in specs)
        # File-picking combos (LoadImage) carry the editor's trailing "upload" value.
        expected += sum(1 for _, _, options in specs if options.get("image_upload"))
        assert len(node.get("widgets_values") or []) == expected, f"{path.name} node {node['id']} ({node['type']})"


@pytest.mark.parametrize("path", EDITOR_FILES, ids=IDS)
def test_editor_layout_is_for_people(path):
    workflow = _editor(path)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]), "duplicate node ids"
    assert workflow["version"] == 0.4
    assert workflow["last_node_id"] >= max(nodes)
    notes = [n for n in nodes.values() if n["type"] == "Note"]
    assert notes and all(len(n["widgets_values"][0]) > 200 for n in notes), "a Note explains what to set"
    groups = workflow["groups"]
    assert groups

    def inside(node, group):
        x, y, w, h = group["bounding"]
        nx, ny = node["pos"]
        return x <= nx and y <= ny and nx + node["size"][0] <= x + w and ny + node["size"][1] <= y + h

    for node in nodes.values():
        if node["type"] not in UI_ONLY:
            assert any(inside(node, g) for g in groups), f"{path.name}: node {node['id']} is outside every group"
    boxes = [(n["pos"][0], n["pos"][1], n["size"][0], n["size"][1]) for n in nodes.values()]
    for i, (x1, y1, w1, h1) in enumerate(boxes):
        for x2, y2, w2, h2 in boxes[i + 1:]:
            assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1, f"{path.name}: nodes overlap"
    # Links agree with the slots that name them.
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
    assert workflow["last_link_id"] >= max((lk[0] for lk in workflow["links"]), default=0)


layout = load_script(WORKFLOWS / "layout.py", "charforge_workflows_layout")
# The editor's (ComfyUI frontend 1.27) zod check of a workflow's id: z.string().uuid().
ZOD_UUID = re.compile(r"^[0-9a-fA-F]{8}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{4}\b-[0-9a-fA-F]{12}$")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _vector2(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)


def editor_schema_problems(workflow: dict[str, Any]) -> list[str]:
    """What the editor's workflow schema (zComfyWorkflow, version 0.4) would reject, field by field."""
    problems = []
    if "id" in workflow and not (isinstance(workflow["id"], str) and ZOD_UUID.match(workflow["id"])):
        problems.append(f"id {workflow['id']!r} is not a UUID")
    for key in ("version", "last_link_id", "revision"):
        if key in workflow and not _number(workflow[key]):
            problems.append(f"{key} {workflow[key]!r} is not a number")
    if not isinstance(workflow.get("last_node_id"), (int, str)):
        problems.append("last_node_id missing")
    for node in workflow.get("nodes", []):
        where = f"node {node.get('id')}"
        if not isinstance(node.get("id"), (int, str)) or not isinstance(node.get("type"), str):
            problems.append(f"{where}: id/type")
        if not (_vector2(node.get("pos")) and _vector2(node.get("size"))):
            problems.append(f"{where}: pos/size must be two numbers")
        if not (isinstance(node.get("flags"), dict) and isinstance(node.get("properties"), dict)):
            problems.append(f"{where}: flags/properties must be objects")
        if not (_number(node.get("order")) and _number(node.get("mode"))):
            problems.append(f"{where}: order/mode must be numbers")
        if not isinstance(node.get("widgets_values", []), (list, dict)):
            problems.append(f"{where}: widgets_values")
        for key in ("color", "bgcolor"):
            if key in node and not isinstance(node[key], str):
                problems.append(f"{where}: {key}")
    for link in workflow.get("links", []):
        if not (isinstance(link, list) and len(link) == 6 and all(_number(v) for v in link[:5])):
            problems.append(f"link {link!r}: [id, origin, slot, target, slot, type]")
    for group in workflow.get("groups", []):
        if not (isinstance(group.get("title"), str) and isinstance(group.get("bounding"), list)
                and len(group["bounding"]) == 4 and all(_number(v) for v in group["bounding"])):
            problems.append(f"group {group.get('id')}: title and a 4-number bounding")
    ds = (workflow.get("extra") or {}).get("ds")
    if ds is not None and not (_number(ds.get("scale")) and _vector2(ds.get("offset"))):
        problems.append("extra.ds needs a scale and a two-number offset")
    return problems


def test_editor_schema_check_catches_what_the_editor_rejects():
    good = _editor(EDITOR_FILES[0])
    assert editor_schema_problems(good) == []
    for bad in ({"id": "charforge-dataset_prep"}, {"extra": {"ds": {"scale": 1, "offset": [0]}}},
                {"links": [[1, 2, 0, 3, 0]]}, {"nodes": [{**good["nodes"][0], "pos": {"0": 1, "1": 2}}]}):
        assert editor_schema_problems({**good, **bad}), bad


@pytest.mark.parametrize("path", EDITOR_FILES, ids=IDS)
def test_editor_file_passes_the_editors_schema_with_a_stable_uuid(path):
    workflow = _editor(path)
    assert editor_schema_problems(workflow) == []
    assert workflow["id"] == layout.workflow_id(path.stem), "run python workflows/layout.py"
    assert str(uuid.UUID(workflow["id"])) == workflow["id"]


def test_workflow_ids_are_distinct():
    ids = [_editor(p)["id"] for p in EDITOR_FILES]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("path", EDITOR_FILES, ids=IDS)
def test_the_note_is_in_the_opening_view(path):
    """The editor shows canvas point p at screen point (p + offset) * scale: the Note's top-left corner is
    on screen in a 1280 x 720 window, below the menu bar, and the view is what layout.py computes."""
    workflow = _editor(path)
    ds = workflow["extra"]["ds"]
    assert ds == layout.opening_view(workflow, ds["scale"]), "run python workflows/layout.py"
    assert 0.5 <= ds["scale"] <= 1.2
    for note in (n for n in workflow["nodes"] if n["type"] == "Note"):
        x, y = ((note["pos"][i] + ds["offset"][i]) * ds["scale"] for i in (0, 1))
        assert 0 <= x <= 1280 - 200 and 60 <= y <= 720 - 200, f"Note at screen ({x:.0f}, {y:.0f})"


def test_every_workflow_has_its_template_thumbnail():
    """The editor's template browser shows /api/workflow_templates/charforge/<name>.jpg on each card: ComfyUI
    serves it from the folder holding the workflow (workflows/thumbnails.py draws them in the real editor)."""
    thumbnails = {p.stem for p in WORKFLOWS.glob("*.jpg")}
    assert thumbnails == set(IDS), "python workflows/thumbnails.py --server URL --write"
    for name in IDS:
        with Image.open(WORKFLOWS / f"{name}.jpg") as image:
            assert image.format == "JPEG" and image.size == (400, 400)
            assert (WORKFLOWS / f"{name}.jpg").stat().st_size < 60_000


def _ancestors(prompt: dict[str, Any], node_id: str) -> set[str]:
    """Every node `node_id` depends on through links (what ComfyUI runs before it)."""
    seen: set[str] = set()
    todo = [node_id]
    while todo:
        for value in prompt[todo.pop()]["inputs"].values():
            if isinstance(value, list) and str(value[0]) not in seen:
                seen.add(str(value[0]))
                todo.append(str(value[0]))
    return seen


def test_character_pipeline_trains_before_it_generates():
    """One graph, photos to video: the trained LoRA's name (a STRING link) feeds both generation branches, so
    ComfyUI's executor, which runs a node only after every node linked into it, trains first."""
    prompt = _api(WORKFLOWS / "character_pipeline.json")
    ids: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        ids.setdefault(node["class_type"], []).append(node_id)
    (train,) = ids["CharForgeTrainLoRA"]
    (export,) = ids["CharForgeExportDataset"]
    assert prompt[train]["inputs"]["dataset_folder"] == [export, 1]
    (by_name,) = ids["CharForgeLoadLoraByName"]
    (video_lora,) = ids["CharForgeVideoLoRA"]
    assert prompt[by_name]["inputs"]["lora_name"] == [train, 0]
    assert prompt[video_lora]["inputs"]["lora_name_from"] == [train, 0]
    assert prompt[video_lora]["inputs"]["lora_name"] == "(none)"
    assert "LoraLoader" not in ids  # the stock loader only takes a name from its list
    (sampler,) = ids["KSampler"]
    (video,) = ids["CharForgeGenerateVideo"]
    for node_id in (sampler, video):
        assert {train, export, *ids["CharForgeCaptionDataset"], *ids["CharForgeLoadDataset"]} <= \
            _ancestors(prompt, node_id)
    # The images are picked by identity and CLIP together; the video is checked for identity drift.
    (combine,) = ids["CharForgeCombineScores"]
    assert prompt[combine]["inputs"]["identity_scores"][0] in ids["CharForgeScoreIdentity"]
    assert prompt[combine]["inputs"]["clip_scores"][0] in ids["CharForgeClipScore"]
    assert prompt[ids["CharForgeBestOfN"][0]]["inputs"]["scores"] == [combine, 0]
    assert prompt[ids["CharForgeIdentityDrift"][0]]["inputs"]["frames"] == [video, 0]
    # The same base model and trigger everywhere, as the note asks.
    (ckpt,) = ids["CheckpointLoaderSimple"]
    base = prompt[ckpt]["inputs"]["ckpt_name"]
    assert prompt[train]["inputs"]["base_model"] == base == prompt[ids["CharForgeLoadVideoModel"][0]]["inputs"][
        "base_model"]
    trigger = prompt[train]["inputs"]["trigger_word"]
    assert all(prompt[n]["inputs"]["trigger"] == trigger for n in ids["CharForgeCaptionDataset"] + [export])
    assert all(trigger in prompt[n]["inputs"]["text"].split() or f"{trigger}," in prompt[n]["inputs"]["text"]
               for n in ids["CLIPTextEncode"][:1])
    latent = prompt[ids["EmptyLatentImage"][0]]["inputs"]["batch_size"]
    assert prompt[ids["CharForgeBestOfN"][0]]["inputs"]["group_size"] == latent > 1


# ------------------------------------------------------------------------------------------------------------
# Running the CharForge-only workflows through the harness
# ------------------------------------------------------------------------------------------------------------


def _run_prompt(prompt: dict[str, Any]) -> dict[str, tuple]:
    """Execute an API prompt node by node, as ComfyUI's executor does (ComfyUI's preview nodes are skipped)."""
    from charforge.nodes import NODE_CLASS_MAPPINGS

    results: dict[str, tuple] = {}
    pending = dict(prompt)
    while pending:
        ready = [nid for nid, node in pending.items()
                 if all(str(v[0]) in results for v in node["inputs"].values() if isinstance(v, list))]
        assert ready, "the workflow has a cycle or a dangling link"
        for node_id in ready:
            node = pending.pop(node_id)
            inputs = {name: results[str(v[0])][v[1]] if isinstance(v, list) else v
                      for name, v in node["inputs"].items()}
            if node["class_type"] in ("PreviewImage", "SaveImage"):
                images = inputs["images"]
                assert images.ndim == 4 and images.shape[-1] == 3
                results[node_id] = ()
                continue
            results[node_id] = run_node(NODE_CLASS_MAPPINGS[node["class_type"]], node_id=node_id, **inputs).result
    return results


def _photos(folder: Path, count: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        # Different textured photos, large enough for the default filter thresholds.
        pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((640, 512), Image.NEAREST).save(folder / f"photo_{i}.png")


def _dataset_prep_without_faces(comfy_env, count: int = 4) -> tuple[dict, dict]:
    """dataset_prep run on `count` generated photos; they have no faces, so the face rules are off, as the
    workflow's note says to do for non-human characters. Returns (the prompt, its results)."""
    prompt = _api(WORKFLOWS / "dataset_prep.json")
    _photos(comfy_env.base_dir / "input" / prompt["1"]["inputs"]["folder"], count=count)
    prompt["2"]["inputs"]["face_detector"] = "none"
    prompt["3"]["inputs"]["require_face"] = False
    return prompt, _run_prompt(prompt)


@pytest.mark.slow
def test_dataset_prep_runs_through_the_harness(comfy_env):
    _, results = _dataset_prep_without_faces(comfy_env)
    export_summary = results["6"][2]
    train_data_dir = Path(results["6"][1])
    assert train_data_dir.is_dir(), export_summary
    captions = sorted(train_data_dir.rglob("*.txt"))
    assert len(captions) == 4, export_summary
    assert all(c.read_text().startswith("ohwx") for c in captions)
    assert results["7"][0].shape[0] >= 1  # the contact sheet


@pytest.mark.slow
def test_build_identity_runs_through_the_harness(comfy_env, tmp_path):
    pytest.importorskip("insightface")
    import shutil

    from cf_testing.face_models import blank_image, face_image, write_face_pack
    from charforge import bridge
    from charforge.engine.faces import FaceAnalyzer

    bridge.register_model_folders()
    pack = write_face_pack(tmp_path / "pack" / "insightface", "buffalo_l").parent.parent
    shutil.copytree(pack, comfy_env.base_dir / "models" / "insightface")
    prompt = _api(WORKFLOWS / "build_identity.json")
    folder = comfy_env.base_dir / "input" / prompt["2"]["inputs"]["folder"]
    folder.mkdir(parents=True)
    for seed in range(3):
        Image.fromarray(face_image(person=0, noise=2, seed=seed)).save(folder / f"ref_{seed}.png")
    Image.fromarray(blank_image()).save(folder / "no_face.png")
    prompt["1"]["inputs"]["det_size"] = 320  # the planted test detector's size
    try:
        results = _run_prompt(prompt)
    finally:
        FaceAnalyzer.clear_cache()
    identity, _, report, _ = results["2"]
    assert len(identity.references) == 3, report
    name = prompt["2"]["inputs"]["name"]
    assert (comfy_env.base_dir / "models" / "charforge" / "identities" / f"{name}.json").is_file()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' Euler, numpy 2
def test_dataset_prep_then_train_lora_run_through_the_harness(comfy_env, tiny_sd15):
    import shutil

    shutil.copytree(tiny_sd15.diffusers_dir, comfy_env.base_dir / "models" / "diffusers" / "tiny_sd15")
    prep, results = _dataset_prep_without_faces(comfy_env, count=2)
    train_data_dir = results["6"][1]

    train = _api(WORKFLOWS / "train_lora_sd15.json")
    inputs = train["1"]["inputs"]
    assert inputs["preset"] == "sd15" and inputs["trigger_word"] == prep["6"]["inputs"]["trigger"]
    inputs.update(base_model="[diffusers] tiny_sd15", dataset_folder=train_data_dir, steps=2, rank=4,
                  resolution=64, memory_profile="off",
                  overrides=json.dumps({"sample_steps": 2, "sample_size": 64, "mixed_precision": "no",
                                        "bucket_step": 32, "min_bucket": 32}))
    with one_torch_thread():
        results = _run_prompt(train)
    lora_name, _, loss_curve, samples = results["1"]
    assert lora_name == f"{inputs['output_name']}.safetensors"
    assert (comfy_env.base_dir / "models" / "loras" / lora_name).is_file()
    assert loss_curve.ndim == 4 and samples.ndim == 4


CHARFORGE_ONLY = {p.stem for p in EDITOR_FILES
                  if all(n["type"].startswith("CharForge") or n["type"] in UI_ONLY | {"PreviewImage", "SaveImage"}
                         for n in _editor(p)["nodes"])}
RUN_THROUGH_HARNESS = {"dataset_prep", "build_identity", "train_lora_sd15", "caption_dataset", "train_lora_sdxl",
                       "character_lora", "video_animatediff", "video_audio_reactive", "video_hotshot_xl",
                       "video_face_motion"}


def test_every_charforge_only_workflow_runs_through_the_harness():
    """Each workflow made only of CharForge nodes (and ComfyUI's image outputs) has a harness test below (the
    storyboard's runs with the storyboard tests)."""
    assert CHARFORGE_ONLY - {"storyboard"} == RUN_THROUGH_HARNESS


def _tiny_training(inputs: dict[str, Any], base_model: str, dataset_folder: str | None = None) -> None:
    inputs.update(base_model=base_model, steps=2, rank=4, resolution=64, memory_profile="off",
                  overrides=json.dumps({"sample_steps": 2, "sample_size": 64, "mixed_precision": "no",
                                        "bucket_step": 32, "min_bucket": 32}))
    if dataset_folder is not None:
        inputs["dataset_folder"] = dataset_folder


@pytest.mark.slow
def test_caption_dataset_runs_on_an_exported_dataset(comfy_env):
    from cf_testing.caption_models import write_tiny_wd14
    from charforge import bridge

    bridge.register_model_folders()
    write_tiny_wd14(comfy_env.base_dir / "models" / "wd14_tagger")
    exported = _dataset_prep_without_faces(comfy_env, count=3)[1]["6"][1]

    prompt = _api(WORKFLOWS / "caption_dataset.json")
    assert prompt["1"]["inputs"]["recursive"] is True and prompt["1"]["inputs"]["read_captions"] is False
    prompt["1"]["inputs"]["folder"] = exported
    results = _run_prompt(prompt)
    captioned = Path(results["3"][1])
    assert captioned.is_dir() and captioned != Path(exported)
    captions = sorted(captioned.rglob("*.txt"))
    assert len(captions) == 3
    trigger = prompt["2"]["inputs"]["trigger"]
    for caption in captions:
        text = caption.read_text().strip()
        # The tagger's tags follow the trigger: more than the plain "trigger, class" of the first export.
        assert text.startswith(trigger + ",") and text != f"{trigger}, person", text
    assert results["4"][0].shape[0] >= 1


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_train_lora_sdxl_runs_through_the_harness(comfy_env, tiny_sdxl, tmp_path):
    import shutil

    shutil.copytree(tiny_sdxl.diffusers_dir, comfy_env.base_dir / "models" / "diffusers" / "tiny_sdxl")
    folder = tmp_path / "img" / "2_ohwx person"
    _photos(folder, count=2)
    for photo in folder.glob("*.png"):
        photo.with_suffix(".txt").write_text("ohwx person, smiling")
    prompt = _api(WORKFLOWS / "train_lora_sdxl.json")
    assert prompt["1"]["inputs"]["preset"] == "sdxl"
    _tiny_training(prompt["1"]["inputs"], "[diffusers] tiny_sdxl", str(folder.parent))
    with one_torch_thread():
        lora_name, _, loss_curve, _ = _run_prompt(prompt)["1"]
    assert (comfy_env.base_dir / "models" / "loras" / lora_name).is_file()
    assert loss_curve.ndim == 4


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_character_lora_runs_photos_to_lora_in_one_graph(comfy_env, tiny_sd15):
    import shutil

    from cf_testing.caption_models import write_tiny_wd14
    from charforge import bridge

    bridge.register_model_folders()
    shutil.copytree(tiny_sd15.diffusers_dir, comfy_env.base_dir / "models" / "diffusers" / "tiny_sd15")
    write_tiny_wd14(comfy_env.base_dir / "models" / "wd14_tagger")
    prompt = _api(WORKFLOWS / "character_lora.json")
    ids = {node["class_type"]: node_id for node_id, node in prompt.items()}
    _photos(comfy_env.base_dir / "input" / prompt[ids["CharForgeLoadDataset"]]["inputs"]["folder"], count=2)
    prompt[ids["CharForgeAnalyseDataset"]]["inputs"]["face_detector"] = "none"
    prompt[ids["CharForgeFilterDataset"]]["inputs"]["require_face"] = False
    train = prompt[ids["CharForgeTrainLoRA"]]
    assert train["inputs"]["dataset_folder"] == [ids["CharForgeExportDataset"], 1]  # the export feeds training
    _tiny_training(train["inputs"], "[diffusers] tiny_sd15")
    with one_torch_thread():
        results = _run_prompt(prompt)
    export_dir = Path(results[ids["CharForgeExportDataset"]][1])
    captions = [c.read_text() for c in export_dir.rglob("*.txt")]
    assert len(captions) == 2 and all(c.startswith("ohwx,") and c.strip() != "ohwx, person" for c in captions)
    lora_name = results[ids["CharForgeTrainLoRA"]][0]
    assert (comfy_env.base_dir / "models" / "loras" / lora_name).is_file()


def _video_models(comfy_env, assets, sdxl: bool = False) -> Path:
    """The tiny video models where a user puts them, the pack's folders registered; returns the models folder.
    SD1.5 (diffusers/tiny_sd15) + the AnimateDiff v3 module + the character LoRA, or SDXL (tiny_sdxl) + its LoRA."""
    from cf_testing.comfyui import place_models
    from charforge import bridge

    models = comfy_env.base_dir / "models"
    if sdxl:
        place_models(models, {"tiny_sdxl": assets.sdxl.diffusers_dir}, [("loras", assets.sdxl_character_lora)])
    else:
        place_models(models, {"tiny_sd15": assets.sd15.diffusers_dir},
                     [("animatediff_models", assets.modules["v3"].original_file), ("loras", assets.character_lora)])
    bridge.register_model_folders()
    return models


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_video_animatediff_with_drift_runs_through_the_harness(comfy_env, tmp_path):
    pytest.importorskip("insightface")
    import shutil

    from cf_testing.face_models import face_image, write_face_pack
    from cf_testing.video_models import video_assets
    from charforge.engine.faces import FaceAnalyzer

    assets = video_assets(tmp_path / "assets")
    models = _video_models(comfy_env, assets)
    pack = write_face_pack(tmp_path / "pack" / "insightface", "buffalo_l").parent.parent
    shutil.copytree(pack, models / "insightface")
    identity = _api(WORKFLOWS / "build_identity.json")
    folder = comfy_env.base_dir / "input" / identity["2"]["inputs"]["folder"]
    folder.mkdir(parents=True)
    for seed in range(2):
        Image.fromarray(face_image(person=0, noise=2, seed=seed)).save(folder / f"ref_{seed}.png")
    identity["1"]["inputs"]["det_size"] = 320

    prompt = _api(WORKFLOWS / "video_animatediff.json")
    assert prompt["6"]["inputs"]["name"] == identity["2"]["inputs"]["name"]
    prompt["1"]["inputs"].update(base_model="[diffusers] tiny_sd15", motion_module=assets.modules["v3"].original_file.name)
    prompt["2"]["inputs"]["lora_name"] = assets.character_lora.name
    prompt["3"]["inputs"].update(frames=4, width=64, height=64, steps=2, context_length=4, context_overlap=1)
    prompt["5"]["inputs"]["det_size"] = 320
    try:
        _run_prompt(identity)
        with one_torch_thread():
            results = _run_prompt(prompt)
    finally:
        FaceAnalyzer.clear_cache()
    frames = results["3"][0]
    assert frames.shape[0] == 4 and frames.shape[1:3] == (64, 64)
    assert Path(results["4"][0]).is_file() and Path(results["4"][0]).suffix == ".mp4"
    plot, mean, minimum, drifting, report, _ = results["7"]
    assert plot.ndim == 4 and report


@pytest.mark.slow
def test_video_audio_reactive_changes_prompts_on_beats_and_saves_the_music(comfy_env, tmp_path):

    from cf_testing.audio_files import click_track, write_pcm
    from cf_testing.video_models import video_assets
    from charforge.engine.video.audio import media_durations
    from charforge.engine.video.prompts import parse_prompt_schedule

    assets = video_assets(tmp_path / "assets")
    _video_models(comfy_env, assets)
    prompt = _api(WORKFLOWS / "video_audio_reactive.json")
    ids = _by_class(prompt)
    load, travel, generate, save = (ids[c][0] for c in ("CharForgeLoadAudio", "CharForgeAudioPromptTravel",
                                                        "CharForgeGenerateVideo", "CharForgeSaveVideo"))
    samples, _ = click_track(120.0, 4.0, 44100)  # clicks at 0.25, 0.75, ... s
    (comfy_env.base_dir / "input").mkdir(parents=True, exist_ok=True)
    write_pcm(comfy_env.base_dir / "input" / prompt[load]["inputs"]["audio"], samples, 44100)
    assert _source(prompt, save, "audio") == load and _source(prompt, generate, "prompt") == travel
    assert _source(prompt, generate, "frames") == travel and prompt[generate]["inputs"]["blend_prompts"] is False
    prompt[load]["inputs"].update(start=0.5, duration=2.0)  # the clicks now fall at 0.25, 0.75, ... s of the clip
    prompt[travel]["inputs"]["beats_per_prompt"] = 1
    prompt[ids["CharForgeLoadVideoModel"][0]]["inputs"].update(base_model="[diffusers] tiny_sd15",
                                                             motion_module=assets.modules["v3"].original_file.name)
    prompt[ids["CharForgeVideoLoRA"][0]]["inputs"]["lora_name"] = assets.character_lora.name
    prompt[generate]["inputs"].update(width=64, height=64, steps=2, context_length=8, context_overlap=2)
    with one_torch_thread():
        results = _run_prompt(prompt)
    schedule, frames, fps, _ = results[travel]
    assert (frames, fps) == (16, 8.0)
    assert [k.frame for k in parse_prompt_schedule(schedule)] == [0, 2, 6, 10, 14]
    assert results[generate][0].shape[:3] == (16, 64, 64)
    assert "frame 6: ohwx person jumping, laughing" in results[generate][2]  # the third prompt on the second beat
    # The bass schedule reaches the LoRA strength, one multiplier per context window, within its range.
    (bass,) = ids["CharForgeAudioSchedule"]
    assert _source(prompt, generate, "lora_strength_schedule") == bass and _source(prompt, bass, "frames") == travel
    assert len(results[bass][0]) == 16
    line = next(x for x in results[generate][2].splitlines() if x.startswith("LoRA strength x per window"))
    means = [float(v) for v in line.split(": ")[1].split(", ")]
    assert len(means) == 3 and all(0.85 <= m <= 1.0 for m in means)
    video = Path(results[save][0])
    assert video.suffix == ".mp4"
    video_seconds, audio_seconds = media_durations(video)
    assert video_seconds == pytest.approx(2.0) and abs(audio_seconds - video_seconds) < 1 / 8


@pytest.mark.slow
def test_video_hotshot_xl_makes_sixteen_frames_in_eight_frame_windows_with_the_lora(comfy_env, tmp_path):

    from cf_testing.video_models import build_tiny_hotshot_module, video_assets

    assets = video_assets(tmp_path / "assets")
    models = _video_models(comfy_env, assets, sdxl=True)
    build_tiny_hotshot_module(models / "animatediff_models" / "hsxl_temporal_layers.safetensors")
    prompt = _api(WORKFLOWS / "video_hotshot_xl.json")
    ids = _by_class(prompt)
    load, lora, generate, save = (ids[c][0] for c in ("CharForgeLoadVideoModel", "CharForgeVideoLoRA",
                                                      "CharForgeGenerateVideo", "CharForgeSaveVideo"))
    assert prompt[load]["inputs"]["motion_module"] == "hsxl_temporal_layers.safetensors"
    assert _source(prompt, generate, "model") == lora and _source(prompt, lora, "model") == load
    settings = prompt[generate]["inputs"]
    assert (settings["frames"], settings["fps"], settings["context_length"]) == (16, 8.0, 8)
    prompt[load]["inputs"]["base_model"] = "[diffusers] tiny_sdxl"
    prompt[lora]["inputs"]["lora_name"] = assets.sdxl_character_lora.name
    settings.update(width=64, height=64, steps=2)
    with one_torch_thread():
        results = _run_prompt(prompt)
    assert "HotShot-XL" in results[load][1] and "window 8 frames" in results[load][1]
    frames, fps, info = results[generate]
    assert frames.shape[:3] == (16, 64, 64) and fps == 8.0
    assert f"LoRA {assets.sdxl_character_lora.name} x0.8" in info
    assert "context: 3 window(s) of 8 frames, overlap 4" in info
    video = Path(results[save][0])
    assert video.suffix == ".mp4" and video.is_file()


@pytest.mark.slow
def test_video_face_motion_drives_animatediff_vid2vid_through_the_face_controlnet(comfy_env, tmp_path):
    """Face Motion's face maps, driving frames, frame count and rate reach Generate Video (ControlNet, video to
    video, character LoRA); the clip is saved and Identity Drift plots it."""
    import math

    from cf_testing.controlnet_models import tiny_video_controlnet, write_ldm_controlnet
    from cf_testing.face_models import face_image
    from cf_testing.face_motion_models import motion_frame, write_face_motion_pack
    from cf_testing.video_models import video_assets
    from charforge.engine.faces import FaceAnalyzer
    from charforge.engine.video import face_motion, write_video

    assets = video_assets(tmp_path / "assets")
    models = _video_models(comfy_env, assets)
    unet_config = dict(assets.sd15.unet_config)
    write_ldm_controlnet(tiny_video_controlnet(unet_config), unet_config, models / "controlnet" / "face_cn.safetensors")
    write_face_motion_pack(models / "insightface", "buffalo_l")
    frames = []
    for i in range(6):
        green = (136.0 + 2.0 * i, 166.0)
        blue = (green[0] + 36 * math.cos(math.radians(3.0 * i)), green[1] + 36 * math.sin(math.radians(3.0 * i)))
        frames.append(motion_frame((320, 320), (144, 144), green, blue))
    (comfy_env.base_dir / "input").mkdir(parents=True, exist_ok=True)

    prompt = _api(WORKFLOWS / "video_face_motion.json")
    ids = _by_class(prompt)
    motion, load, lora, generate, save, identity, drift = (ids[c][0] for c in (
        "CharForgeFaceMotion", "CharForgeLoadVideoModel", "CharForgeVideoLoRA", "CharForgeGenerateVideo",
        "CharForgeSaveVideo", "CharForgeBuildIdentity", "CharForgeIdentityDrift"))
    assert "KSampler" not in ids and "ControlNetApplyAdvanced" not in ids
    for name, output in (("control_frames", 0), ("init_images", 1), ("frames", 3)):
        assert prompt[generate]["inputs"][name] == [motion, output], name
    assert _source(prompt, save, "frames") == generate and _source(prompt, drift, "frames") == generate
    write_video(np.stack(frames), comfy_env.base_dir / "input" / prompt[motion]["inputs"]["video"], fps=10.0,
                quality=100)
    photos = comfy_env.base_dir / "input" / prompt[identity]["inputs"]["folder"]
    photos.mkdir(parents=True)
    for seed in range(2):
        Image.fromarray(face_image(person=0, noise=2, seed=seed)).save(photos / f"ref_{seed}.png")
    prompt[motion]["inputs"].update(width=64, height=64, max_frames=0)
    prompt[load]["inputs"].update(base_model="[diffusers] tiny_sd15", motion_module=assets.modules["v3"].original_file.name)
    prompt[lora]["inputs"]["lora_name"] = assets.character_lora.name
    prompt[generate]["inputs"].update(width=64, height=64, steps=2, context_length=4, context_overlap=1,
                                      controlnet="face_cn.safetensors")
    try:
        with one_torch_thread():
            results = _run_prompt(prompt)
    finally:
        FaceAnalyzer.clear_cache()
        face_motion.FaceLandmarker._cache.clear()
    clip, fps, info = results[generate]
    assert clip.shape[:3] == (6, 64, 64)
    assert "ControlNet face_cn.safetensors x0.9, steps 0 to 0.9" in info and "window(s) of 4 frames" in info
    assert Path(results[save][0]).suffix == ".mp4" and Path(results[save][0]).is_file()
    assert results[drift][0].ndim == 4


# ------------------------------------------------------------------------------------------------------------
# Flux.1 and SD3.5 generation (issue 18): ComfyUI's own loaders and samplers, the family's sampling defaults
# ------------------------------------------------------------------------------------------------------------

FLOW_WORKFLOWS = {"flux_lora": "flux-dev", "flux_best_of_n": "flux-dev", "flux_storyboard": "flux-dev",
                  "sd35_lora": "sd35-large", "sd35_best_of_n": "sd35-large", "sd35_storyboard": "sd35-large"}


def _by_class(prompt: dict[str, Any]) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    for node_id, node in prompt.items():
        ids.setdefault(node["class_type"], []).append(node_id)
    return ids


def _source(prompt: dict[str, Any], node_id: str, name: str) -> str:
    value = prompt[node_id]["inputs"][name]
    assert isinstance(value, list), f"{prompt[node_id]['class_type']}.{name} is not linked"
    return str(value[0])


@pytest.mark.parametrize("name", sorted(FLOW_WORKFLOWS))
def test_flux_and_sd35_workflows_sample_with_the_character_lora_and_the_familys_settings(name):
    from charforge.common.characters import family_generation

    prompt = _api(WORKFLOWS / f"{name}.json")
    ids = _by_class(prompt)
    gen = family_generation(FLOW_WORKFLOWS[name])
    (sampler,) = ids["KSampler"]
    inputs = prompt[sampler]["inputs"]
    assert (inputs["steps"], inputs["cfg"], inputs["sampler_name"], inputs["scheduler"]) == \
        (gen.steps, gen.cfg, gen.sampler, gen.scheduler)
    # The model path: base loader -> character LoRA (model only: these families' text encoders stay as they
    # are) -> the family's sampling node -> KSampler.
    sampling = _source(prompt, sampler, "model")
    lora = _source(prompt, sampling, "model")
    assert prompt[lora]["class_type"] == "LoraLoaderModelOnly" and prompt[lora]["inputs"]["strength_model"] > 0
    base = prompt[_source(prompt, lora, "model")]["class_type"]
    (latent,) = ids["EmptySD3LatentImage"]  # the 16-channel latent of both families
    assert "EmptyLatentImage" not in ids and "LoraLoader" not in ids
    assert (prompt[latent]["inputs"]["width"], prompt[latent]["inputs"]["height"]) == (gen.width, gen.height)
    positive = prompt[_source(prompt, sampler, "positive")]
    decode = ids["VAEDecode"][0]
    if FLOW_WORKFLOWS[name].startswith("flux"):
        assert base == "UNETLoader" and prompt[sampling]["class_type"] == "ModelSamplingFlux"
        # The resolution-dependent shift is computed for the latent's size.
        assert (prompt[sampling]["inputs"]["width"], prompt[sampling]["inputs"]["height"]) == (gen.width, gen.height)
        assert gen.cfg == 1.0 and positive["class_type"] == "FluxGuidance"
        assert positive["inputs"]["guidance"] == gen.guidance == 3.5
        (clip,) = ids["DualCLIPLoader"]
        assert prompt[clip]["inputs"]["type"] == "flux"
        assert {prompt[clip]["inputs"]["clip_name1"], prompt[clip]["inputs"]["clip_name2"]} == \
            {"clip_l.safetensors", "t5xxl_fp16.safetensors"}
        vae = _source(prompt, decode, "vae")
        assert prompt[vae]["class_type"] == "VAELoader" and prompt[vae]["inputs"]["vae_name"] == "ae.safetensors"
    else:
        assert base == "CheckpointLoaderSimple" and prompt[sampling]["class_type"] == "ModelSamplingSD3"
        assert prompt[sampling]["inputs"]["shift"] == gen.shift == 3.0
        assert gen.cfg > 1.0 and positive["class_type"] == "CLIPTextEncode"
        negative = prompt[_source(prompt, sampler, "negative")]
        assert negative["inputs"]["text"], "SD3.5 uses real guidance: the negative prompt counts"
        (clip,) = ids["TripleCLIPLoader"]
        assert {prompt[clip]["inputs"][f"clip_name{i}"] for i in (1, 2, 3)} == \
            {"clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"}
        assert prompt[_source(prompt, decode, "vae")]["class_type"] == "CheckpointLoaderSimple"
    # Every text encoding comes from the family's text-encoder loader.
    clip_loader = ids.get("DualCLIPLoader", ids.get("TripleCLIPLoader"))[0]
    assert all(_source(prompt, n, "clip") == clip_loader for n in ids["CLIPTextEncode"])


@pytest.mark.parametrize("name", ["flux_best_of_n", "sd35_best_of_n"])
def test_flux_and_sd35_best_of_n_score_every_candidate_by_identity_and_clip(name):
    prompt = _api(WORKFLOWS / f"{name}.json")
    ids = _by_class(prompt)
    (decode,) = ids["VAEDecode"]
    (latent,) = ids["EmptySD3LatentImage"]
    (best,) = ids["CharForgeBestOfN"]
    (combine,) = ids["CharForgeCombineScores"]
    assert prompt[best]["inputs"]["group_size"] == prompt[latent]["inputs"]["batch_size"] > 1
    assert prompt[best]["inputs"]["images"] == [decode, 0] and prompt[best]["inputs"]["scores"] == [combine, 0]
    assert prompt[_source(prompt, combine, "identity_scores")]["class_type"] == "CharForgeScoreIdentity"
    assert prompt[_source(prompt, combine, "clip_scores")]["class_type"] == "CharForgeClipScore"
    for scorer in ids["CharForgeScoreIdentity"] + ids["CharForgeClipScore"]:
        assert prompt[scorer]["inputs"]["images"] == [decode, 0]


@pytest.mark.parametrize("name", ["flux_storyboard", "sd35_storyboard"])
def test_flux_and_sd35_storyboards_prompt_and_seed_every_frame_from_the_scenes(name):
    prompt = _api(WORKFLOWS / f"{name}.json")
    ids = _by_class(prompt)
    (scenes,) = ids["CharForgeStoryScenes"]
    (sampler,) = ids["KSampler"]
    (select,) = ids["CharForgeStoryboardSelect"]
    assert prompt[sampler]["inputs"]["seed"] == [scenes, 1]
    encoders_from_scenes = [n for n in ids["CLIPTextEncode"] if prompt[n]["inputs"]["text"] == [scenes, 0]]
    assert len(encoders_from_scenes) == 1
    # The frame prompt reaches the sampler (through FluxGuidance for Flux).
    positive = _source(prompt, sampler, "positive")
    assert encoders_from_scenes[0] in {positive, *_ancestors(prompt, positive)}
    assert {k: prompt[select]["inputs"][k] for k in ("prompts", "seeds", "captions")} == \
        {"prompts": [scenes, 0], "seeds": [scenes, 1], "captions": [scenes, 2]}
    assert prompt[select]["inputs"]["images"] == [ids["VAEDecode"][0], 0]
