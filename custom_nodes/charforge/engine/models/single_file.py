"""Write a diffusers Stable Diffusion folder (SD1.5 or SDXL) as one single-file checkpoint.

A diffusers folder keeps each component in its own subfolder with diffusers / transformers key names.
ComfyUI's ``checkpoints`` folder, kohya and A1111 expect the original single-file layout instead
(LDM for SD1.5, SGM for SDXL): every tensor in one ``.safetensors`` under a per-component prefix:

=================  ==========================================  ==========================================
component          SD1.5                                       SDXL
=================  ==========================================  ==========================================
U-Net              ``model.diffusion_model.``                  ``model.diffusion_model.``
VAE                ``first_stage_model.``                      ``first_stage_model.``
text encoder       ``cond_stage_model.transformer.``           ``conditioner.embedders.0.transformer.``
                   (Hugging Face CLIP names)                   (Hugging Face CLIP names)
text encoder 2     -                                           ``conditioner.embedders.1.model.``
                                                               (OpenCLIP names)
=================  ==========================================  ==========================================

The mapping is written out here as plain rename tables, read from each model's own config (number of
levels, res blocks per level, which levels have attention), so shrunken test models and full-size models
go through the same code. Only names and two shapes change: VAE attention projections become 1x1 convs,
and the OpenCLIP text projection is stored transposed. Values are never modified.

Diffusers' own loader reads these files back into identical tensors (see tests/engine/test_tiny_models.py);
offline it needs only the diffusers folder for the configs, no ``original_config``::

    StableDiffusionXLPipeline.from_single_file(path, config=diffusers_dir, local_files_only=True)

ComfyUI's checkpoint loader detects full-size SD1.5 / SDXL files written here as SD15 / SDXL, and its
own U-Net modules have exactly our keys and shapes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import torch

from ...deps import require

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."

StateDict = Mapping[str, torch.Tensor]
Value = TypeVar("Value")

# Parameters inside a diffusers ResnetBlock2D -> inside an LDM ResBlock.
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Parameters inside a diffusers VAE ResnetBlock2D -> inside an LDM VAE ResnetBlock.
_VAE_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}

# Parameters inside the VAE mid-block attention. The old diffusers names (query/key/value/proj_attn,
# diffusers < 0.14) still turn up in folders saved long ago.
_VAE_ATTENTION_PARTS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}

# Parameters inside one Hugging Face CLIP encoder layer -> inside one OpenCLIP resblock (q/k/v aside).
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}

_DOWN_BLOCK_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # type -> has attention
_UP_BLOCK_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}

#: dtype names the loaders and the trainer accept
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class UnexpectedKeysError(ValueError):
    """A component state dict holds keys that have no place in the single-file layout."""

    def __init__(self, component: str, keys: list[str]):
        self.component = component
        self.keys = sorted(keys)
        shown = ", ".join(self.keys[:10]) + (
            f", ... ({len(self.keys) - 10} more)" if len(self.keys) > 10 else ""
        )
        super().__init__(
            f"{component}: {len(self.keys)} key(s) have no single-file (LDM/SGM) name: {shown}. "
            "Only SD1.5 / SDXL components with the standard diffusers block types can be converted."
        )


# --------------------------------------------------------------------------------------------------
# U-Net


def _per_level(value: int | list[int] | tuple[int, ...], levels: int, name: str) -> list[int]:
    if isinstance(value, int):
        return [value] * levels
    if len(value) != levels:
        raise ValueError(f"unet config: {name} has {len(value)} entries for {levels} levels")
    return list(value)


def _block_has_attention(block_type: str, table: dict[str, bool], field: str) -> bool:
    if block_type not in table:
        raise ValueError(
            f"unet config: {field} contains {block_type!r}; the single-file layout is written for "
            f"{sorted(table)} only"
        )
    return table[block_type]


def unet_module_names(unet_config: Mapping) -> dict[str, str]:
    """Diffusers U-Net module paths -> LDM module paths (without ``model.diffusion_model.``).

    Built from the config's ``down_block_types``, ``up_block_types`` and ``layers_per_block``, e.g.
    ``down_blocks.1.attentions.0`` -> ``input_blocks.4.1`` for SD1.5. Resnet modules map to the whole
    LDM ResBlock (``input_blocks.N.0``); their inner parameters are renamed by ``unet_to_ldm``.
    Useful on its own for LoRA key conversion, which works on module names.
    """
    down_types = list(unet_config["down_block_types"])
    up_types = list(unet_config["up_block_types"])
    levels = len(down_types)
    if len(up_types) != levels:
        raise ValueError(f"unet config: {levels} down blocks but {len(up_types)} up blocks")
    layers = _per_level(unet_config.get("layers_per_block", 2), levels, "layers_per_block")
    mid_type = unet_config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(
            f"unet config: mid_block_type {mid_type!r}; only UNetMidBlock2DCrossAttn is supported"
        )

    names = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL: pooled text + size/crop embedding
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        # One mid block: resnet, attention, resnet.
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }

    # Input blocks: each level adds one LDM block per res block, then one for its downsampler.
    index = 1
    for level, block_type in enumerate(down_types):
        attention = _block_has_attention(block_type, _DOWN_BLOCK_TYPES, "down_block_types")
        for layer in range(layers[level]):
            names[f"down_blocks.{level}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if attention:
                names[f"down_blocks.{level}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    # Output blocks: up level i mirrors down level (levels-1-i) and has one extra res block; its
    # upsampler sits inside the last LDM block, after the attention when there is one.
    index = 0
    for level, block_type in enumerate(up_types):
        attention = _block_has_attention(block_type, _UP_BLOCK_TYPES, "up_block_types")
        count = layers[levels - 1 - level] + 1
        for layer in range(count):
            names[f"up_blocks.{level}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if attention:
                names[f"up_blocks.{level}.attentions.{layer}"] = f"output_blocks.{index}.1"
            index += 1
        if level < levels - 1:
            names[f"up_blocks.{level}.upsamplers.0.conv"] = (
                f"output_blocks.{index - 1}.{2 if attention else 1}.conv"
            )
    return names


def _split_module(key: str, modules: Mapping[str, str]) -> tuple[str, str] | None:
    """The longest module path in `modules` that `key` lies under, and the rest of the key."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            return module, ".".join(parts[cut:])
    return None


