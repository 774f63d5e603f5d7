"""Sentence captions from local vision-language models, run by transformers' own classes (no downloaded code).

Two architectures, told apart by ``model_type`` in the folder's ``config.json``:

- ``qwen2_5_vl``: Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor``), e.g.
  Qwen/Qwen2.5-VL-3B-Instruct or -7B-Instruct. The image goes into the user turn as a content part; the
  processor turns it into a number of image tokens that depends on the photo's size (`image_side`).
- ``llava``: the LLaVA architecture (``LlavaForConditionalGeneration`` + ``LlavaProcessor``), which is what
  JoyCaption Beta One and Alpha Two ship as (fancyfeast/llama-joycaption-beta-one-hf-llava: a SigLIP vision
  tower and Llama 3.1). The conversation is a system turn and a plain-string user turn, as the JoyCaption
  model card shows; when a folder's chat template does not place the image token itself (the llava-hf
  templates expect an image content part), the content part is used, and failing that the token is put in
  front of the prompt.

Any other ``model_type`` is refused by name. CogVLM / CogAgent in particular only exist as repositories with
their own modelling code (``trust_remote_code``), which CharForge never runs: this captioner is the answer to
"a detailed captioner in the CogVLM class" instead.

Folders live in ComfyUI's ``models/LLM`` folder (``models/LLM/<name>/``), as ``save_pretrained`` or a hub
download writes them: ``config.json``, ``model*.safetensors``, the processor configs, the tokenizer files
and the chat template (``chat_template.jinja`` or ``chat_template.json``).

Generation is greedy (reproducible), batched with left padding (every prompt ends where generation starts),
in bf16 on GPUs that support it (fp16 otherwise) and fp32 on the CPU. A `Control` set on the captioner is
checked between batches and after every generated token, so Cancel stops a long caption promptly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...control import Control
from . import hf
from .base import Captioner, CaptionerError

log = logging.getLogger("charforge")


@dataclass(frozen=True)
class Architecture:
    """One vision-language family: its transformers classes and how its conversation is written."""

    model_type: str
    label: str
    model_class: str
    processor_class: str
    system_prompt: str  # "" : the chat template's own default
    image_part: bool  # the image is a content part of the user turn (else the template adds its token)


ARCHITECTURES: dict[str, Architecture] = {
    "qwen2_5_vl": Architecture(
        "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "", True
    ),
    "llava": Architecture(
        "llava",
        "LLaVA (JoyCaption)",
        "LlavaForConditionalGeneration",
        "LlavaProcessor",
        "You are a helpful image captioner.",
        False,
    ),
}

REMOTE_CODE = (
    "it exists only as a repository with its own modelling code (trust_remote_code), which CharForge never runs; "
    "use Qwen2.5-VL or JoyCaption (LLaVA format) instead"
)
KIND = hf.ModelKind(
    backend="vlm",
    model_types=tuple(ARCHITECTURES),
    folders=("LLM",),
    model_class="",
    processor_class="",
    default_repo="Qwen/Qwen2.5-VL-3B-Instruct",
    hints=(
        ("cogvlm", "CogVLM " + REMOTE_CODE),
        ("cogagent", "CogAgent " + REMOTE_CODE),
        ("florence2", "use the florence2 backend of Caption Dataset for Florence-2"),
        ("blip", "use the blip backend of Caption Dataset for BLIP"),
        ("blip-2", "use the blip2 backend of Caption Dataset for BLIP-2"),
    ),
)

STYLES: dict[str, str] = {
    "training caption": (
        "Write a caption for this image for training an image-generation model: two to four plain, factual "
        "sentences about the main subject (appearance, hair, clothing, pose, expression), the setting, the "
        "lighting, and the camera angle and framing. Describe only what is visible. Do not begin with 'This "
        "image' or 'The image', and write no preamble, list or quotation marks."
    ),
    "descriptive": (
        "Describe this image in one or two sentences: who or what is shown, how they look, what they wear "
        "and do, and where. No preamble."
    ),
    "detailed": (
        "Write a long, detailed description of this image in one paragraph: the main subject's appearance, "
        "clothing, pose and expression, every notable object, the background, the lighting, the colours, the "
        "camera angle and the style of the image. Describe only what is visible. No preamble, no lists."
    ),
}
DEFAULT_STYLE = "training caption"


@dataclass
class VLMSettings:
    """How a vision-language captioner loads and generates."""

    device: str = ""  # "" picks cuda, then mps, then cpu
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32 (auto: bf16 or fp16 on a GPU, fp32 on the CPU)
    style: str = DEFAULT_STYLE  # a key of STYLES; ignored when `prompt` is given
    prompt: str = ""  # your own instruction; {trigger} and {class} are filled in
    trigger: str = ""
    class_tokens: str = ""
    max_new_tokens: int = 300
    min_new_tokens: int = 0  # > 0 forces at least this many tokens (tests and benchmarks)
    repetition_penalty: float = 1.0
    batch_size: int = 4
    image_side: int = 768  # photos are shrunk to this long side first (Qwen2.5-VL: image tokens grow with it)
    allow_download: bool = False


def list_models() -> list[str]:
    """Names (relative folder paths) of the Qwen2.5-VL and LLaVA folders found in the LLM model folders."""
    return hf.list_models(KIND)


def resolve_model(name: str, allow_download: bool = False) -> Path:
    """The folder of model `name` (a folder in models/LLM, an absolute path, or an opt-in hub download);
    a folder holding another architecture is refused with its ``model_type``."""
    return hf.resolve_model(KIND, name, allow_download)


def architecture_of(folder: Path) -> Architecture:
    """The architecture of a model folder from its config.json, or a `CaptionerError` naming what it holds."""
    model_type = hf._model_type(folder)
    if model_type not in ARCHITECTURES:
        hint = dict(KIND.hints).get(str(model_type), "")
        raise CaptionerError(
            f"{folder} holds a {model_type!r} model (config.json model_type); the vlm captioner runs "
            f"{', '.join(f'{a.model_type} ({a.label})' for a in ARCHITECTURES.values())}"
            + (f": {hint}" if hint else "")
        )
    return ARCHITECTURES[model_type]


def instruction(settings: VLMSettings) -> str:
    """The instruction sent with every image: the user's prompt, else the style's, with {trigger}/{class}."""
    text = settings.prompt.strip()
    if not text:
        if settings.style not in STYLES:
            raise CaptionerError(f"caption style {settings.style!r} is not one of {', '.join(STYLES)}")
        text = STYLES[settings.style]
    return text.replace("{trigger}", settings.trigger.strip()).replace(
        "{class}", settings.class_tokens.strip()
    )


class _StopOnCancel:
    """A generation stopping criterion that asks the `Control` after every token (it raises `Cancelled`)."""

    def __init__(self, control: Control):
        self.control = control

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.control.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class VLMCaptioner(Captioner):
    """Qwen2.5-VL or a LLaVA-architecture captioner (JoyCaption) from a folder; loaded until `close()`."""

    name = "vlm"

    def __init__(self, model: str = "", settings: VLMSettings | None = None, control: Control | None = None):
        from ....deps import require

        torch = require("torch")
        transformers = require("transformers")
        self.settings = s = settings or VLMSettings()
        self.control = control
        self.instruction = instruction(s)
        self.folder = resolve_model(model, s.allow_download)
        self.architecture = arch = architecture_of(self.folder)
        self.device = hf.pick_device(s.device)
        self.dtype = hf.pick_dtype(self.device, s.dtype)
        self.batch_size = max(1, int(s.batch_size))
        self.max_side = max(64, int(s.image_side))
        model_class = getattr(transformers, arch.model_class, None)
        processor_class = getattr(transformers, arch.processor_class, None)
        if model_class is None or processor_class is None:
            raise CaptionerError(
                f"transformers {transformers.__version__} has no {arch.model_class}; upgrade transformers"
            )
        try:
            self.processor = processor_class.from_pretrained(str(self.folder))
            dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
            self.model = model_class.from_pretrained(str(self.folder), **{dtype_key: self.dtype})
        except Exception as exc:  # noqa: BLE001 - transformers raises many types; name the folder
            raise CaptionerError(f"could not load the {arch.label} model in {self.folder}: {exc}") from exc
        self.model.eval().to(self.device)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # prompts end where generation starts, batched or not
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._torch = torch
        self.prompt, self._add_special = self._build_prompt()
        log.info("CharForge: loaded %s %s on %s (%s)", arch.label, self.folder, self.device, self.dtype)

    # ---------------------------------------------------------------------------------------------- prompt

    def messages(self, image_part: bool) -> list[dict[str, Any]]:
        """The conversation for one image: an optional system turn and the user's instruction."""
        arch = self.architecture
        out: list[dict[str, Any]] = []
        if arch.system_prompt:
            out.append({"role": "system", "content": arch.system_prompt})
        if image_part:
            out.append(
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.instruction}]}
            )
        else:
            out.append({"role": "user", "content": self.instruction})
        return out

    def _build_prompt(self) -> tuple[str, bool]:
        """The rendered prompt (one image token) and whether the tokenizer should add its special tokens."""
        processor = self.processor
        if not getattr(processor, "chat_template", None):
            raise CaptionerError(
                f"{self.folder} has no chat template (chat_template.jinja or chat_template.json): download the "
                "model's full folder, not only its weights"
            )
        image_token = processor.image_token
        tries = [self.architecture.image_part, not self.architecture.image_part]
        for image_part in tries:
            text = processor.apply_chat_template(
                self.messages(image_part), tokenize=False, add_generation_prompt=True
            )
            if text.count(image_token) == 1:
                break
        else:  # neither form placed the image token: it goes in front of the instruction of a string turn
            text = processor.apply_chat_template(
                self.messages(False), tokenize=False, add_generation_prompt=True
            )
            if self.instruction not in text:
                raise CaptionerError(
                    f"the chat template of {self.folder} dropped the instruction; set a prompt it keeps"
                )
            text = text.replace(self.instruction, f"{image_token}\n{self.instruction}", 1)
        # A template that writes the begin-of-text token itself would get a second one from a tokenizer that
        # adds it too (models answer worse after two): then the tokenizer adds nothing.
        tokenizer = processor.tokenizer
        bos = tokenizer.bos_token
        adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        return text, not (adds_bos and text.startswith(bos))

    # ------------------------------------------------------------------------------------------ generation

    def inputs(self, images: list[Any]) -> dict[str, Any]:
        """The processor's tensors for some images with the prompt, left-padded, on the model's device."""
        rgb = [image.convert("RGB") for image in images]
        for image in rgb:
            if max(image.size) > self.max_side:
                image.thumbnail((self.max_side, self.max_side))
        batch = self.processor(
            text=[self.prompt] * len(rgb),
            images=rgb,
            padding=True,
            add_special_tokens=self._add_special,
            return_tensors="pt",
        )
        return hf.on_device(batch, self.device, self.dtype)

    def generate(self, images: list[Any]):
        """Token ids of the generated captions (the prompt removed), one row per image, padded at the end."""
        s = self.settings
        if self.model is None:
            raise CaptionerError("this vlm captioner was closed")
        inputs = self.inputs(images)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(1, int(s.max_new_tokens)),
            "do_sample": False,
            "num_beams": 1,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
        }
        if s.min_new_tokens > 0:
            kwargs["min_new_tokens"] = min(int(s.min_new_tokens), kwargs["max_new_tokens"])
        if s.repetition_penalty and s.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = float(s.repetition_penalty)
        if self.control is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnCancel(self.control)])
        with self._torch.inference_mode():
            tokens = self.model.generate(**inputs, **kwargs)
        return tokens[:, inputs["input_ids"].shape[1] :]

    def decode(self, tokens) -> list[str]:
        texts = self.processor.tokenizer.batch_decode(
            tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return [" ".join(text.split()).strip().strip('"').strip() for text in texts]

    def caption(self, images: list[Any]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(images), self.batch_size):
            if self.control is not None:
                self.control.check()
            out += self.decode(self.generate(images[start : start + self.batch_size]))
        return out

    def notes(self) -> list[str]:
        label = self.settings.style if not self.settings.prompt.strip() else "own prompt"
        dtype = str(self.dtype).replace("torch.", "")
        return [f"vlm {self.architecture.label} {self.folder.name} on {self.device} ({dtype}), {label}"]

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        self.model = None
        self.processor = None
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            self._torch.cuda.empty_cache()
