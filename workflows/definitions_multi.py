"""The shipped two-character workflows (two_characters, two_characters_faceid), described for ``layout.py``.

Two characters in one SD1.5 image, each with its own LoRA and prompt, on ComfyUI's own hook nodes: Create Hook
LoRA makes a hook group per character; Set CLIP Hooks attaches it to a copy of the text encoder, so the
prompt encoded with that copy carries the hook (its clip weights patched while encoding, its model weights
applied by the sampler only while it computes that conditioning's prediction); Conditioning (Set Mask) confines
each prompt to its half of the picture (a Solid Mask half composited onto an empty canvas). The two halves and
a scene prompt for the whole picture are combined and sampled with the plain checkpoint model; Score Characters
then pairs the faces with the two identities and gives each character its similarity.

two_characters_faceid also puts each character's identity on the MODEL through Apply IP-Adapter FaceID with
that character's half as ``attn_mask`` (chained: checkpoint -> FaceID A -> FaceID B -> KSampler).
"""

from __future__ import annotations

from definitions import NEGATIVE, SD_SAMPLING, sample, save_image

WIDTH, HEIGHT = 768, 512
SCENE = "photo of two people standing side by side, looking at the camera, natural light, sharp focus"
PROMPT_A = "photo of ohwx_a person, head and shoulders, looking at the camera"
PROMPT_B = "photo of sks_b person, head and shoulders, looking at the camera"
IDENTITIES = {"A": "character_a", "B": "character_b"}
FACEID_FILE = "ip-adapter-faceid_sd15.bin"


def _half_mask(w, canvas: int, half: int, x: int, title: str) -> int:
    mask = w.node("MaskComposite", title=title, x=x, y=0, operation="add")
    w.link(canvas, "MASK", mask, "destination")
    w.link(half, "MASK", mask, "source")
    return mask


def _character(w, ckpt: int, mask: int, letter: str, lora: str, prompt: str) -> int:
    """Hook LoRA -> CLIP with the hooks -> prompt -> confined to `mask`. Returns the masked conditioning node."""
    hook = w.node("CreateHookLora", title=f"Character {letter} LoRA (hook)", lora_name=lora, strength_model=1.0,
                  strength_clip=1.0)
    clip = w.node("SetClipHooks", title=f"CLIP with {letter}'s hooks", apply_to_conds=True, schedule_clip=False)
    text = w.node("CLIPTextEncode", title=f"Character {letter} prompt", height=130, text=prompt)
    masked = w.node("ConditioningSetMask", title=f"{letter} in its half", strength=1.0, set_cond_area="default")
    w.link(ckpt, "CLIP", clip, "clip")
    w.link(hook, "HOOKS", clip, "hooks")
    w.link(clip, "CLIP", text, "clip")
    w.link(text, "CONDITIONING", masked, "conditioning")
    w.link(mask, "MASK", masked, "mask")
    return masked


NOTE = (
    "TWO CHARACTERS IN ONE IMAGE - each character's LoRA and prompt act only in its half of the picture\n"
    "(ComfyUI's hook LoRAs and masked conditioning), then CharForge checks that both stayed themselves.\n\n"
    "SET BEFORE QUEUEING\n"
    "- Load Checkpoint: the SD1.5 base both LoRAs were trained on.\n"
    "- Character A / B LoRA (hook): each character's LoRA from models/loras/.\n"
    "- Character A / B prompt: start with each LoRA's trigger word; A is drawn on the left, B on the right.\n"
    "- Scene prompt: the whole picture (both people, the place, the light).\n"
    "- Load Identity A / B: each character's identity (Build Identity from the same photos).\n"
    "- Left / right half: the masks are the halves of a 768 x 512 picture; change Solid Mask and Mask\n"
    "  Composite x with the latent size.\n\n"
    "MODELS\n"
    "checkpoints/ (SD1.5), loras/ (two character LoRAs), insightface/models/buffalo_l, charforge/identities/.\n\n"
    "RESULT\n"
    "output/charforge/two_characters_*.png; Score Characters shows one line per image and character (which\n"
    "face, its similarity, pass or missing) and each character's mean similarity.")
NOTE_FACEID = (
    "TWO CHARACTERS IN ONE IMAGE, WITH FACEID - as two_characters (each character's hook LoRA and prompt\n"
    "act only in its half), and each character's face identity also steers its half through a FaceID\n"
    "IP-Adapter whose attention mask is that half.\n\n"
    "SET BEFORE QUEUEING\n"
    "- Load Checkpoint: the SD1.5 base both LoRAs were trained on.\n"
    "- Load IP-Adapter: a FaceID SD1.5 file from models/ipadapter (ip-adapter-faceid_sd15.bin).\n"
    "- Character A / B LoRA (hook): each character's LoRA from models/loras/.\n"
    "- Load Identity A / B: each character's identity (Build Identity from the same photos); it feeds\n"
    "  both the character's FaceID and Score Characters.\n"
    "- FaceID A / B: weight 0.6-0.9; lower it if the faces look pasted on. The LoRA inside the FaceID\n"
    "  file is the same for both and acts on the whole picture, so only FaceID A applies it\n"
    "  (lora_strength 1; B has 0).\n"
    "- Character A / B prompt: start with each LoRA's trigger word; A is drawn on the left, B on the right.\n"
    "- Scene prompt: the whole picture (both people, the place, the light).\n"
    "- Left / right half: the masks are the halves of a 768 x 512 picture; change Solid Mask and Mask\n"
    "  Composite x with the latent size.\n\n"
    "HOW FAR THE MASKS HOLD\n"
    "A LoRA and prompt shape only their half's prediction. A FaceID adapter adds its term only at its half's\n"
    "positions of every cross-attention layer; the U-Net's later layers still mix neighbouring positions,\n"
    "so near the border some of it reaches the other half.\n\n"
    "MODELS\n"
    "checkpoints/ (SD1.5), ipadapter/ (FaceID SD1.5), loras/ (two character LoRAs),\n"
    "insightface/models/buffalo_l, charforge/identities/.\n\n"
    "RESULT\n"
    "output/charforge/two_characters_faceid_*.png; Score Characters shows one line per image and character\n"
    "(which face, its similarity, pass or missing) and each character's mean similarity.")


