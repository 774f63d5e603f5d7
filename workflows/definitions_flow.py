"""The shipped Flux.1 and SD3.5 generation workflows, described for ``layout.py`` (beside ``definitions.py``).

Three per family, all on ComfyUI's own loaders and samplers with a character LoRA: plain generation, best of N
scored by CharForge (identity and CLIP), and the storyboard. The sampling settings are each family's defaults
from the character-preset schema (``charforge.common.characters.family_generation``), which the pipeline also
uses, so the workflows and ``charforge pipeline`` agree.

Flux: UNETLoader (the diffusion model alone) -> LoraLoaderModelOnly -> ModelSamplingFlux (the resolution-dependent
shift, so its width/height match the latent's); DualCLIPLoader type flux (CLIP-L + T5-XXL) -> CLIPTextEncode ->
FluxGuidance; EmptySD3LatentImage (16-channel latent); KSampler at cfg 1.0 (Flux.1 is guidance-distilled, the
negative prompt is not used at cfg 1); VAELoader (ae.safetensors) -> VAEDecode.

SD3.5: CheckpointLoaderSimple (MODEL and VAE of sd3.5_large.safetensors) -> LoraLoaderModelOnly ->
ModelSamplingSD3 (shift 3); TripleCLIPLoader (CLIP-L, CLIP-G, T5-XXL); EmptySD3LatentImage; KSampler with real
classifier-free guidance (cfg 4.5) and a negative prompt.
"""

from __future__ import annotations

from functools import partial

from charforge.common.characters import family_generation
from definitions import CLIP_PROMPT, NEGATIVE, POSITIVE, sample, save_image, score_and_keep_best

STORY_SCENES = (
    "close-up portrait of the character, face clearly visible, looking at the camera, morning light\n"
    "the character opens an old letter at a kitchen table, medium shot\n"
    "the character walks through a busy market street, full body, afternoon\n"
    "the character boards a small boat at the harbour, wide shot, windy\n"
    "the character stands on the deck at sunset, three-quarter view\n"
    "the character arrives on an island beach, full body, golden hour"
)

FLUX = {
    "family": "flux-dev",
    "title": "FLUX.1",
    "lora": "my_character_flux.safetensors",
    "models": (
        "diffusion_models/ (or unet/): flux1-dev.safetensors (or an fp8 copy; flux1-schnell for schnell: 4 steps);\n"
        "text_encoders/ (or clip/): clip_l.safetensors and t5xxl_fp16.safetensors (or t5xxl_fp8_e4m3fn);\n"
        "vae/: ae.safetensors (the FLUX.1 autoencoder); loras/: the character LoRA."
    ),
    "set": (
        "- Load Diffusion Model: the Flux model in models/diffusion_models (weight_dtype fp8_e4m3fn halves its\n"
        "  memory). The LoRA must be trained on the same family (Train LoRA with a Flux base; any kohya-layout\n"
        "  Flux LoRA loads).\n"
        "- DualCLIPLoader: clip_l + t5xxl, type flux.\n"
        "- Flux Guidance 3.5 replaces cfg: the KSampler stays at cfg 1.0 (the negative prompt is then not used).\n"
        "  schnell: steps 4, guidance is ignored.\n"
        "- ModelSamplingFlux > width/height: the same as the Empty Latent's (the shift depends on the size)."
    ),
}
SD35 = {
    "family": "sd35-large",
    "title": "SD3.5",
    "lora": "my_character_sd35.safetensors",
    "models": (
        "checkpoints/: sd3.5_large.safetensors (or sd3.5_medium; its MODEL and VAE are used);\n"
        "text_encoders/ (or clip/): clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors;\n"
        "loras/: the character LoRA."
    ),
    "set": (
        "- Load Checkpoint: the SD3.5 file in models/checkpoints (a file without a VAE: add Load VAE).\n"
        "  The LoRA must be trained on the same model (Large and Medium LoRAs do not mix).\n"
        "- TripleCLIPLoader: clip_l, clip_g, t5xxl (one file each).\n"
        "- ModelSamplingSD3 > shift 3.0; KSampler cfg 4.5 with the negative prompt, euler / sgm_uniform\n"
        "  (Medium: 40 steps)."
    ),
}


