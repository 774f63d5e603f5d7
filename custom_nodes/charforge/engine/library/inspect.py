"""What a LoRA file is: format, base model, ranks, alpha, trigger words, training settings, tag frequency
and which base models it fits.

Everything here reads the safetensors header (and the tiny ``.alpha`` tensors) in pure Python, so
``charforge lora info`` works in a driver-only install, even without numpy. The file is checked when it
is opened (`formats.read_checked_header`: header, offsets, dtypes, down/up/alpha shapes); with numpy the
weights are also checked for NaN/Inf, and without it the notes say they were not. When torch and
diffusers are present the module names are also resolved against the full-size SD1.5 / SDXL layer tables
(`formats.module_table`), which makes the base-model answer exact and checks every module's shape.
Flux and SD3/SD3.5 LoRAs are recognised from their names alone (`flow_layouts.detect_family`) and checked
against the full-size variants' weight shapes (`flow_layouts.lora_targets`), also without torch.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .flow_formats import locate
from .flow_layouts import (
    VARIANTS,
    FlowLayoutError,
    detect_family,
    lora_targets,
    part_rows,
    target_from_diffusers,
    target_from_single_file,
)
from .formats import (
    ARCHS,
    InvalidLoraFile,
    LoraFormatError,
    _component_and_base,
    _group,
    _resolve,
    detect_format,
    metadata_arch,
    module_table,
    read_checked_header,
)
from .safetensors_file import loads_bounded, nonfinite_keys, read_values

ARCH_NAMES = {
    "sd15": "Stable Diffusion 1.5",
    "sdxl": "Stable Diffusion XL",
    "flux": "Flux.1",
    "sd3": "Stable Diffusion 3 / 3.5",
    "flux-dev": "Flux.1-dev",
    "flux-schnell": "Flux.1-schnell",
    "sd3-medium": "SD3 Medium",
    "sd35-medium": "SD3.5 Medium",
    "sd35-large": "SD3.5 Large",
}

# Training settings worth showing (ss_* without the prefix), in display order.
TRAINING_KEYS = (
    "network_module",
    "network_dim",
    "network_alpha",
    "network_args",
    "learning_rate",
    "unet_lr",
    "text_encoder_lr",
    "optimizer",
    "lr_scheduler",
    "lr_warmup_steps",
    "max_train_steps",
    "steps",
    "epoch",
    "num_epochs",
    "batch_size_per_device",
    "total_batch_size",
    "resolution",
    "seed",
    "mixed_precision",
    "noise_offset",
    "min_snr_gamma",
    "num_train_images",
    "clip_skip",
    "sd_model_name",
    "training_started_at",
    "training_finished_at",
    "output_name",
    "training_comment",
)


@dataclass
class FitCheck:
    arch: str
    names_match: bool  # every module names a layer of this base model
    shapes_match: bool  # ... with the full-size model's weight shape
    unknown_modules: list[str] = field(default_factory=list)
    wrong_shapes: list[str] = field(default_factory=list)


@dataclass
class LoraInfo:
    """Everything `inspect_lora` found out about one file (JSON-friendly via `to_dict`)."""

    path: str
    size_bytes: int
    format: str
    base_model: str  # "sd15", "sdxl", "flux", "sd3" or "unknown"
    base_model_from: str  # "metadata", "keys", "shapes" or ""
    modules: int
    modules_per_component: dict[str, int]
    ranks: dict[str, int]  # rank -> number of modules
    alphas: list[float]
    full_delta_tensors: int
    conv_modules: int
    dtypes: list[str]
    title: str
    trigger_words: list[str]
    tag_frequency: list[tuple[str, int]]
    training: dict[str, str]
    fits: list[str]
    fit_checks: list[FitCheck]
    notes: list[str]
    metadata: dict[str, str]

    def to_dict(self, with_metadata: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["tag_frequency"] = [{"tag": t, "count": c} for t, c in self.tag_frequency]
        if not with_metadata:
            data.pop("metadata")
        return data

    def _known(self) -> str:
        flow = self.base_model in ("flux", "sd3")
        return f"{ARCH_NAMES[self.base_model]} model" if flow else "SD1.5/SDXL model"

    def summary(self) -> str:
        """A few readable lines (the LoRA Info node and ``charforge lora info``)."""
        ranks = ", ".join(f"{r} ({n})" for r, n in sorted(self.ranks.items(), key=lambda x: int(x[0])))
        alphas = ", ".join(f"{a:g}" for a in self.alphas) or "none (ComfyUI scales by 1.0)"
        parts = ", ".join(f"{c} {n}" for c, n in self.modules_per_component.items())
        lines = [
            f"file: {Path(self.path).name} ({self.size_bytes / 1e6:.1f} MB)",
            f"format: {self.format}",
            f"base model: {ARCH_NAMES.get(self.base_model, self.base_model)}"
            + (f" (from {self.base_model_from})" if self.base_model_from else ""),
            f"modules: {self.modules} ({parts}); conv {self.conv_modules}"
            + (f"; full-weight deltas {self.full_delta_tensors}" if self.full_delta_tensors else ""),
            f"rank: {ranks or '-'}",
            f"alpha: {alphas}",
            f"trigger words: {', '.join(self.trigger_words) or '(none in metadata)'}",
            f"fits: {', '.join(ARCH_NAMES.get(a, a) for a in self.fits) or 'no full-size ' + self._known()}",
        ]
        if self.title:
            lines.insert(1, f"title: {self.title}")
        if self.training:
            lines.append("training: " + ", ".join(f"{k}={v}" for k, v in self.training.items()))
        if self.tag_frequency:
            lines.append("top tags: " + ", ".join(f"{t} ({c})" for t, c in self.tag_frequency[:10]))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _json(value: str) -> Any:
    """A metadata value parsed as JSON, or None (not JSON, or nested too deeply to parse safely)."""
    try:
        return loads_bounded(value)
    except (TypeError, ValueError):
        return None


def tag_frequency(metadata: dict[str, str]) -> list[tuple[str, int]]:
    """``ss_tag_frequency`` ({dataset folder: {tag: count}}) summed over folders, most frequent first."""
    data = _json(metadata.get("ss_tag_frequency", ""))
    counts: Counter[str] = Counter()
    if isinstance(data, dict):
        for folder in data.values():
            if isinstance(folder, dict):
                for tag, count in folder.items():
                    try:
                        counts[str(tag).strip()] += int(count)
                    except (TypeError, ValueError):
                        continue
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def trigger_words(metadata: dict[str, str], top_tags: int = 1) -> list[str]:
    """Trigger words: ``modelspec.trigger_phrase`` (comma separated); else ``trigger:`` in the training
    comment; else the most frequent tag(s) of ``ss_tag_frequency`` (the one every caption starts with)."""
    phrase = metadata.get("modelspec.trigger_phrase", "").strip()
    if not phrase:
        match = re.match(r"\s*trigger:\s*(.+)", metadata.get("ss_training_comment", ""))
        phrase = match.group(1).strip() if match else ""
    if phrase:
        return [w.strip() for w in phrase.split(",") if w.strip()]
    return [tag for tag, _ in tag_frequency(metadata)[:top_tags]]


def _guess_arch_from_names(bases: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[str, str]:
    """Base model from key names and shapes alone (no torch): SDXL-only and SD1.5-only layers, then the
    cross-attention width (768 SD1.5, 2048 SDXL)."""
    text = "\n".join(bases)
    if re.search(
        r"lora_te2_|text_encoder_2\.|clip_g\.|add_embedding|label_emb|transformer_blocks[._][1-9]", text
    ):
        return "sdxl", "keys"
    if re.search(
        r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks[._][12][._]1[._]"
        r"|output_blocks[._](9|10|11)[._]1[._]",
        text,
    ):
        return "sd15", "keys"
    for base, shape in shapes.items():
        if re.search(r"attn2[._]to_k", base) and len(shape) >= 2:
            if shape[1] == 768:
                return "sd15", "shapes"
            if shape[1] == 2048:
                return "sdxl", "shapes"
    return "unknown", ""


def _fit_checks(fmt: str, groups: dict[str, dict[str, str]], header) -> list[FitCheck] | None:
    try:
        tables = {arch: module_table(arch) for arch in ARCHS}
    except ImportError:
        return None
    checks = []
    for arch, table in tables.items():
        check = FitCheck(arch, True, True)
        for base, roles in groups.items():
            if "down" not in roles or "up" not in roles:
                continue
            try:
                entry = _resolve(table, *_component_and_base(base, fmt), fmt)
            except LoraFormatError:  # a part SD1.5/SDXL do not have (e.g. a T5 encoder)
                entry = None
            if entry is None:
                check.unknown_modules.append(base)
                continue
            down, up = header[roles["down"]].shape, header[roles["up"]].shape
            weight = (up[0], *down[1:])
            if len(entry.shape) == 4 and len(weight) == 2:
                weight = (*weight, 1, 1)
            if tuple(weight) != tuple(entry.shape):
                check.wrong_shapes.append(f"{base} {list(weight)} (model {list(entry.shape)})")
        check.names_match = not check.unknown_modules
        check.shapes_match = check.names_match and not check.wrong_shapes
        checks.append(check)
    return checks


def _flow_fit_checks(family: str, fmt: str, groups: dict[str, dict[str, str]], header) -> list[FitCheck]:
    """Per full-size Flux / SD3 variant: do the module names and the adapted weights' shapes fit it?"""
    checks = []
    for arch, variant in VARIANTS.items():
        if variant.family != family:
            continue
        shapes = lora_targets(variant)
        check = FitCheck(arch, True, True)
        for base, roles in groups.items():
            if "down" not in roles or "up" not in roles:
                continue
            found = locate(family, fmt, base)
            if found is None or (found[0] == "unet" and _single_file_name(family, found) not in shapes):
                check.unknown_modules.append(base)
                continue
            component, name, part = found
            if component != "unet":
                continue  # CLIP text encoders: the same in every variant
            target = target_from_single_file(family, _single_file_name(family, found))
            assert target is not None
            expected = shapes[target.name]
            if part is not None:
                expected = (part_rows(target, expected[0])[part], *expected[1:])
            down, up = header[roles["down"]].shape, header[roles["up"]].shape
            weight = (up[0], *down[1:])
            if tuple(weight) != tuple(expected):
                check.wrong_shapes.append(f"{base} {list(weight)} (model {list(expected)})")
        check.names_match = not check.unknown_modules
        check.shapes_match = check.names_match and not check.wrong_shapes
        checks.append(check)
    return checks