def _two_characters(new, name: str, faceid: bool):
    w = new(name)
    w.note(NOTE_FACEID if faceid else NOTE, height=820 if faceid else 650)
    w.group("1 - Model & masks", "#3f789e")
    ckpt = w.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    adapter = w.node("CharForgeLoadIPAdapter", ipadapter_name=FACEID_FILE) if faceid else 0
    canvas = w.node("SolidMask", title="Empty canvas", value=0.0, width=WIDTH, height=HEIGHT)
    half = w.node("SolidMask", title="Half", value=1.0, width=WIDTH // 2, height=HEIGHT)
    left = _half_mask(w, canvas, half, 0, "Left half")
    right = _half_mask(w, canvas, half, WIDTH // 2, "Right half")
    model, identities = (ckpt, "MODEL"), []
    for letter, side, mask, lora, prompt in (("A", "left", left, "character_a.safetensors", PROMPT_A),
                                             ("B", "right", right, "character_b.safetensors", PROMPT_B)):
        w.group(f"{2 if letter == 'A' else 3} - Character {letter} ({side})", "#8A8")
        conds = _character(w, ckpt, mask, letter, lora, prompt)
        if faceid:
            identity = w.node("CharForgeLoadIdentity", title=f"Load Identity {letter}", name=IDENTITIES[letter])
            model = _faceid(w, model, adapter, identity, mask, letter)
            identities.append(identity)
        if letter == "A":
            a = conds
        else:
            b = conds
    w.group("4 - Scene & combine", "#a1309b")
    scene = w.node("CLIPTextEncode", title="Scene prompt", height=130, text=SCENE)
    neg = w.node("CLIPTextEncode", title="Negative prompt", height=110, text=NEGATIVE.replace(", several people", ""))
    both = w.node("ConditioningCombine", title="A + B")
    everything = w.node("ConditioningCombine", title="A + B + scene")
    latent = w.node("EmptyLatentImage", width=WIDTH, height=HEIGHT, batch_size=2)
    w.link(ckpt, "CLIP", scene, "clip")
    w.link(ckpt, "CLIP", neg, "clip")
    w.link(a, "CONDITIONING", both, "conditioning_1")
    w.link(b, "CONDITIONING", both, "conditioning_2")
    w.link(both, "CONDITIONING", everything, "conditioning_1")
    w.link(scene, "CONDITIONING", everything, "conditioning_2")
    w.group("5 - Sample", "#a1309b")
    _, decode = sample(w, model, (everything, "CONDITIONING"), (neg, "CONDITIONING"), latent,
                       (ckpt, "VAE"), **SD_SAMPLING)
    save_image(w, (decode, "IMAGE"), f"charforge/{name}")
    w.group("6 - Did both stay themselves?", "#b58b2a")
    faces = w.node("CharForgeLoadFaceModels", pack="buffalo_l")
    if not faceid:
        identities = [w.node("CharForgeLoadIdentity", title=f"Load Identity {letter}", name=IDENTITIES[letter])
                      for letter in "AB"]
    score = w.node("CharForgeScoreCharacters", height=260)
    w.link(faces, "face_models", score, "face_models")
    w.link(decode, "IMAGE", score, "images")
    for n, identity in enumerate(identities, 1):
        w.link(identity, "identity", score, f"identity_{n}")
    return w


def _faceid(w, model: tuple[int, str], adapter: int, identity: int, mask: int, letter: str) -> tuple[int, str]:
    """Apply IP-Adapter FaceID of `identity` on `model`, its attention confined to `mask`."""
    # The file's FaceID LoRA does not depend on the identity and is not masked: applied once, by A's node.
    apply = w.node("CharForgeApplyIPAdapterFaceID", title=f"FaceID {letter} (its half)", weight=0.8,
                   lora_strength=1.0 if letter == "A" else 0.0)
    w.link(*model, apply, "model")
    w.link(adapter, "ipadapter", apply, "ipadapter")
    w.link(identity, "identity", apply, "identity")
    w.link(mask, "MASK", apply, "attn_mask")
    return apply, "model"


def two_characters(new):
    return _two_characters(new, "two_characters", faceid=False)


def two_characters_faceid(new):
    return _two_characters(new, "two_characters_faceid", faceid=True)


BUILDERS = (two_characters, two_characters_faceid)