def _family_models(w, spec: dict, *, strength: float = 1.0):
    """Group 1: the family's loaders + the character LoRA. Returns (model, clip, vae) node ids."""
    gen = family_generation(spec["family"])
    w.group("1 - Model, text encoders & character LoRA", "#3f789e")
    if spec is FLUX:
        base = w.node("UNETLoader", title="Load Diffusion Model (Flux)", unet_name="flux1-dev.safetensors",
                      weight_dtype="default")
        clip = w.node("DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                      type="flux", device="default")
        vae = w.node("VAELoader", title="Load VAE (ae)", vae_name="ae.safetensors")
        vae_out = (vae, "VAE")
    else:
        base = w.node("CheckpointLoaderSimple", title="Load Checkpoint (SD3.5)", ckpt_name="sd3.5_large.safetensors")
        clip = w.node("TripleCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                      clip_name3="t5xxl_fp16.safetensors")
        vae_out = (base, "VAE")
    lora = w.node("LoraLoaderModelOnly", title="Character LoRA", lora_name=spec["lora"], strength_model=strength)
    w.link(base, "MODEL", lora, "model")
    if spec is FLUX:
        sampling = w.node("ModelSamplingFlux", max_shift=1.15, base_shift=0.5, width=gen.width, height=gen.height)
    else:
        sampling = w.node("ModelSamplingSD3", shift=gen.shift)
    w.link(lora, "MODEL", sampling, "model")
    return sampling, clip, vae_out


def _prompts(w, spec: dict, clip: int, positive: str = POSITIVE, batch: int = 1,
             group: str = "2 - Prompts & latent"):
    """Positive (Flux: + FluxGuidance), negative and the empty latent. Returns ((node, output), neg, latent)."""
    gen = family_generation(spec["family"])
    w.group(group, "#8A8")
    pos = w.node("CLIPTextEncode", title="Positive prompt", height=160 if positive else 100, text=positive)
    if spec is FLUX:
        neg = w.node("CLIPTextEncode", title="Negative prompt (unused at cfg 1.0)", height=100, text="")
    else:
        neg = w.node("CLIPTextEncode", title="Negative prompt", height=120, text=NEGATIVE)
    w.link(clip, "CLIP", pos, "clip")
    w.link(clip, "CLIP", neg, "clip")
    cond = (pos, "CONDITIONING")
    if spec is FLUX:
        guided = w.node("FluxGuidance", guidance=gen.guidance)
        w.link(pos, "CONDITIONING", guided, "conditioning")
        cond = (guided, "CONDITIONING")
    title = "Empty Latent (N = batch_size)" if batch > 1 else "Empty Latent"
    latent = w.node("EmptySD3LatentImage", title=title, width=gen.width, height=gen.height, batch_size=batch)
    return cond, neg, latent


def _sample(w, spec: dict, model: int, cond, neg: int, latent: int, vae, seed: int = 42):
    gen = family_generation(spec["family"])
    return sample(w, (model, "MODEL"), cond, (neg, "CONDITIONING"), latent, vae, seed=seed, steps=gen.steps,
                  cfg=gen.cfg, sampler_name=gen.sampler, scheduler=gen.scheduler, denoise=1.0)


def _note(spec: dict, what: str, extra_set: str, result: str) -> str:
    return (f"{what}\n\nSET BEFORE QUEUEING\n{spec['set']}\n{extra_set}\n\nMODELS\n{spec['models']}\n\n"
            f"RESULT\n{result}")


def _lora(new, name: str, spec: dict):
    w = new(name)
    w.note(_note(
        spec, f"{spec['title']} + CHARACTER LoRA - one image of the character with ComfyUI's own {spec['title']} "
        "nodes.\n\n'charforge pipeline' picks this family's workflows by itself when its base model is a "
        f"{spec['title']} model (read from the file's tensors).",
        "- Positive prompt: start with the trigger word of the LoRA.",
        f"output/charforge/{name}_*.png."))
    model, clip, vae = _family_models(w, spec)
    cond, neg, latent = _prompts(w, spec, clip)
    w.group("3 - Sample & save", "#a1309b")
    _, decode = _sample(w, spec, model, cond, neg, latent, vae)
    save_image(w, (decode, "IMAGE"), f"charforge/{name}")
    return w


def _best_of_n(new, name: str, spec: dict):
    w = new(name)
    w.note(_note(
        spec, f"{spec['title']} + CHARACTER LoRA, BEST OF N - N candidates, each scored by identity to the character "
        "(ArcFace) and agreement with the prompt (CLIP); the best one is kept.",
        "- Empty Latent > batch_size = N candidates = Best of N > group_size.\n"
        "- Load Identity: an identity saved by the build_identity workflow from photos of the character.\n"
        "- CLIP Score > prompt: the positive prompt without the trigger word (CLIP does not know it).\n"
        "- Drawn or non-human characters: bypass the face nodes (Ctrl+B) and set Combine Scores >\n"
        "  identity_weight 0.",
        f"output/charforge/{name}_candidate_*.png (every candidate), {name}_best_*.png (the best), the score\n"
        "tables on the scoring nodes. Extra models: insightface/models/buffalo_l, clip_vision/<CLIP folder>."),
        height=800)
    model, clip, vae = _family_models(w, spec)
    cond, neg, latent = _prompts(w, spec, clip, batch=4)
    w.group("3 - Sample N candidates", "#a1309b")
    _, decode = _sample(w, spec, model, cond, neg, latent, vae)
    save_image(w, (decode, "IMAGE"), f"charforge/{name}_candidate", title="Every candidate")
    w.group("4 - Score (identity + CLIP) & keep the best", "#b58b2a", width=2)
    faces = w.node("CharForgeLoadFaceModels", pack="buffalo_l")
    identity = w.node("CharForgeLoadIdentity", name="my_character")
    score_and_keep_best(w, decode, faces, identity, f"charforge/{name}_best")
    return w


def _storyboard(new, name: str, spec: dict):
    w = new(name)
    w.note(_note(
        spec, f"{spec['title']} STORYBOARD - 6-10 frames with the same character in every frame.\nStory Scenes "
        "turns the scene list into one prompt per frame (a list: the text encoder, sampler and decoder run once "
        "per frame, N candidates each); Storyboard Select keeps the best candidate of each frame by identity "
        "(ArcFace) and prompt agreement (CLIP); Storyboard Sheet saves the frames, sheet.png and metadata.json.",
        "- Story Scenes > scenes: one scene per line; trigger = the LoRA's trigger words; frame i uses seed + i - 1.\n"
        "- Empty Latent > batch_size = N candidates per frame.\n"
        "- Load Identity: an identity saved by build_identity. Load CLIP: a CLIP folder in models/clip_vision\n"
        "  (none? bypass it: frames are chosen by identity alone).\n"
        "- The ablation's baseline: bypass Character LoRA and set Storyboard Select > mode = base.",
        "output/charforge/storyboard_NNNNN/ (frame_01.png ..., sheet.png, metadata.json). The command line\n"
        "'charforge story' adds reference mode and the ablation table (docs/storyboard.md)."),
        height=800)
    model, clip, vae = _family_models(w, spec)
    w.group("2 - Scenes (one prompt per frame)", "#8A8")
    scenes = w.node("CharForgeStoryScenes", height=320, scenes=STORY_SCENES, trigger="ohwx person",
                    style="cinematic still, detailed, soft light", seed=42)
    cond, neg, latent = _prompts(w, spec, clip, positive="", batch=4, group="3 - Prompt per frame & latent")
    w.link(scenes, "prompts", cond[0] if spec is not FLUX else _positive_of(w, cond[0]), "text")
    w.group("4 - N candidates per frame", "#a1309b")
    sampler, decode = _sample(w, spec, model, cond, neg, latent, vae)
    w.link(scenes, "seeds", sampler, "seed")
    preview = w.node("PreviewImage", title="Every candidate", height=260)
    w.link(decode, "IMAGE", preview, "images")
    w.group("5 - Keep the best of each frame & the sheet", "#b58b2a", width=2)
    faces = w.node("CharForgeLoadFaceModels", pack="buffalo_l")
    identity = w.node("CharForgeLoadIdentity", name="my_character")
    clip_model = w.node("CharForgeLoadClip", model="clip-vit-large-patch14", device="auto")
    select = w.node("CharForgeStoryboardSelect", mode="simple")
    sheet = w.node("CharForgeStoryboardSheet", filename_prefix=f"charforge/{name}")
    w.link(decode, "IMAGE", select, "images")
    w.link(scenes, "prompts", select, "prompts")
    w.link(faces, "face_models", select, "face_models")
    w.link(identity, "identity", select, "identity")
    w.link(scenes, "seeds", select, "seeds")
    w.link(scenes, "captions", select, "captions")
    w.link(clip_model, "clip", select, "clip")
    w.link(select, "frames", sheet, "frames")
    w.link(select, "storyboard", sheet, "storyboard")
    return w


def _positive_of(w, guided: int) -> int:
    """The CLIPTextEncode feeding a FluxGuidance node."""
    for link_id, origin, _, target, _, _ in w.links:
        if target == guided:
            return origin
    raise ValueError(f"node {guided} has no input link")


# flux_lora, flux_best_of_n, flux_storyboard, sd35_lora, sd35_best_of_n, sd35_storyboard
BUILDERS = tuple(partial(build, name=f"{family}_{kind}", spec=spec)
                 for family, spec in (("flux", FLUX), ("sd35", SD35))
                 for kind, build in (("lora", _lora), ("best_of_n", _best_of_n), ("storyboard", _storyboard)))