def _is_fused(family: str, fmt: str, base: str) -> bool:
    found = locate(family, fmt, base)
    if found is None or found[0] != "unet" or found[2] is not None:
        return False
    target = target_from_single_file(family, found[1])
    return target is not None and target.fused


def _single_file_name(family: str, found: tuple[str, str, int | None]) -> str:
    """The single-file weight a located transformer module adapts (a peft part names its diffusers module)."""
    _, name, part = found
    if part is None:
        return name
    resolved = target_from_diffusers(family, name)
    assert resolved is not None
    return resolved[0].name


def _finiteness(path: Path, checked) -> list[str]:
    """Refuse a file whose weights hold NaN/Inf (numpy needed); without numpy, a note saying so."""
    try:
        import numpy  # noqa: F401 - only to know whether the check can run
    except ImportError:
        return ["numpy is not installed: weights were not checked for NaN/Inf (pip install numpy)"]
    bad = nonfinite_keys(path, checked)
    if bad:
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise InvalidLoraFile(
            path,
            f"holds NaN or infinite values{more}; a diverged training run? use an earlier checkpoint of it",
            bad[0],
        )
    return []


def inspect_lora(path: str | os.PathLike) -> LoraInfo:
    """Read a LoRA file's header and describe it; raises `LoraFormatError` for files that are no LoRA."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    metadata, header, checked = read_checked_header(path)
    fmt = detect_format(header.keys())
    groups, stray = _group(header.keys(), fmt)
    notes = []
    if stray:
        notes.append(f"{len(stray)} key(s) are not LoRA tensors: {', '.join(stray[:3])}")
    per_component: Counter[str] = Counter()
    ranks: Counter[str] = Counter()
    alphas: set[float] = set()
    conv = full = 0
    shapes: dict[str, tuple[int, ...]] = {}
    for base, roles in groups.items():
        full += sum(1 for r in roles if r in ("diff", "diff_b", "dora_scale"))
        if "down" not in roles:
            continue
        try:
            component, _ = _component_and_base(base, fmt)
        except LoraFormatError:
            component = "?"
        per_component[component] += 1
        down = header[roles["down"]].shape
        ranks[str(down[0])] += 1
        if len(down) == 4:
            conv += 1
        if "up" in roles:
            up = header[roles["up"]].shape
            shapes[base] = (up[0], *down[1:])
        if "alpha" in roles:
            try:
                alphas.update(read_values(path, checked, roles["alpha"]))
            except ValueError as exc:
                raise InvalidLoraFile(path, str(getattr(exc, "reason", exc)), roles["alpha"]) from None
    try:
        family = detect_family(groups, shapes, metadata)
    except FlowLayoutError as exc:
        family = None
        notes.append(str(exc))
    no_alpha = "alpha" not in {r for roles in groups.values() for r in roles} and per_component
    if no_alpha and not (family in ("flux", "sd3") and fmt == "peft"):  # peft Flux/SD3: alpha folded in
        notes.append("no .alpha tensors: ComfyUI applies these LoRAs at scale 1.0 (not alpha/rank)")

    notes += _finiteness(path, checked)
    arch_meta = metadata_arch(metadata)
    checks = _fit_checks(fmt, groups, header) if family not in ("flux", "sd3") else None
    if family in ("flux", "sd3"):
        per_component = Counter(
            (locate(family, fmt, base) or ("?",))[0] for base, roles in groups.items() if "down" in roles
        )
        checks = _flow_fit_checks(family, fmt, groups, header)
        fits = [c.arch for c in checks if c.shapes_match]
        base_model, source = family, "keys"
        named = [c.arch for c in checks if c.names_match]
        if not named:
            unknown = min((c.unknown_modules for c in checks), key=len)
            notes.append(
                f"{len(unknown)} module(s) match no {ARCH_NAMES[family]} layer: {', '.join(unknown[:3])}"
            )
        elif not fits:
            notes.append(
                f"module names fit {', '.join(ARCH_NAMES[a] for a in named)} but shapes match no full-size "
                "model (a LoRA for a smaller or different model)"
            )
        fused = sum(1 for base in groups if _is_fused(family, fmt, base))
        if fused:
            notes.append(
                f"{fused} module(s) adapt fused weights (qkv / linear1): their rank counts every part "
                "(to_q, to_k, to_v ...) together"
            )
    elif checks is None:
        notes.append("torch/diffusers not installed: base model guessed from names, shapes not checked")
        base_model, source = (
            (arch_meta, "metadata") if arch_meta else _guess_arch_from_names(list(groups), shapes)
        )
        fits = []
    else:
        named = [c.arch for c in checks if c.names_match]
        fits = [c.arch for c in checks if c.shapes_match]
        if arch_meta and arch_meta in named:
            base_model, source = arch_meta, "metadata"
        elif len(fits) == 1:
            base_model, source = fits[0], "shapes"
        elif len(named) == 1:
            base_model, source = named[0], "keys"
        else:
            base_model, source = _guess_arch_from_names(list(groups), shapes)
            if base_model == "unknown" and named:
                base_model, source = named[0], "keys"
        if named and not fits:
            notes.append(
                f"module names fit {', '.join(named)} but shapes match no full-size model "
                "(a LoRA for a smaller or different model)"
            )
        if arch_meta and arch_meta not in named:
            notes.append(f"metadata says {arch_meta} but the modules do not all fit it")
        for check in checks:
            if check.arch == base_model and check.unknown_modules:
                notes.append(
                    f"{len(check.unknown_modules)} module(s) match no {base_model} layer: "
                    f"{', '.join(check.unknown_modules[:3])}"
                )
    training = {
        k: metadata[f"ss_{k}"] for k in TRAINING_KEYS if metadata.get(f"ss_{k}") not in (None, "", "None")
    }
    title = metadata.get("modelspec.title") or metadata.get("ss_output_name") or ""
    return LoraInfo(
        path=str(path),
        size_bytes=path.stat().st_size,
        format=fmt,
        base_model=base_model,
        base_model_from=source,
        modules=sum(per_component.values()),
        modules_per_component=dict(per_component),
        ranks=dict(ranks),
        alphas=sorted(alphas),
        full_delta_tensors=full,
        conv_modules=conv,
        dtypes=sorted({t.dtype for t in header.values()}),
        title=title,
        trigger_words=trigger_words(metadata),
        tag_frequency=tag_frequency(metadata)[:50],
        training=training,
        fits=fits,
        fit_checks=checks or [],
        notes=notes,
        metadata=metadata,
    )