def unet_to_ldm(state_dict: Mapping[str, Value], unet_config: Mapping) -> dict[str, Value]:
    """A diffusers ``UNet2DConditionModel`` state dict in LDM names (no prefix); the values are not looked at.

    Transformer blocks keep their names (``transformer_blocks.0.attn1.to_q.weight`` etc. are the same in
    both layouts); resnets are renamed part by part. Raises `UnexpectedKeysError` naming every key that
    does not fit the config (e.g. an LCM ``time_embedding.cond_proj`` or a class embedding).
    """
    modules = unet_module_names(unet_config)
    out: dict[str, Value] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        found = _split_module(key, modules)
        if found is None:
            unexpected.append(key)
            continue
        module, rest = found
        if ".resnets." in module:
            part, _, param = rest.rpartition(".")
            if part not in _UNET_RESNET_PARTS:
                unexpected.append(key)
                continue
            rest = f"{_UNET_RESNET_PARTS[part]}.{param}"
        out[f"{modules[module]}.{rest}"] = tensor
    if unexpected:
        raise UnexpectedKeysError("unet", unexpected)
    return out


# --------------------------------------------------------------------------------------------------
# VAE

_VAE_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0\.conv)\.(.+)")
_VAE_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0\.conv)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets\.(\d+)|attentions\.0)\.(.+)")
_VAE_SAME = re.compile(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(quant_conv|post_quant_conv)\.\w+")


def _vae_resnet_param(rest: str) -> str | None:
    part, _, param = rest.rpartition(".")
    return f"{_VAE_RESNET_PARTS[part]}.{param}" if part in _VAE_RESNET_PARTS else None


def vae_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in LDM names (no prefix).

    Decoder levels are numbered the other way round in LDM (``up_blocks.0`` is ``up.3`` with four
    levels). The mid-block attention's Linear q/k/v/out weights become 1x1 conv weights ``(C, C, 1, 1)``.
    """
    up_levels = {int(m.group(1)) for key in state_dict if (m := _VAE_UP.fullmatch(key))}
    last_up = max(up_levels, default=-1)
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        new_key = None
        if _VAE_SAME.fullmatch(key):
            new_key = key
        elif key.startswith(("encoder.conv_norm_out.", "decoder.conv_norm_out.")):
            new_key = key.replace(".conv_norm_out.", ".norm_out.")
        elif m := _VAE_DOWN.fullmatch(key):
            level, block, layer, rest = m.groups()
            if layer is None:
                new_key = f"encoder.down.{level}.downsample.conv.{rest}"
            elif param := _vae_resnet_param(rest):
                new_key = f"encoder.down.{level}.block.{layer}.{param}"
        elif m := _VAE_UP.fullmatch(key):
            level, block, layer, rest = m.groups()
            ldm_level = last_up - int(level)
            if layer is None:
                new_key = f"decoder.up.{ldm_level}.upsample.conv.{rest}"
            elif param := _vae_resnet_param(rest):
                new_key = f"decoder.up.{ldm_level}.block.{layer}.{param}"
        elif m := _VAE_MID.fullmatch(key):
            side, block, layer, rest = m.groups()
            if layer is not None:
                if (param := _vae_resnet_param(rest)) and int(layer) < 2:
                    new_key = f"{side}.mid.block_{int(layer) + 1}.{param}"
            else:
                part, _, param = rest.rpartition(".")
                if part in _VAE_ATTENTION_PARTS:
                    new_key = f"{side}.mid.attn_1.{_VAE_ATTENTION_PARTS[part]}.{param}"
                    if part != "group_norm" and tensor.ndim == 2:
                        tensor = tensor.reshape(*tensor.shape, 1, 1).clone()  # Linear -> 1x1 conv
        if new_key is None:
            unexpected.append(key)
        else:
            out[new_key] = tensor
    if unexpected:
        raise UnexpectedKeysError("vae", unexpected)
    return out


# --------------------------------------------------------------------------------------------------
# Text encoders

_CLIP_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def _clip_text_key(key: str) -> str | None:
    """A Hugging Face CLIP text key without the ``text_model.`` prefix, or None if it is not one.

    transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix, older versions and
    ``CLIPTextModelWithProjection`` with it; both spellings are accepted.
    """
    key = key.removeprefix("text_model.")
    return key if key.startswith(_CLIP_PARTS) else None


def clip_to_ldm(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModel`` state dict with Hugging Face names under ``text_model.`` (no outer prefix).

    ``embeddings.position_ids`` (a constant buffer some older files carry) is dropped.
    """
    out: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        name = _clip_text_key(key)
        if name is None:
            unexpected.append(key)
        elif not name.endswith("position_ids"):
            out[f"text_model.{name}"] = tensor
    if unexpected:
        raise UnexpectedKeysError("text_encoder", unexpected)
    return out


_QKV_PARTS = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def clip_to_open_clip(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP names (SDXL's second text encoder).

    q/k/v projections are stacked (q, k, v) into ``attn.in_proj_weight`` / ``in_proj_bias``; the
    projection is stored as ``text_projection`` = the transpose of ``text_projection.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unexpected = []
    for key, tensor in state_dict.items():
        if key == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
            continue
        name = _clip_text_key(key)
        if name is None:
            unexpected.append(key)
        elif name.endswith("position_ids"):
            continue
        elif name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            out[name.replace("final_layer_norm.", "ln_final.")] = tensor
        elif m := _CLIP_LAYER.fullmatch(name):
            layer, part, param = int(m.group(1)), m.group(2), m.group(3)
            if part in _QKV_PARTS:
                qkv.setdefault((layer, param), {})[_QKV_PARTS[part]] = tensor
            elif part in _OPEN_CLIP_LAYER_PARTS:
                out[f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER_PARTS[part]}.{param}"] = tensor
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise ValueError(f"text_encoder_2: layer {layer} has no {'/'.join(missing)}_proj.{param}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    if unexpected:
        raise UnexpectedKeysError("text_encoder_2", unexpected)
    return out


# --------------------------------------------------------------------------------------------------
# Whole pipeline


def _prefixed(prefix: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in state_dict.items()}


def pipeline_to_single_file_state_dict(
    unet_sd: StateDict,
    vae_sd: StateDict,
    text_encoder_sd: StateDict,
    text_encoder_2_sd: StateDict | None = None,
    *,
    unet_config: Mapping,
) -> dict[str, torch.Tensor]:
    """One single-file state dict from diffusers component state dicts.

    With ``text_encoder_2_sd`` the layout is SDXL's (SGM: ``conditioner.embedders.0/1``), otherwise
    SD1.5's (LDM: ``cond_stage_model``). ``unet_config`` is the U-Net's ``config.json`` (or
    ``unet.config``) and fixes the block numbering. Tensors are shared with the inputs, not copied,
    except where a shape changes.
    """
    sdxl_unet = unet_config.get("addition_embed_type") == "text_time"
    if sdxl_unet != (text_encoder_2_sd is not None):
        raise ValueError(
            "an SDXL U-Net (addition_embed_type 'text_time') needs text_encoder_2 and an SD1.5 U-Net must not "
            f"get one; got addition_embed_type={unet_config.get('addition_embed_type')!r} and "
            f"text_encoder_2={'given' if text_encoder_2_sd is not None else 'missing'}"
        )
    out = _prefixed(UNET_PREFIX, unet_to_ldm(unet_sd, unet_config))
    out.update(_prefixed(VAE_PREFIX, vae_to_ldm(vae_sd)))
    if text_encoder_2_sd is None:
        out.update(_prefixed(SD15_TEXT_ENCODER_PREFIX, clip_to_ldm(text_encoder_sd)))
    else:
        out.update(_prefixed(SDXL_TEXT_ENCODER_PREFIX, clip_to_ldm(text_encoder_sd)))
        out.update(_prefixed(SDXL_TEXT_ENCODER_2_PREFIX, clip_to_open_clip(text_encoder_2_sd)))
    return out


def _safetensors_torch():
    require("safetensors")  # a clear install hint when it is missing
    import safetensors.torch

    return safetensors.torch


def _weight_files(folder: Path, extension: str) -> list[Path]:
    """The weight files of one format in `folder`: the shards an index names, or the single file.

    Plain names (``model.safetensors``) win over variants (``model.fp16.safetensors``).
    """

    def is_variant(path: Path) -> bool:
        return path.name.split(".")[1] != extension

    indexes = sorted(folder.glob(f"*.{extension}.index.json"), key=is_variant)
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [folder / shard for shard in sorted(set(weight_map.values()))]
    files = sorted(folder.glob(f"*.{extension}"))
    files = [f for f in files if not is_variant(f)] or files
    if len(files) > 1:
        raise ValueError(f"{folder}: several weight files and no index: {[f.name for f in files]}")
    return files


def load_component_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one diffusers component folder (e.g. ``<pipeline>/unet``).

    Reads ``*.safetensors`` (one file, or shards listed in a ``*.safetensors.index.json``); falls back
    to ``*.bin`` files, loaded with ``weights_only=True``. Variant files (``model.fp16.safetensors``) are
    used only when no plain file is there.
    """
    safetensors_torch = _safetensors_torch()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"component folder not found: {folder}")
    for extension in ("safetensors", "bin"):
        files = _weight_files(folder, extension)
        if not files:
            continue
        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            if extension == "safetensors":
                state_dict.update(safetensors_torch.load_file(str(file)))
            else:
                state_dict.update(torch.load(file, map_location="cpu", weights_only=True))
        return state_dict
    raise FileNotFoundError(f"no weights (*.safetensors or *.bin) in {folder}")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def save_single_file(
    diffusers_dir: str | Path,
    out_path: str | Path,
    dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the diffusers SD1.5 / SDXL folder `diffusers_dir` as one ``.safetensors`` at `out_path`.

    The folder needs ``model_index.json`` and the ``unet``, ``vae`` and ``text_encoder`` components
    (plus ``text_encoder_2`` for SDXL). ``dtype`` (a torch dtype or "fp16" / "bf16" / "fp32") casts every
    floating-point tensor; ``None`` keeps the stored dtypes. ``metadata`` (str -> str) goes into the
    safetensors header. Returns the written path.
    """
    safetensors_torch = _safetensors_torch()
    diffusers_dir = Path(diffusers_dir)
    index_file = diffusers_dir / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{diffusers_dir} is not a diffusers folder: model_index.json is missing")
    model_index = json.loads(index_file.read_text())
    missing = [name for name in ("unet", "vae", "text_encoder") if not (model_index.get(name) or [None])[0]]
    if missing:
        raise ValueError(f"{index_file}: components {missing} are missing; need unet, vae and text_encoder")
    has_text_encoder_2 = bool((model_index.get("text_encoder_2") or [None])[0])

    target = _resolve_dtype(dtype)
    header = dict(metadata or {})
    bad = [k for k, v in header.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad}")

    def load(name: str) -> dict[str, torch.Tensor]:
        # Cast component by component: peak memory stays near the size of the written file.
        state_dict = load_component_state_dict(diffusers_dir / name)
        if target is None:
            return state_dict
        return {k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()}

    unet_config = json.loads((diffusers_dir / "unet" / "config.json").read_text())
    state_dict = pipeline_to_single_file_state_dict(
        load("unet"),
        load("vae"),
        load("text_encoder"),
        load("text_encoder_2") if has_text_encoder_2 else None,
        unet_config=unet_config,
    )

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in state_dict.items()}, str(out_path), metadata=header or None
    )
    return out_path
