"""The newer shipped editor workflows, described for ``layout.py`` (run ``python workflows/layout.py``).

Each builder returns a :class:`layout.Layout`; the editor file it writes is what ComfyUI lists as a template
and what ``build_api.py`` converts into the API twin. The older files (dataset_prep, build_identity,
train_lora_sd15, score_best_of_n, video_animatediff) were laid out by hand and are not rewritten here.
"""

from __future__ import annotations

NEGATIVE = "blurry, low quality, deformed, watermark, text, several people"
POSITIVE = "photo of ohwx person, head and shoulders portrait, looking at the camera, natural light, sharp focus"
CLIP_PROMPT = "photo of a person, head and shoulders portrait, looking at the camera"
# SD1.5 sampling of the image workflows: 25 DPM++ 2M Karras steps at cfg 7.
SD_SAMPLING = {"seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0}


def caption_dataset(new):
    w = new("caption_dataset")
    w.note(
        "CAPTION DATASET - captions for an exported dataset, then a new kohya export with them.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Dataset > folder: the img folder 'dataset_prep' exported (its Export node prints it), e.g.\n"
        "  output/charforge/datasets/my_character/kohya/img (absolute path, or relative to ComfyUI's input\n"
        "  folder). recursive is on because the photos sit in '<repeats>_<trigger> <class>/'. read_captions is\n"
        "  off so the plain 'trigger, class' captions of the first export are replaced.\n"
        "- Caption Dataset > backend: 'wd14' (a local ONNX tagger) or 'openai' (any OpenAI-compatible vision\n"
        "  endpoint: set base_url and the NAME of the environment variable holding the key, never the key).\n"
        "- trigger / class_tokens: the same as in dataset_prep (the trigger goes first in every caption).\n\n"
        "MODELS\n"
        "wd14: a WD14-style tagger in models/wd14_tagger/<name>.onnx + <name>.csv (e.g. wd-v1-4-moat-tagger-v2);\n"
        "'model' empty takes the first one. openai: no local model.\n\n"
        "RESULT\n"
        "Export prints the new img folder (export_name 'captioned'): give it to train_lora_sd15 / train_lora_sdxl.\n"
        "Each photo has a one-line .txt caption next to it; the report shows caption coverage.")
    w.group("1 - Load the exported dataset", "#3f789e")
    load = w.node("CharForgeLoadDataset", folder="charforge/datasets/my_character/kohya/img",
                  name="my_character_captioned", recursive=True, read_captions=False)
    w.group("2 - Caption", "#8A8")
    cap = w.node("CharForgeCaptionDataset", backend="wd14", model="", mode="overwrite", trigger="ohwx",
                 class_tokens="person")
    w.link(load, "dataset", cap, "dataset")
    w.group("3 - Export (kohya) & report", "#b58b2a", width=2)
    _export_and_report(w, cap, "captioned", sheet_height=300, caption_mode="caption as is")
    return w


def _dataset_stages(w, source: int, buckets: str, upscaler: str | None = None) -> int:
    """Analyse (faces) -> Filter (a face required) -> Deduplicate -> Crop to `buckets`, with an upscale model
    for small photos if `upscaler` names one. Returns the Crop node."""
    analyse = w.node("CharForgeAnalyseDataset", face_detector="auto")
    filt = w.node("CharForgeFilterDataset", require_face=True)
    dedup = w.node("CharForgeDeduplicateDataset")
    upscale = w.node("UpscaleModelLoader", model_name=upscaler) if upscaler else None
    crop = w.node("CharForgeCropDataset", buckets=buckets, format="jpg")
    w.link(source, "dataset", analyse, "dataset")
    w.link(analyse, "dataset", filt, "dataset")
    w.link(filt, "dataset", dedup, "dataset")
    w.link(dedup, "dataset", crop, "dataset")
    if upscale:
        w.link(upscale, "UPSCALE_MODEL", crop, "upscale_model")
    return crop


def _export_and_report(w, source: int, export_name: str, sheet_height: int = 260, **export_widgets) -> int:
    """Export (kohya, trigger ohwx, class person, 10 repeats) -> Dataset Report, its contact sheet previewed.
    Returns the Export node."""
    exp = w.node("CharForgeExportDataset", trigger="ohwx", class_tokens="person", repeats=10,
                 export_name=export_name, **export_widgets)
    rep = w.node("CharForgeDatasetReport", trigger="ohwx")
    sheet = w.node("PreviewImage", title="Contact sheet", height=sheet_height)
    w.link(source, "dataset", exp, "dataset")
    w.link(exp, "dataset", rep, "dataset")
    w.link(rep, "contact_sheet", sheet, "images")
    return exp


def train_lora_sdxl(new):
    w = new("train_lora_sdxl")
    w.note(
        "TRAIN LoRA (SDXL) - a character LoRA from a kohya dataset folder and an SDXL checkpoint.\n\n"
        "SET BEFORE QUEUEING\n"
        "- base_model: your SDXL checkpoint in models/checkpoints (e.g. sd_xl_base_1.0.safetensors), or a diffusers\n"
        "  folder in models/diffusers ('[diffusers] <folder>').\n"
        "- dataset_folder: the img folder dataset_prep / caption_dataset exported (with Crop > buckets 'sdxl').\n"
        "- trigger_word: the trigger of the dataset; output_name: the LoRA's file name.\n"
        "- preset 'sdxl': 0 in steps / learning_rate / rank / resolution means 'the preset's value' (1024 px,\n"
        "  rank 16...). memory_profile 'auto' checks the GPU first and turns on gradient checkpointing / 8-bit\n"
        "  Adam when needed; 12 GB of VRAM is the practical minimum for SDXL.\n\n"
        "RESULT\n"
        "The LoRA goes to models/loras/<output_name>.safetensors (kohya keys: loads in LoraLoader). The run folder\n"
        "(output/charforge/train_runs/<output_name>) holds config, metrics.csv, loss.png, samples and checkpoints.\n"
        "Cancel stops within a step; queue again with resume 'auto' to go on where it stopped.")
    w.group("1 - Train", "#3f789e")
    train = w.node("CharForgeTrainLoRA", base_model="sd_xl_base_1.0.safetensors",
                   dataset_folder="charforge/datasets/my_character/kohya/img", trigger_word="ohwx",
                   output_name="my_character_sdxl", preset="sdxl", seed=42, use_preset_values=False)
    w.group("2 - Loss curve & samples", "#8A8")
    loss = w.node("PreviewImage", title="Loss curve", height=300)
    samples = w.node("PreviewImage", title="Samples", height=300)
    w.link(train, "loss_curve", loss, "images")
    w.link(train, "samples", samples, "images")
    return w


def _generation(w, *, ckpt: str, lora: str, batch: int, width: int = 512, height: int = 512):
    """Checkpoint + LoRA + prompts + empty latent: returns (model/clip node, positive, negative, latent, ckpt)."""
    w.group("1 - Model & character LoRA", "#3f789e")
    ckpt_id = w.node("CheckpointLoaderSimple", ckpt_name=ckpt)
    lora_id = w.node("LoraLoader", title="Character LoRA", lora_name=lora, strength_model=0.9, strength_clip=0.9)
    w.link(ckpt_id, "MODEL", lora_id, "model")
    w.link(ckpt_id, "CLIP", lora_id, "clip")
    w.group("2 - Prompts", "#8A8", width=2)
    pos, neg, latent = _prompts(w, (lora_id, "CLIP"), batch, width, height)
    return ckpt_id, lora_id, pos, neg, latent


def _prompts(w, clip, batch: int, width: int = 512, height: int = 512):
    """Positive and negative prompt (text encoder `clip`, a (node, output) pair) + the empty latent."""
    pos = w.node("CLIPTextEncode", title="Positive prompt", height=160, text=POSITIVE)
    neg = w.node("CLIPTextEncode", title="Negative prompt", height=120, text=NEGATIVE)
    latent = w.node("EmptyLatentImage", title="Empty Latent (N = batch_size)", width=width, height=height,
                    batch_size=batch)
    w.link(*clip, pos, "clip")
    w.link(*clip, neg, "clip")
    return pos, neg, latent


def sample(w, model, positive, negative, latent: int, vae, **settings):
    """KSampler -> VAEDecode; model, positive, negative and vae are (node, output) pairs. Returns both ids."""
    sampler = w.node("KSampler", **settings)
    decode = w.node("VAEDecode")
    w.link(*model, sampler, "model")
    w.link(*positive, sampler, "positive")
    w.link(*negative, sampler, "negative")
    w.link(latent, "LATENT", sampler, "latent_image")
    w.link(sampler, "LATENT", decode, "samples")
    w.link(*vae, decode, "vae")
    return sampler, decode


def save_image(w, images, prefix: str, title: str | None = None) -> None:
    """SaveImage of `images` (a (node, output) pair) as output/<prefix>_*.png."""
    save = w.node("SaveImage", title=title, height=300, filename_prefix=prefix)
    w.link(*images, save, "images")


def clip_score(w, images: int) -> int:
    """Load CLIP + CLIP Score of the IMAGE output of `images` against CLIP_PROMPT. Returns the score node."""
    clip = w.node("CharForgeLoadClip", model="clip-vit-large-patch14", device="auto")
    score = w.node("CharForgeClipScore", prompt=CLIP_PROMPT)
    w.link(clip, "clip", score, "clip")
    w.link(images, "IMAGE", score, "images")
    return score


def keep_best(w, images: int, scores, prefix: str) -> None:
    """Best of N (groups of 4) of the IMAGE output of `images` by `scores` (a (node, output) pair), saved."""
    best = w.node("CharForgeBestOfN", group_size=4)
    w.link(images, "IMAGE", best, "images")
    w.link(*scores, best, "scores")
    save_image(w, (best, "images"), prefix, title="Best candidate")


def score_and_keep_best(w, images: int, faces: int, identity: int, prefix: str) -> None:
    """Identity score + CLIP score, combined (1.0 / 0.5), and the best of each 4 kept."""
    score_id = w.node("CharForgeScoreIdentity")
    w.link(faces, "face_models", score_id, "face_models")
    w.link(identity, "identity", score_id, "identity")
    w.link(images, "IMAGE", score_id, "images")
    score_clip = clip_score(w, images)
    combined = w.node("CharForgeCombineScores", identity_weight=1.0, text_weight=0.5)
    w.link(score_id, "scores", combined, "identity_scores")
    w.link(score_clip, "scores", combined, "clip_scores")
    keep_best(w, images, (combined, "scores"), prefix)


def _build_identity(w, faces: int, **widgets) -> int:
    identity = w.node("CharForgeBuildIdentity", name="my_character", folder="charforge/my_character", **widgets)
    w.link(faces, "face_models", identity, "face_models")
    return identity


def _video_model(w, base_model: str, motion_module: str, lora_name: str, strength: float,
                 lora_title: str = "Character LoRA") -> int:
    """Load Video Model -> Video LoRA. Returns the LoRA node (its 'model' output feeds Generate Video)."""
    model = w.node("CharForgeLoadVideoModel", base_model=base_model, motion_module=motion_module)
    lora = w.node("CharForgeVideoLoRA", title=lora_title, lora_name=lora_name, strength=strength)
    w.link(model, "model", lora, "model")
    return lora


def _save_video(w, frames, fps, prefix: str, height: int | None = 420, **widgets) -> int:
    """Save Video (mp4) of `frames` at `fps` (both (node, output) pairs)."""
    save = w.node("CharForgeSaveVideo", height=height, format="mp4", filename_prefix=prefix, **widgets)
    w.link(*frames, save, "frames")
    w.link(*fps, save, "fps")
    return save


def _drift_check(w, faces: int, identity: int, frames: int) -> None:
    """Identity Drift of Generate Video's frames against `identity`, its plot previewed."""
    drift = w.node("CharForgeIdentityDrift")
    plot = w.node("PreviewImage", title="Identity drift", height=260)
    w.link(faces, "face_models", drift, "face_models")
    w.link(identity, "identity", drift, "identity")
    w.link(frames, "frames", drift, "frames")
    w.link(drift, "plot", plot, "images")


def generate_best_of_n_clip(new):
    w = new("generate_best_of_n_clip")
    w.note(
        "GENERATE + BEST OF N BY PROMPT AGREEMENT - ComfyUI's own nodes generate N candidates with the character\n"
        "LoRA; CharForge scores each one against the prompt with CLIP and keeps the best.\n\n"
        "Use it for characters no face detector finds (drawn, stylised, non-human); for people, score_best_of_n\n"
        "picks by identity (face similarity to the reference photos) instead.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Checkpoint: the base model the LoRA was trained on (SD1.5 here; SDXL works at 1024 px).\n"
        "- Character LoRA: models/loras/<output_name>.safetensors from the training workflow.\n"
        "- Positive prompt: start with the trigger word. CLIP Score > prompt: the same text without the trigger\n"
        "  (CLIP does not know it).\n"
        "- Empty Latent > batch_size = N candidates; Best of N > group_size = N.\n\n"
        "MODELS\n"
        "checkpoints/ (base), loras/ (character), clip_vision/<folder> (a Hugging Face CLIP folder such as\n"
        "openai/clip-vit-large-patch14, with config, weights, tokenizer and preprocessor_config.json).\n\n"
        "RESULT\n"
        "output/charforge/candidates_*.png (every candidate), output/charforge/best_*.png (the best), the score\n"
        "table on CLIP Score.")
    ckpt, lora, pos, neg, latent = _generation(w, ckpt="v1-5-pruned-emaonly.safetensors",
                                               lora="my_character.safetensors", batch=4)
    w.group("3 - Sample", "#a1309b")
    _, decode = sample(w, (lora, "MODEL"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), latent, (ckpt, "VAE"),
                       **SD_SAMPLING)
    save_image(w, (decode, "IMAGE"), "charforge/candidates", title="Every candidate")
    w.group("4 - Score by CLIP & keep the best", "#b58b2a")
    score = clip_score(w, decode)
    keep_best(w, decode, (score, "scores"), "charforge/best")
    return w


def controlnet_lora(new):
    w = new("controlnet_lora")
    w.note(
        "CONTROLNET + CHARACTER LoRA - the character in a given pose, depth or outline, with ComfyUI's own\n"
        "ControlNet nodes.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Checkpoint / Character LoRA: base model and models/loras/<your LoRA>.safetensors.\n"
        "- Load Image (control image): a photo or drawing whose outline the result should follow. The Canny node\n"
        "  turns it into an edge map for a canny ControlNet (control_v11p_sd15_canny).\n"
        "- POSE or DEPTH: give Load Image a ready pose skeleton (OpenPose) or depth map instead, connect Load\n"
        "  Image's IMAGE straight to Apply ControlNet's image (bypass Canny with Ctrl+B), and pick the matching\n"
        "  ControlNet (control_v11p_sd15_openpose, control_v11f1p_sd15_depth). This workflow does not draw pose\n"
        "  skeletons or depth maps itself: make them with a preprocessor pack or any other tool.\n"
        "- Apply ControlNet > strength 0.8, end_percent 0.8 let the LoRA's face come through in the last steps.\n\n"
        "MODELS\n"
        "checkpoints/ (SD1.5 base), loras/ (character LoRA), controlnet/ (a ControlNet of the same base family).\n\n"
        "RESULT\n"
        "output/charforge/controlnet_*.png; the control map is previewed.")
    ckpt, lora, pos, neg, latent = _generation(w, ckpt="v1-5-pruned-emaonly.safetensors",
                                               lora="my_character.safetensors", batch=1)
    w.group("3 - Control image", "#a1309b")
    image = w.node("LoadImage", title="Load Image (control image)", height=320, image="example.png")
    canny = w.node("Canny", low_threshold=0.4, high_threshold=0.8)
    preview = w.node("PreviewImage", title="Control map", height=260)
    cn = w.node("ControlNetLoader", control_net_name="control_v11p_sd15_canny.pth")
    w.link(image, "IMAGE", canny, "image")
    w.link(canny, "IMAGE", preview, "images")
    w.group("4 - Apply ControlNet & sample", "#b58b2a")
    apply = w.node("ControlNetApplyAdvanced", title="Apply ControlNet", strength=0.8, start_percent=0.0,
                   end_percent=0.8)
    w.link(pos, "CONDITIONING", apply, "positive")
    w.link(neg, "CONDITIONING", apply, "negative")
    w.link(cn, "CONTROL_NET", apply, "control_net")
    w.link(canny, "IMAGE", apply, "image")
    w.link(ckpt, "VAE", apply, "vae")
    _, decode = sample(w, (lora, "MODEL"), (apply, "positive"), (apply, "negative"), latent, (ckpt, "VAE"),
                       **SD_SAMPLING)
    save_image(w, (decode, "IMAGE"), "charforge/controlnet")
    return w


def _photos_to_lora(w):
    """Groups 1-3 of character_lora and character_pipeline: photos -> dataset -> captions -> Train LoRA."""
    w.group("1 - Photos -> dataset", "#3f789e")
    load = w.node("CharForgeLoadDataset", folder="charforge/my_character", name="my_character")
    crop = _dataset_stages(w, load, "sd15")
    w.group("2 - Captions, export & report", "#8A8", width=2)
    cap = w.node("CharForgeCaptionDataset", backend="wd14", model="", mode="skip existing", trigger="ohwx",
                 class_tokens="person")
    w.link(crop, "dataset", cap, "dataset")
    exp = _export_and_report(w, cap, "kohya", caption_mode="caption as is")
    w.group("3 - Train the LoRA", "#a1309b")
    train = w.node("CharForgeTrainLoRA", base_model="v1-5-pruned-emaonly.safetensors", trigger_word="ohwx",
                   output_name="my_character", preset="sd15", resolution=512, seed=42,
                   use_preset_values=False)
    loss = w.node("PreviewImage", title="Loss curve", height=260)
    w.link(exp, "train_data_dir", train, "dataset_folder")
    w.link(train, "loss_curve", loss, "images")
    return train


def character_lora(new):
    w = new("character_lora")
    w.note(
        "CHARACTER LoRA IN ONE GRAPH - photos -> dataset -> captions -> LoRA, queued once.\n\n"
        "The first half of the end-to-end pipeline; character_pipeline goes on to images and video with the LoRA\n"
        "in the same graph. Or, after this run, press R (refresh) so LoraLoader lists the new file and use\n"
        "score_best_of_n / generate_best_of_n_clip and video_animatediff. 'charforge pipeline PHOTOS --out out'\n"
        "runs all stages headless (see docs/pipeline.md).\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Dataset > folder: your photo folder (absolute, or relative to ComfyUI's input folder).\n"
        "- Filter > require_face: off for drawn or non-human characters.\n"
        "- trigger / class_tokens in Caption, Export and Train: the same word everywhere.\n"
        "- Train > base_model: an SD1.5 checkpoint (preset sd15, Crop buckets sd15). For SDXL set buckets 'sdxl'\n"
        "  and preset 'sdxl'.\n\n"
        "MODELS\n"
        "checkpoints/ (base), wd14_tagger/<name>.onnx + .csv (captions); optional insightface/models/buffalo_l.\n\n"
        "RESULT\n"
        "output/charforge/datasets/<name>/ (manifest, crops, kohya export, report.html), models/loras/<output_name>"
        ".safetensors, the run folder under output/charforge/train_runs.")
    _photos_to_lora(w)
    return w


def character_pipeline(new):
    w = new("character_pipeline")
    w.note(
        "CHARACTER PIPELINE IN ONE GRAPH - photos -> dataset -> captions -> LoRA -> scored images -> video.\n\n"
        "Queue once: ComfyUI runs a node only after every node linked into it, so the LoRA is trained first\n"
        "(Train LoRA's lora_name STRING feeds Load LoRA (by name) and Video LoRA), then the images and the video\n"
        "are made with it. Queue again with the same settings and the finished stages are taken from the cache.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Dataset > folder and Build Identity > folder: your photo folder (absolute, or relative to\n"
        "  ComfyUI's input folder); the same folder in both.\n"
        "- Filter > require_face: off for drawn or non-human characters (then bypass the face nodes, Ctrl+B:\n"
        "  Build Identity, Score Identity, Identity Drift, and set Combine Scores > identity_weight 0).\n"
        "- trigger / class_tokens in Caption, Export, Train and the prompts: the same word everywhere.\n"
        "- Base model: the same SD1.5 checkpoint in Train LoRA, Load Checkpoint and Load Video Model. For SDXL\n"
        "  set Crop buckets 'sdxl', Train preset 'sdxl', 1024 px latents and an SDXL motion module.\n"
        "- Empty Latent > batch_size = N candidates = Best of N > group_size.\n"
        "- CLIP Score > prompt: the positive prompt without the trigger word (CLIP does not know it).\n\n"
        "MODELS\n"
        "checkpoints/ (SD1.5 base), wd14_tagger/<name>.onnx + .csv (captions), insightface/models/buffalo_l\n"
        "(faces), clip_vision/<folder> (a Hugging Face CLIP folder), animatediff_models/ (mm_sd_v15_v2.ckpt or\n"
        "v3_sd15_mm.ckpt). No model needs to be in a list for the LoRA: it is found by name after training.\n\n"
        "RESULT\n"
        "output/charforge/datasets/<name>/ (crops, kohya export with captions, report.html), models/loras/\n"
        "<output_name>.safetensors (+ run folder in output/charforge/train_runs), output/charforge/pipeline_\n"
        "candidate_*.png and pipeline_best_*.png with the score tables on the scoring nodes, output/charforge/\n"
        "pipeline_video_*.mp4 and its identity-drift plot.", height=900)
    train = _photos_to_lora(w)
    w.group("4 - Model + the trained LoRA, prompts", "#b58b2a", width=2)
    ckpt = w.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    lora = w.node("CharForgeLoadLoraByName", title="Load LoRA (by name): the trained LoRA", strength_model=0.9,
                  strength_clip=0.9)
    w.link(ckpt, "MODEL", lora, "model")
    w.link(ckpt, "CLIP", lora, "clip")
    w.link(train, "lora_name", lora, "lora_name")
    pos, neg, latent = _prompts(w, (lora, "clip"), batch=4)
    w.group("5 - Sample N candidates", "#3f789e")
    _, decode = sample(w, (lora, "model"), (pos, "CONDITIONING"), (neg, "CONDITIONING"), latent, (ckpt, "VAE"),
                       **SD_SAMPLING)
    save_image(w, (decode, "IMAGE"), "charforge/pipeline_candidate", title="Every candidate")
    w.group("6 - Score (identity + CLIP) & keep the best", "#8A8", width=2)
    faces = w.node("CharForgeLoadFaceModels", pack="buffalo_l")
    identity = _build_identity(w, faces, save=True)
    score_and_keep_best(w, decode, faces, identity, "charforge/pipeline_best")
    w.group("7 - Video with the trained LoRA & drift check", "#a1309b", width=2)
    video_lora = _video_model(w, "v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt", "(none)", 0.8,
                              lora_title="Video LoRA: the trained LoRA")
    generate = w.node("CharForgeGenerateVideo", height=520, prompt=(
        "0: photo of ohwx person smiling, looking at the camera\n16: photo of ohwx person laughing, turning the "
        "head\nnatural light, sharp focus"), negative_prompt="blurry, low quality, deformed, several people",
        frames=32, fps=8.0, width=512, steps=25, cfg=7.5, scheduler="ddim", seed=42, context_length=16,
        context_overlap=4, widgets={"height": 512})
    w.link(train, "lora_name", video_lora, "lora_name_from")
    w.link(video_lora, "model", generate, "model")
    _save_video(w, (generate, "frames"), (generate, "fps"), "charforge/pipeline_video", height=None)
    _drift_check(w, faces, identity, generate)
    return w


def synthesize_dataset(new):
    w = new("synthesize_dataset")
    w.note(
        "SYNTHESIZE DATASET - more photos from few: the character's face swapped onto source images, restored,\n"
        "scored, then the usual dataset stages with small photos upscaled by a model.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Build Identity > folder and Load Dataset > folder: your few photos of the character (absolute, or\n"
        "  relative to ComfyUI's input folder); the same folder in both.\n"
        "- Synthesize Dataset > sources: a folder of images to put the character into (poses, outfits,\n"
        "  backgrounds). It is only read.\n"
        "- threshold 0 uses the identity's suggested threshold; max_share caps the synthetic images (0.4: at most\n"
        "  4 in 10 of the dataset), keeping the best-scoring.\n"
        "- No restorer or no upscaler? Bypass Load Face Restorer / Load Upscale Model (Ctrl+B).\n\n"
        "MODELS\n"
        "insightface/models/buffalo_l (faces; the swapper expects buffalo_l identities), insightface/\n"
        "inswapper_128.onnx (swap), facerestore_models/ (GFPGANv1.4.pth, RestoreFormer.pth; codeformer.pth needs\n"
        "spandrel_extra_arches), upscale_models/ (any model ComfyUI's Load Upscale Model reads).\n\n"
        "RESULT\n"
        "output/charforge/datasets/<name>/: synthetic/ (the swaps), crops, the kohya export and report.html, where\n"
        "synthetic images are marked with their source image and upscaled photos with the factor.")
    w.group("1 - Character & models", "#3f789e")
    faces = w.node("CharForgeLoadFaceModels", pack="buffalo_l")
    identity = _build_identity(w, faces)
    swapper = w.node("CharForgeLoadFaceSwapper", swapper="inswapper_128.onnx")
    restorer = w.node("CharForgeLoadFaceRestorer", model="GFPGANv1.4.pth")
    w.group("2 - Photos + swapped sources", "#8A8")
    load = w.node("CharForgeLoadDataset", folder="charforge/my_character", name="my_character")
    synth = w.node("CharForgeSynthesizeDataset", sources="charforge/sources", which="main", max_share=0.4,
                   fidelity=0.5)
    preview = w.node("PreviewImage", title="Accepted synthetic images", height=260)
    w.link(load, "dataset", synth, "dataset")
    w.link(faces, "face_models", synth, "face_models")
    w.link(swapper, "swapper", synth, "swapper")
    w.link(identity, "identity", synth, "identity")
    w.link(restorer, "restorer", synth, "restorer")
    w.link(synth, "synthetic", preview, "images")
    w.group("3 - Dataset stages", "#b58b2a")
    crop = _dataset_stages(w, synth, "sdxl", upscaler="4x-UltraSharp.pth")
    w.group("4 - Export & report", "#a1309b")
    _export_and_report(w, crop, "kohya")
    return w


def video_audio_reactive(new):
    w = new("video_audio_reactive")
    w.note(
        "AUDIO-REACTIVE VIDEO - an AnimateDiff clip of your character whose prompt changes on the music's beats,\n"
        "saved with the music in the mp4.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Audio > audio: a sound file in ComfyUI's input folder (wav, flac, mp3, m4a; copy it there and\n"
        "  press R). start / duration: the part of the song the clip uses (duration 0 = to the end). ComfyUI's\n"
        "  own Load Audio (with an upload button) can take its place: its audio goes to the same two inputs.\n"
        "- Audio Prompt Travel > prompts: one prompt per line, keep your trigger word; a new line every\n"
        "  beats_per_prompt beats (4 = once a bar), cycling. shared is added to every prompt. fps sets the clip's\n"
        "  frame rate; frames 0 = as long as the sound. Generate Video takes its prompt, frames and fps.\n"
        "- Load Video Model: an SD1.5 checkpoint and an AnimateDiff motion module (models/animatediff_models/).\n"
        "- Character LoRA: your LoRA from models/loras/ (bypass it with Ctrl+B for the base model).\n"
        "- Generate Video > blend_prompts: off switches the prompt exactly on the beat, on glides between beats.\n"
        "- Bass -> LoRA strength (Audio Schedule): the LoRA strength follows the bass, x0.85 quiet to x1.0 on a hit,\n"
        "  per context window (the mean over its frames; shorter context_length follows more closely). Generate\n"
        "  Video > lora_schedule_applies_to picks the LoRAs it scales; delete the link for a constant strength.\n\n"
        "MODELS\n"
        "SD1.5 checkpoint (models/checkpoints/), AnimateDiff motion module, character LoRA (models/loras/).\n\n"
        "RESULT\n"
        "output/charforge/audio_video_00001_.mp4 with the song's part as AAC audio, in sync, as long as the clip\n"
        "(shown on Save Video). Audio Prompt Travel's info lists the tempo, the beat frames and the schedule.\n"
        "8 s at 8 fps is 64 frames: made in overlapping 16-frame windows.")
    w.group("1 - Music & beats", "#3f789e")
    audio = w.node("CharForgeLoadAudio", audio="my_song.wav", start=0.0, duration=8.0)
    travel = w.node("CharForgeAudioPromptTravel", height=330,
                    prompts="ohwx person dancing, arms up\nohwx person spinning, hair flying\n"
                    "ohwx person jumping, laughing",
                    shared="photo, stage lights, natural skin", fps=8.0, frames=0, beats_per_prompt=2,
                    skip_beats=0)
    w.link(audio, "audio", travel, "audio")
    bass = w.node("CharForgeAudioSchedule", title="Bass -> LoRA strength", feature="low", low=0.85, high=1.0,
                  smooth=0.0, attack=0.0, release=0.3, invert=False, widgets={"fps": 8.0, "frames": 0})
    w.link(audio, "audio", bass, "audio")
    w.link(travel, "fps", bass, "fps")
    w.link(travel, "frames", bass, "frames")
    w.group("2 - Model & character LoRA", "#8A8")
    lora = _video_model(w, "v1-5-pruned-emaonly.safetensors", "mm_sd_v15_v2.ckpt", "my_character.safetensors", 0.8)
    w.group("3 - Generate on the beat", "#a1309b")
    generate = w.node("CharForgeGenerateVideo", negative_prompt=NEGATIVE, width=512, height=512, steps=25,
                      cfg=7.5, scheduler="ddim", seed=42, context_length=16, context_overlap=4,
                      blend_prompts=False, widgets={"prompt": "", "frames": 64, "fps": 8.0})
    w.link(lora, "model", generate, "model")
    w.link(travel, "prompt", generate, "prompt")
    w.link(travel, "frames", generate, "frames")
    w.link(travel, "fps", generate, "fps")
    w.link(bass, "schedule", generate, "lora_strength_schedule")
    w.group("4 - Save with the music", "#b58b2a")
    save = _save_video(w, (generate, "frames"), (generate, "fps"), "charforge/audio_video", quality=80, loop_count=0,
                       audio_offset=0.0, audio_codec="auto")
    w.link(audio, "audio", save, "audio")
    return w


def video_face_motion(new):
    w = new("video_face_motion")
    w.note(
        "FACE-DRIVEN VIDEO - your character's face follows a driving video (talking, expressions, head turns):\n"
        "the video's face landmarks steer a ControlNet inside AnimateDiff video to video, the motion module keeps\n"
        "the frames coherent and the character LoRA keeps the identity, checked per frame by Identity Drift.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Face Motion > video: the driving video in ComfyUI's input folder (copy it there and press R; `charforge\n"
        "  video --driving-video FILE` uploads it). max_frames 16 / frame_step 1: the part used. width / height:\n"
        "  the face maps' size (keep them as Generate Video's). landmarks auto takes buffalo_l's 68 3D points;\n"
        "  style dots is the OpenPose face style. Connect an image of your character to character_image to move\n"
        "  the face onto its face box.\n"
        "- Load Video Model: the SD1.5 base and an AnimateDiff motion module; Character LoRA: your LoRA; keep the\n"
        "  trigger word in the prompt.\n"
        "- Generate Video > controlnet: an SD1.5 ControlNet that reads face dots (control_v11p_sd15_openpose);\n"
        "  control_strength 0.9, control_end 0.9. strength 0.7 redraws the driving frames (video to video); 1.0\n"
        "  ignores their colours. Frame count and rate come from Face Motion; clips longer than the context\n"
        "  length are made in overlapping windows, each with its own face maps.\n"
        "- Build Identity > folder: photos of your character, for the drift check.\n\n"
        "MODELS\n"
        "insightface/models/buffalo_l (detector + 1k3d68 / 2d106det landmarks), checkpoints/ (SD1.5),\n"
        "animatediff_models/ (v3_sd15_mm.ckpt), loras/, controlnet/ (control_v11p_sd15_openpose.pth).\n\n"
        "RESULT\n"
        "output/charforge/face_video_00001_.mp4 at the driving video's frame rate; the face maps and the identity\n"
        "drift plot are previewed; Face Motion's pose_table lists yaw / pitch / roll per frame.")
    w.group("1 - Driving video -> face maps", "#3f789e")
    faces = w.node("CharForgeLoadFaceModels", pack="buffalo_l")
    motion = w.node("CharForgeFaceMotion", video="driving.mp4", width=512, height=512, max_frames=16, frame_step=1,
                    landmarks="auto", style="dots", smoothing_hz=1.5, smoothing_beta=0.05)
    maps = w.node("PreviewImage", title="Face maps", height=260)
    w.link(faces, "face_models", motion, "face_models")
    w.link(motion, "control_frames", maps, "images")
    w.group("2 - Video model & character LoRA", "#8A8")
    lora = _video_model(w, "v1-5-pruned-emaonly.safetensors", "v3_sd15_mm.ckpt", "my_character.safetensors", 0.9)
    w.group("3 - Face ControlNet & video to video", "#a1309b")
    generate = w.node("CharForgeGenerateVideo", height=640,
                      prompt="photo of ohwx person talking, head and shoulders portrait, natural light, sharp focus",
                      negative_prompt=NEGATIVE, width=512, steps=25, cfg=7.5, scheduler="ddim", seed=42,
                      context_length=16, context_overlap=4, strength=0.7,
                      controlnet="control_v11p_sd15_openpose.pth", control_strength=0.9, control_start=0.0,
                      control_end=0.9, widgets={"frames": 16, "height": 512})
    w.link(lora, "model", generate, "model")
    w.link(motion, "frames", generate, "frames")
    w.link(motion, "driving_frames", generate, "init_images")
    w.link(motion, "control_frames", generate, "control_frames")
    w.group("4 - Save & identity drift", "#b58b2a")
    _save_video(w, (generate, "frames"), (motion, "fps"), "charforge/face_video", quality=80, loop_count=0)
    identity = _build_identity(w, faces, save=True)
    _drift_check(w, faces, identity, generate)
    return w


def video_hotshot_xl(new):
    w = new("video_hotshot_xl")
    w.note(
        "HOTSHOT-XL VIDEO - an SDXL clip of your character with HotShot-XL's temporal layers and your SDXL LoRA.\n\n"
        "SET BEFORE QUEUEING\n"
        "- Load Video Model > base_model: an SDXL checkpoint; HotShot-XL works best with one fine-tuned for\n"
        "  512 x 512 (hotshotco/SDXL-512). motion_module: hsxl_temporal_layers.safetensors (or the\n"
        "  [diffusers] Hotshot-XL/unet folder of a clone of hotshotco/Hotshot-XL).\n"
        "- Character LoRA: your SDXL LoRA from models/loras/ (bypass it with Ctrl+B for the base model).\n"
        "- Generate Video > prompt: one keyframe per line ('<frame>: prompt'), keep your trigger word; a line\n"
        "  without a frame number is added to every keyframe.\n"
        "- context_length 8: HotShot-XL was trained on 8-frame clips (1 s at 8 fps). Longer clips are made in\n"
        "  overlapping 8-frame windows (at most 24 per window). beta_schedule auto = SDXL's own noise schedule.\n\n"
        "MODELS\n"
        "SDXL checkpoint (models/checkpoints/), hsxl_temporal_layers.safetensors (models/animatediff_models/),\n"
        "SDXL character LoRA (models/loras/).\n\n"
        "RESULT\n"
        "output/charforge/hotshot_xl_00001_.mp4: 16 frames at 8 fps, shown on Save Video.")
    w.group("1 - SDXL, HotShot-XL, LoRA", "#8A8")
    lora = _video_model(w, "sd_xl_base_1.0.safetensors", "hsxl_temporal_layers.safetensors",
                        "my_character_xl.safetensors", 0.8)
    w.group("2 - Generate (8-frame windows)", "#a1309b")
    generate = w.node("CharForgeGenerateVideo", height=560,
                      prompt="0: photo of ohwx person smiling, looking at the camera\n"
                      "8: photo of ohwx person laughing, turning the head\nnatural light, sharp focus",
                      negative_prompt=NEGATIVE, frames=16, fps=8.0, width=512, steps=30, cfg=7.5,
                      scheduler="euler_a", seed=42, context_length=8, context_overlap=4,
                      widgets={"height": 512})
    w.link(lora, "model", generate, "model")
    w.group("3 - Save", "#b58b2a")
    _save_video(w, (generate, "frames"), (generate, "fps"), "charforge/hotshot_xl", quality=80)
    return w


BUILDERS = (caption_dataset, train_lora_sdxl, generate_best_of_n_clip, controlnet_lora, character_lora,
            character_pipeline, synthesize_dataset, video_audio_reactive, video_face_motion,
            video_hotshot_xl)
