"""Weighted merge of several LoRAs and rank resize by SVD.

Merging is exact: for every module the result's delta is ``sum_i w_i * delta_i`` (``delta = alpha/rank *
up @ down``). Without a target rank the ranks are concatenated (rank = sum of the inputs' ranks, alpha =
rank so the scale is 1); with a target rank the summed delta is factorised by SVD and truncated.

Flux / SD3 modules on fused weights (``qkv``, ``linear1``) that came from split LoRAs (each rank column serves
one part: to_q, to_k, ...) are merged and resized part by part and fused again, so the result keeps that
block form (what diffusers splits back into compact per-part LoRAs) and a target rank means the rank of each
part, as in training. Natively fused modules (one LoRA over the whole qkv) are treated as one matrix.

The SVD never forms the dense delta: with ``U_all = [w_i s_i up_i]`` and ``D_all = [down_i]`` the delta is
``U_all @ D_all``; QR of both factors leaves a small ``r x r`` matrix whose SVD gives the singular values of the
delta exactly. The retained energy of a module is ``sum(kept sigma^2) / sum(all sigma^2)``, the fraction of
the delta's squared Frobenius norm that the resized module keeps; overall it is the same ratio summed over
every module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import flow_layouts
from .formats import ARCHS, LoraFormatError, LoraModule, LoraState, read_state, write_state


@dataclass
class ModuleEnergy:
    component: str
    name: str
    rank_before: int
    rank_after: int
    energy_total: float  # squared Frobenius norm of the delta
    energy_kept: float

    @property
    def retained(self) -> float:
        return 1.0 if self.energy_total <= 0 else self.energy_kept / self.energy_total


@dataclass
class ResizeReport:
    """Per-module and overall retained energy of an SVD truncation."""

    modules: list[ModuleEnergy] = field(default_factory=list)

    @property
    def retained(self) -> float:
        total = sum(m.energy_total for m in self.modules)
        return 1.0 if total <= 0 else sum(m.energy_kept for m in self.modules) / total

    @property
    def worst(self) -> ModuleEnergy | None:
        return min(self.modules, key=lambda m: m.retained, default=None)

    def summary(self) -> str:
        worst = self.worst
        text = f"{len(self.modules)} module(s); energy kept {100 * self.retained:.2f}% overall"
        if worst is not None:
            text += f", lowest {100 * worst.retained:.2f}% ({worst.component} {worst.name})"
        return text

    def to_dict(self) -> dict:
        return {
            "retained": self.retained,
            "modules": [
                {
                    "component": m.component,
                    "name": m.name,
                    "rank_before": m.rank_before,
                    "rank_after": m.rank_after,
                    "retained": m.retained,
                }
                for m in self.modules
            ],
        }


def _factors(parts: Sequence[tuple[float, LoraModule]]):
    """``(up_all [out, R], down_all [R, in_flat])`` with the weights and alpha scales folded into up."""
    import torch

    ups = [weight * module.scale * module.up.to(torch.float64).flatten(1) for weight, module in parts]
    downs = [module.down.to(torch.float64).flatten(1) for _, module in parts]
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _check_shapes(key, parts) -> None:
    shapes = {(tuple(m.up.shape[:1]), tuple(m.down.shape[1:])) for _, m in parts}
    if len(shapes) > 1:
        raise LoraFormatError(
            f"{key[0]} module {key[1]}: the LoRAs disagree on its shape {sorted(shapes)}; "
            "they were trained for different base models"
        )


def _svd_module(parts, rank: int, dtype):
    """Truncated factors of the summed delta and (rank kept, energy total, energy kept)."""
    import torch

    up_all, down_all = _factors(parts)
    q1, r1 = torch.linalg.qr(up_all)  # up_all = q1 r1
    q2, r2 = torch.linalg.qr(down_all.T)  # down_all = r2^T q2^T
    u, s, vh = torch.linalg.svd(r1 @ r2.T)
    energy = s.square()
    keep = max(1, min(rank, int(s.numel())))
    root = s[:keep].sqrt()
    up = (q1 @ u[:, :keep]) * root
    down = root[:, None] * (vh[:keep] @ q2.T)
    return up, down, keep, float(energy.sum()), float(energy[:keep].sum())


def _shaped(parts, up, down, dtype):
    first = parts[0][1]
    rank = up.shape[1]
    up = up.reshape(first.up.shape[0], rank, *([1] * (first.up.dim() - 2))).to(dtype).contiguous()
    down = down.reshape(rank, *first.down.shape[1:]).to(dtype).contiguous()
    return up, down


def _fused_target(arch: str, key: tuple[str, str]) -> flow_layouts.Target | None:
    if arch in ARCHS or key[0] != "unet":
        return None
    target = flow_layouts.target_from_single_file(arch, key[1])
    return target if target is not None and target.fused else None


def _merge_by_part(target, parts, rank: int | None, dtype):
    """Merge (and with `rank`, truncate) a fused module part by part; ``(up, down, energy total, kept)``."""
    import torch

    by_part: dict[int, list] = {}
    for weight, module in parts:
        factors = flow_layouts.Factors(module.down, module.up, module.alpha)
        for index, piece in flow_layouts.split(target, factors).items():
            by_part.setdefault(index, []).append((weight, piece))
    pieces, total, kept = {}, 0.0, 0.0
    for index, group in sorted(by_part.items()):
        if rank is None:
            up, down = _factors(group)
        else:
            up, down, _, part_total, part_kept = _svd_module(group, rank, dtype)
            total, kept = total + part_total, kept + part_kept
        pieces[index] = flow_layouts.Factors(down, up, torch.tensor(float(up.shape[1]), dtype=torch.float64))
    fused = flow_layouts.fuse(target, pieces)
    return fused.up, fused.down, total, kept


def merge_states(
    states: Sequence[LoraState],
    weights: Sequence[float],
    rank: int | None = None,
    dtype=None,
    on_module: Callable[[], None] | None = None,
) -> tuple[LoraState, ResizeReport | None]:
    """Merge LoRAs with weights into one state; with `rank`, SVD-truncate each module to at most `rank`.

    Returns the merged state and, when `rank` is given, the retained-energy report.
    """
    import torch

    if not states:
        raise ValueError("nothing to merge: give at least one LoRA")
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} LoRA(s) but {len(weights)} weight(s)")
    archs = {s.arch for s in states}
    if len(archs) > 1:
        raise LoraFormatError(f"cannot merge LoRAs for different base models: {sorted(archs)}")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if any(s.extras for s in states):
        raise LoraFormatError("a LoRA holds full-weight deltas (.diff/.diff_b); only up/down LoRAs merge")
    dtype = dtype or torch.float32
    keys: list[tuple[str, str]] = []
    for state in states:
        keys += [k for k in state.modules if k not in keys]
    modules: dict[tuple[str, str], LoraModule] = {}
    report = ResizeReport()
    for key in keys:
        parts = [(float(w), s.modules[key]) for s, w in zip(states, weights, strict=True) if key in s.modules]
        _check_shapes(key, parts)
        target = _fused_target(states[0].arch, key)
        if target is not None and all(
            flow_layouts.block_structured(target, flow_layouts.Factors(m.down, m.up, m.alpha))
            for _, m in parts
        ):
            up_t, down_t, total, kept_energy = _merge_by_part(target, parts, rank, dtype)
            up, down = _shaped(parts, up_t, down_t, dtype)
            if rank is not None:
                report.modules.append(
                    ModuleEnergy(
                        key[0], key[1], sum(m.rank for _, m in parts), up.shape[1], total, kept_energy
                    )
                )
        elif rank is None:
            up_all, down_all = _factors(parts)
            if target is not None:  # a natively fused input among them: order the columns by part
                grouped = flow_layouts.group_columns(target, flow_layouts.Factors(down_all, up_all))
                up_all, down_all = grouped.up, grouped.down
            up, down = _shaped(parts, up_all, down_all, dtype)
        else:
            up_t, down_t, kept, total, kept_energy = _svd_module(parts, rank, dtype)
            up, down = _shaped(parts, up_t, down_t, dtype)
            report.modules.append(
                ModuleEnergy(key[0], key[1], sum(m.rank for _, m in parts), kept, total, kept_energy)
            )
        modules[key] = LoraModule(key[0], key[1], down, up, torch.tensor(float(up.shape[1]), dtype=dtype))
        if on_module is not None:
            on_module()
    return LoraState(states[0].arch, modules, {}, "merge"), report if rank is not None else None


def resize_state(
    state: LoraState, rank: int, dtype=None, on_module: Callable[[], None] | None = None
) -> tuple[LoraState, ResizeReport]:
    """The LoRA with every module truncated to at most `rank` by SVD, and the energy each keeps."""
    resized, report = merge_states([state], [1.0], rank=rank, dtype=dtype, on_module=on_module)
    assert report is not None  # merge_states reports whenever it is given a rank
    resized.metadata = dict(state.metadata)
    return resized, report


def _merged_metadata(
    sources: Sequence[tuple[str, float]], states: Sequence[LoraState], rank: int | None, base: dict[str, str]
) -> dict[str, str]:
    import json

    meta = dict(base)
    triggers = []
    for state in states:
        for word in (state.metadata.get("modelspec.trigger_phrase") or "").split(","):
            if word.strip() and word.strip() not in triggers:
                triggers.append(word.strip())
    meta["modelspec.merged_from"] = ", ".join(f"{Path(p).name}:{w:g}" for p, w in sources)
    meta["charforge.merged_from"] = json.dumps([{"file": Path(p).name, "weight": w} for p, w in sources])
    if triggers:
        meta["modelspec.trigger_phrase"] = ", ".join(triggers)
    if rank is not None:
        meta["ss_network_dim"] = str(rank)
        meta["ss_network_alpha"] = str(rank)
    return meta


def merge_files(
    sources: Sequence[tuple[str | os.PathLike, float]],
    target: str | os.PathLike,
    rank: int | None = None,
    fmt: str = "kohya",
    overwrite: bool = False,
    on_module: Callable[[], None] | None = None,
) -> tuple[Path, ResizeReport | None]:
    """Merge ``[(file, weight), ...]`` into `target` (kohya layout unless `fmt` says otherwise)."""
    states = [read_state(path) for path, _ in sources]
    merged, report = merge_states(states, [w for _, w in sources], rank=rank, on_module=on_module)
    first = states[0].metadata
    keep = {
        k: v
        for k, v in first.items()
        if k.startswith(
            (
                "ss_base_model_version",
                "modelspec.architecture",
                "modelspec.implementation",
                "modelspec.resolution",
                "modelspec.sai_model_spec",
                "ss_v2",
                "ss_network_module",
            )
        )
    }
    keep["modelspec.title"] = Path(target).stem
    meta = _merged_metadata([(str(p), float(w)) for p, w in sources], states, rank, keep)
    if report is not None:
        meta["charforge.energy_retained"] = f"{report.retained:.6f}"
    path = write_state(merged, target, fmt, overwrite=overwrite, metadata=meta)
    return path, report


def resize_file(
    source: str | os.PathLike,
    target: str | os.PathLike,
    rank: int,
    fmt: str | None = None,
    overwrite: bool = False,
    on_module: Callable[[], None] | None = None,
) -> tuple[Path, ResizeReport]:
    """Resize a LoRA file to at most `rank` per module; keeps its layout and metadata unless `fmt` is given."""
    state = read_state(source)
    resized, report = resize_state(state, rank, on_module=on_module)
    meta = dict(state.metadata)
    meta["ss_network_dim"] = str(rank)
    meta["ss_network_alpha"] = str(rank)
    meta["charforge.energy_retained"] = f"{report.retained:.6f}"
    meta["charforge.resized_from"] = Path(source).name
    path = write_state(resized, target, fmt or state.source_format, overwrite=overwrite, metadata=meta)
    return path, report
