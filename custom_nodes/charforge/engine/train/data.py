"""Training data: where images and captions come from, how they are sized, and the caches.

(Over 600 lines on purpose: sources, buckets, captions and caches are the one data path the trainer reads, each
section short, and the cache keys depend on all of them.)

Sources (`load_items`):

- a **kohya folder**: the parent of ``<repeats>_<class tokens>/`` subfolders with images and ``.txt``
  caption sidecars (an image without one is captioned with its folder's class tokens). Pointing at one
  such subfolder instead of its parent (the most common mistake) also works;
- a **dataset manifest** from the dataset nodes (``DatasetManifest`` or its ``manifest.json``): every
  accepted entry's working file and caption;
- a plain list of ``(image path, caption)`` pairs.

Images go into **aspect-ratio buckets** (sizes of about ``resolution²`` pixels, sides multiples of
``bucket_step``): each image is scaled to cover its bucket and centre-cropped. Captions can be shuffled
(comma-separated tags after the first ``keep_tokens``) and dropped (trained as the empty caption), and
images flipped. With ``masked_loss`` each image's mask (a ``<stem>_mask.png`` next to it, or its
transparency) weights the loss per pixel; with ``face_mask`` the main face box the dataset stage found
(a manifest source only) does, so the LoRA spends its capacity on the face and less on backgrounds.

Caches: VAE latents (for each image and, with flip, its mirror) and text-encoder outputs (for each
caption, and the empty caption when captions can be dropped), in memory or on disk. Cache keys are
content hashes of everything that goes in: the image bytes, bucket, flip, the VAE's weights; the
caption text and the text encoders' weights. A changed photo or model gets a new key, never a stale
entry. Shuffled captions change every step, so with ``shuffle_caption`` the text encoders run per step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..dataset.scan import IMAGE_EXTENSIONS, load_image
from ..images import open_image

_REPEAT_FOLDER = re.compile(r"(\d+)_(.*)")


class DatasetError(ValueError):
    """The training data cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class TrainItem:
    """One training image: its file, its caption, how often it is seen per epoch, and its subset name."""

    image: str
    caption: str
    repeats: int = 1
    subset: str = ""
    face_box: tuple[float, float, float, float] | None = None  # main face [x1, y1, x2, y2] in image pixels


@dataclass(frozen=True)
class DataSettings:
    """How images and captions are prepared."""

    resolution: int = 1024  # buckets hold about resolution x resolution pixels
    enable_buckets: bool = True  # False: every image is centre-cropped to a square
    bucket_step: int = 64
    min_bucket: int = 256
    max_bucket: int = 2048
    shuffle_caption: bool = False
    keep_tokens: int = 1  # leading comma-separated tags never shuffled (the trigger word goes first)
    caption_dropout: float = 0.0  # probability of training a sample with the empty caption
    flip: bool = False  # random horizontal flips (flipped latents are cached too)
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = True
    cache_to_disk: bool = False  # otherwise in memory
    masked_loss: bool = False  # weight the loss by each image's mask (see `prepare_mask`)
    face_mask: bool = False  # weight the loss towards each image's face box from the dataset manifest
    face_mask_margin: float = (
        0.5  # the face box grown by this fraction of its size on every side (hair, chin)
    )
    face_mask_background: float = 0.25  # loss weight outside the grown face box (0 = face only)

    def __post_init__(self):
        if self.resolution % 8 or self.resolution < 64:
            raise ValueError(f"resolution must be a multiple of 8, at least 64 (got {self.resolution})")
        if not 0.0 <= self.face_mask_background <= 1.0:
            raise ValueError(f"face_mask_background must be in [0, 1] (got {self.face_mask_background})")
        if self.face_mask_margin < 0:
            raise ValueError(f"face_mask_margin must be >= 0 (got {self.face_mask_margin})")
        if self.bucket_step % 8:
            raise ValueError(f"bucket_step must be a multiple of 8 (got {self.bucket_step})")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1) (got {self.caption_dropout})")

    # --------------------------------------------------------------------------------------------------
    # Sources

    @property
    def uses_masks(self) -> bool:
        """Whether the loss is weighted per pixel (a mask file, transparency or the face box)."""
        return self.masked_loss or self.face_mask


def _images_in(folder: Path) -> list[Path]:
    images = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    stems = {p.stem for p in images}
    # "<stem>_mask.png" next to "<stem>.jpg" is that photo's loss mask, not a photo.
    return [p for p in images if not (p.stem.endswith("_mask") and p.stem[:-5] in stems)]


def _read_caption(image: Path, fallback: str, extension: str = ".txt") -> str:
    sidecar = image.with_suffix(extension)
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        if text and text[0].strip():
            return text[0].strip()  # one line per caption, as kohya reads it
    return fallback


def read_kohya_folder(folder: str | os.PathLike, caption_extension: str = ".txt") -> list[TrainItem]:
    """Items of a kohya ``train_data_dir`` (or of one ``<repeats>_<class>`` folder given directly)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {str(root)!r}")
    subsets = [p for p in sorted(root.iterdir()) if p.is_dir() and _REPEAT_FOLDER.fullmatch(p.name)]
    if not subsets and _REPEAT_FOLDER.fullmatch(root.name) and _images_in(root):
        subsets = [root]  # the user pointed at the inner folder: fine
    if not subsets:
        if _images_in(root):
            # A plain folder of images: one subset, one repeat, captions from sidecars.
            return [
                TrainItem(str(p), _read_caption(p, "", caption_extension), 1, root.name)
                for p in _images_in(root)
            ]
        others = [p.name for p in root.iterdir() if p.is_dir()][:5]
        raise DatasetError(
            f"{root} has no '<repeats>_<name>' subfolders (e.g. '10_ohwx woman') and no images"
            + (f"; its subfolders are {others}" if others else "")
            + ". Point at the folder that CONTAINS the '<repeats>_<name>' folders."
        )
    items = []
    for subset in subsets:
        match = _REPEAT_FOLDER.fullmatch(subset.name)
        assert match is not None  # subsets are the folders whose names match (or the root, checked above)
        repeats_text, class_tokens = match.groups()
        repeats = int(repeats_text)
        if repeats < 1:
            raise DatasetError(
                f"{subset}: the repeat count is {repeats}; use at least 1 (e.g. '10_{class_tokens}')"
            )
        for image in _images_in(subset):
            items.append(
                TrainItem(
                    str(image),
                    _read_caption(image, class_tokens.strip(), caption_extension),
                    repeats,
                    subset.name,
                )
            )
    if not items:
        raise DatasetError(f"no images (png, jpg, webp, ...) in the subfolders of {root}")
    return items


def items_from_pairs(
    pairs: Iterable[tuple[str, str]], repeats: int = 1, subset: str = "images"
) -> list[TrainItem]:
    """Items from ``(image path, caption)`` pairs."""
    items = [TrainItem(str(image), str(caption or ""), repeats, subset) for image, caption in pairs]
    missing = [i.image for i in items if not os.path.isfile(i.image)]
    if missing:
        raise DatasetError(f"{len(missing)} image file(s) not found, e.g. {missing[:3]}")
    return items


def items_from_manifest(manifest: Any, repeats: int = 1) -> list[TrainItem]:
    """Items from a dataset manifest (``DatasetManifest``, or the path of its ``manifest.json``).

    When the manifest was exported to a kohya folder (``export_dir``, written by the Export Dataset node)
    that folder is used: it holds the repeats and the final captions (trigger word first). Otherwise every
    accepted entry's working ``file`` and ``caption`` (or its ``.txt`` sidecar) is used. The manifest is
    read through its attributes only, so this keeps working as the dataset stages add fields.
    """
    if isinstance(manifest, (str, os.PathLike)):
        from ..dataset.manifest import DatasetManifest

        manifest = DatasetManifest.load(manifest)
    entries = [e for e in getattr(manifest, "entries", []) if getattr(e, "accepted", True)]
    boxes = {str(e.id): box for e in entries if (box := _face_box(e)) is not None}
    export_dir = getattr(manifest, "export_dir", None)
    if export_dir and Path(export_dir).is_dir():
        # Export names each file "<entry id>.<ext>" and keeps its pixels, so the boxes still fit.
        return [
            replace(item, face_box=boxes.get(Path(item.image).stem)) for item in read_kohya_folder(export_dir)
        ]
    name = str(getattr(manifest, "name", "dataset"))
    items = []
    for entry in entries:
        image = Path(entry.file)
        caption = entry.caption if getattr(entry, "caption", None) else _read_caption(image, "")
        items.append(TrainItem(str(image), caption, repeats, name, boxes.get(str(entry.id))))
    if not items:
        raise DatasetError(f"dataset {name!r} has no accepted images to train on")
    return items


def _face_box(entry: Any) -> tuple[float, float, float, float] | None:
    box = getattr(getattr(entry, "faces", None), "box", None)
    if not box or len(box) != 4:
        return None
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def load_items(source: Any, repeats: int = 1) -> list[TrainItem]:
    """Items from any supported source: a folder, a manifest (object or ``manifest.json``), or pairs."""
    if isinstance(source, (list, tuple)):
        if source and isinstance(source[0], TrainItem):
            return list(source)
        return items_from_pairs(source, repeats)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_file() and path.suffix == ".json":
            return items_from_manifest(path, repeats)
        return read_kohya_folder(path)
    if hasattr(source, "entries"):
        return items_from_manifest(source, repeats)
    raise DatasetError(
        f"cannot train on a {type(source).__name__}: give a kohya folder, a dataset manifest "
        "or (image, caption) pairs"
    )


def tag_frequency(items: Sequence[TrainItem]) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: per subset, how many images carry each comma-separated tag."""
    out: dict[str, dict[str, int]] = {}
    for item in items:
        counts = out.setdefault(item.subset, {})
        for tag in {t.strip() for t in item.caption.split(",") if t.strip()}:
            counts[tag] = counts.get(tag, 0) + 1
    return out


# --------------------------------------------------------------------------------------------------
# Buckets


def bucket_sizes(
    resolution: int, step: int = 64, min_size: int = 256, max_size: int = 2048
) -> list[tuple[int, int]]:
    """(width, height) buckets with at most ``resolution²`` pixels, sides multiples of `step` in range."""
    area = resolution * resolution
    min_size = min(min_size, resolution)
    sizes = set()
    width = min_size - min_size % step or step
    while width <= max_size:
        height = min(max_size, (area // width) // step * step)
        if height >= min_size:
            sizes.add((width, height))
            sizes.add((height, width))
        width += step
    square = resolution // step * step or step
    sizes.add((square, square))
    return sorted(sizes)


def choose_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (on a log scale); larger area wins ties."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 6), -b[0] * b[1]))


@dataclass(frozen=True)
class PreparedImage:
    """An image scaled and cropped to its bucket, as a (3, H, W) tensor in [-1, 1], with SDXL's size info."""

    pixels: torch.Tensor
    original_size: tuple[int, int]  # (height, width) of the source
    crop_top_left: tuple[int, int]  # (top, left) in the scaled image


def _cover_crop(image, bucket: tuple[int, int], flip: bool):
    """`image` scaled to cover `bucket` (width, height), centre-cropped, optionally mirrored; and (top, left)."""
    from PIL import Image

    width, height = bucket
    scale = max(width / image.width, height / image.height)
    scaled = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    resized = image.resize(scaled, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
    left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return cropped, (top, left)


def prepare_image(path: str, bucket: tuple[int, int], flip: bool = False) -> PreparedImage:
    """Scale `path` to cover `bucket` (width, height), centre-crop it, optionally mirror it."""
    import numpy as np

    image = load_image(path)
    cropped, top_left = _cover_crop(image, bucket, flip)
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return PreparedImage(
        torch.from_numpy(array).permute(2, 0, 1).contiguous(), (image.height, image.width), top_left
    )


MASK_SUFFIXES = ("_mask.png", "_mask.jpg", "_mask.webp")


def mask_file(image: str | os.PathLike) -> Path | None:
    """The mask image of `image`: ``<stem>_mask.png`` (or .jpg / .webp) next to it, if there is one."""
    image = Path(image)
    for suffix in MASK_SUFFIXES:
        candidate = image.with_name(image.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def prepare_mask(
    path: str,
    bucket: tuple[int, int],
    flip: bool = False,
    factor: int = 8,
    use_file_mask: bool = True,
    face_box: Sequence[float] | None = None,
    face_margin: float = 0.5,
    face_background: float = 0.25,
) -> torch.Tensor:
    """The loss weights of `path` at latent size: (1, height / factor, width / factor) in [0, 1].

    From a ``<stem>_mask.png`` next to the image (white = train, black = ignore, grey = partly, as
    kohya's masks), else from the image's transparency (opaque = train), else all ones (always all ones
    without `use_file_mask`). With `face_box`
    (``[x1, y1, x2, y2]`` in the image's pixels, as the dataset manifest records the main face) that is
    multiplied by a face mask: 1 inside an ellipse around the box grown by `face_margin` of its size on
    every side, `face_background` outside, with a soft edge. Cropped and mirrored exactly like the image.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter, ImageOps

    sidecar = mask_file(path) if use_file_mask else None
    with open_image(sidecar or path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if sidecar is not None:
            mask = img.convert("L")
        elif use_file_mask and (
            img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)
        ):
            mask = img.convert("RGBA").getchannel("A")
        else:
            mask = None
        size = img.size
    if face_box is not None:
        x1, y1, x2, y2 = (float(v) for v in face_box)
        grow_x, grow_y = (x2 - x1) * face_margin, (y2 - y1) * face_margin
        face = Image.new("L", size, round(255 * face_background))
        ImageDraw.Draw(face).ellipse((x1 - grow_x, y1 - grow_y, x2 + grow_x, y2 + grow_y), fill=255)
        face = face.filter(ImageFilter.GaussianBlur(max(1.0, 0.05 * max(x2 - x1, y2 - y1))))
        mask = (
            face
            if mask is None
            else Image.fromarray(
                (np.asarray(mask, dtype=np.float32) * np.asarray(face, dtype=np.float32) / 255.0)
                .round()
                .astype(np.uint8)
            )
        )
    if mask is None:
        return torch.ones(1, bucket[1] // factor, bucket[0] // factor)
    cropped, _ = _cover_crop(mask, bucket, flip)
    small = cropped.resize((bucket[0] // factor, bucket[1] // factor), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]


# --------------------------------------------------------------------------------------------------
# Captions


def process_caption(caption: str, settings: DataSettings, rng: random.Random) -> str:
    """The caption a sample is trained with: maybe dropped, maybe shuffled after `keep_tokens` tags."""
    if settings.caption_dropout and rng.random() < settings.caption_dropout:
        return ""
    if not settings.shuffle_caption:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    keep, rest = tags[: settings.keep_tokens], tags[settings.keep_tokens :]
    rng.shuffle(rest)
    return ", ".join(keep + rest)


# --------------------------------------------------------------------------------------------------
# Caches


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(*parts: Any) -> str:
    """A content key: SHA-256 of the JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class TensorCache:
    """key -> dict of tensors, in memory or as one ``.safetensors`` file per key under `folder`."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else None
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if self.folder is None:  # in memory only: a key never put is simply missing
            raise KeyError(key)
        return self.folder / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return key in self._memory or (self.folder is not None and self._path(key).is_file())

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self._memory:
            return self._memory[key]
        from safetensors.torch import load_file

        value = load_file(str(self._path(key)))
        return value

    def put(self, key: str, value: dict[str, torch.Tensor]) -> None:
        value = {k: v.detach().to("cpu").contiguous() for k, v in value.items()}
        if self.folder is None:
            self._memory[key] = value
            return
        from safetensors.torch import save_file

        tmp = self._path(key).with_suffix(".tmp")
        save_file(value, str(tmp))
        os.replace(tmp, self._path(key))


# --------------------------------------------------------------------------------------------------
# The prepared dataset


@dataclass
class Sample:
    """One entry of an epoch: which item, and whether it is shown mirrored."""

    item: int
    flip: bool = False


@dataclass
class TrainingData:
    """Items with their buckets and content hashes; builds epochs and batches and holds the caches."""

    items: list[TrainItem]
    settings: DataSettings
    buckets: list[tuple[int, int]] = field(default_factory=list)  # per item, (width, height)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # per item, source (width, height)
    hashes: list[str] = field(default_factory=list)  # per item, SHA-256 of the image file
    latents: TensorCache = field(default_factory=TensorCache)
    texts: TensorCache = field(default_factory=TensorCache)

    @classmethod
    def prepare(
        cls, items: Sequence[TrainItem], settings: DataSettings, cache_dir: str | os.PathLike | None = None
    ) -> TrainingData:
        """Measure every image, assign buckets and hash the files (raises `DatasetError` on bad images)."""
        if not items:
            raise DatasetError("no training images")
        if settings.enable_buckets:
            choices = bucket_sizes(
                settings.resolution, settings.bucket_step, settings.min_bucket, settings.max_bucket
            )
        else:
            choices = [(settings.resolution, settings.resolution)]
        buckets, sizes, hashes, bad = [], [], [], []
        for item in items:
            try:
                with open_image(item.image) as img:
                    width, height = img.size
                    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # stored sideways (phone photos)
                        width, height = height, width
            except Exception as exc:  # noqa: BLE001 - any decoder failure: report the file
                bad.append(f"{os.path.basename(item.image)} ({exc})")
                continue
            sizes.append((width, height))
            buckets.append(choose_bucket(width, height, choices))
            hashes.append(file_sha256(item.image))
        if bad:
            raise DatasetError(
                f"{len(bad)} image(s) cannot be read: {'; '.join(bad[:5])}; remove or replace them"
            )
        folder = Path(cache_dir) if cache_dir and settings.cache_to_disk else None
        return cls(
            list(items),
            settings,
            buckets,
            sizes,
            hashes,
            TensorCache(folder / "latents" if folder else None),
            TensorCache(folder / "text" if folder else None),
        )

    @property
    def num_samples(self) -> int:
        """Samples per epoch (images x repeats)."""
        return sum(item.repeats for item in self.items)

    def bucket_histogram(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for width, height in self.buckets:
            out[f"{width}x{height}"] = out.get(f"{width}x{height}", 0) + 1
        return out

    def epoch_batches(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """The batches of one epoch as lists of item indices; every batch holds one bucket size.

        Deterministic in (seed, epoch), so a resumed run sees the same order from where it stopped.
        """
        rng = random.Random(f"{seed}:{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            by_bucket.setdefault(self.buckets[index], []).extend([index] * item.repeats)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            rng.shuffle(indices)
            batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        rng.shuffle(batches)
        return batches

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.epoch_batches(0, batch_size, 0))

    # ---------------------------------------------------------------------------- latents

    def latent_key(self, index: int, flip: bool, vae_fingerprint: str) -> str:
        return cache_key("latent", self.hashes[index], self.buckets[index], flip, vae_fingerprint)

    def cache_latents(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        vae_fingerprint: str,
        batch_size: int = 4,
        on_item: Callable[[int, int], None] | None = None,
    ) -> int:
        """Encode every image (and mirror, with flip) not cached yet; returns how many were encoded."""
        todo = [
            (i, flip)
            for i in range(len(self.items))
            for flip in ((False, True) if self.settings.flip else (False,))
            if self.latent_key(i, flip, vae_fingerprint) not in self.latents
        ]
        groups: dict[tuple[int, int], list[tuple[int, bool]]] = {}
        for index, flip in todo:
            groups.setdefault(self.buckets[index], []).append((index, flip))
        done = 0
        for chunk in (g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)):
            pixels = torch.stack(
                [prepare_image(self.items[i].image, self.buckets[i], flip).pixels for i, flip in chunk]
            )
            latents = encode(pixels)
            for (index, flip), latent in zip(chunk, latents, strict=True):
                self.latents.put(self.latent_key(index, flip, vae_fingerprint), {"latent": latent})
            done += len(chunk)
            if on_item is not None:
                on_item(done, len(todo))
        return done

    def latent(self, index: int, flip: bool, vae_fingerprint: str) -> torch.Tensor:
        return self.latents.get(self.latent_key(index, flip, vae_fingerprint))["latent"]

    def mask(self, index: int, flip: bool = False) -> torch.Tensor:
        """Loss weights of item `index` at latent size (see `prepare_mask`)."""
        s, item = self.settings, self.items[index]
        return prepare_mask(
            item.image,
            self.buckets[index],
            flip,
            use_file_mask=s.masked_loss,
            face_box=item.face_box if s.face_mask else None,
            face_margin=s.face_mask_margin,
            face_background=s.face_mask_background,
        )

    def mask_hashes(self) -> list[str]:
        """SHA-256 of each item's mask file ("" without one) and its face box: what a run was trained on."""
        out = []
        for item in self.items:
            digest = file_sha256(m) if self.settings.masked_loss and (m := mask_file(item.image)) else ""
            if self.settings.face_mask and item.face_box is not None:
                digest += ":face" + ",".join(f"{v:.1f}" for v in item.face_box)
            out.append(digest)
        return out

    def time_ids(self, index: int, flip: bool = False) -> torch.Tensor:
        """SDXL's (original h, w, crop top, left, target h, w) for item `index`."""
        width, height = self.buckets[index]
        source_w, source_h = self.sizes[index]
        scale = max(width / source_w, height / source_h)
        scaled_w, scaled_h = max(width, round(source_w * scale)), max(height, round(source_h * scale))
        top, left = (scaled_h - height) // 2, (scaled_w - width) // 2
        return torch.tensor([source_h, source_w, top, left, height, width], dtype=torch.float32)

    # ---------------------------------------------------------------------------- captions

    def text_key(self, caption: str, text_fingerprint: str) -> str:
        return cache_key("text", caption, text_fingerprint)

    def captions_to_cache(self) -> list[str]:
        """Every caption a step can ask for when captions are not shuffled (plus "" with dropout)."""
        captions = sorted({item.caption for item in self.items})
        if self.settings.caption_dropout and "" not in captions:
            captions.append("")
        return captions

    def cache_text(
        self,
        encode: Callable[[list[str]], dict[str, torch.Tensor]],
        text_fingerprint: str,
        batch_size: int = 8,
    ) -> int:
        todo = [c for c in self.captions_to_cache() if self.text_key(c, text_fingerprint) not in self.texts]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            encoded = encode(chunk)
            for row, caption in enumerate(chunk):
                self.texts.put(
                    self.text_key(caption, text_fingerprint), {k: v[row] for k, v in encoded.items()}
                )
        return len(todo)

    def text(self, caption: str, text_fingerprint: str) -> dict[str, torch.Tensor]:
        return self.texts.get(self.text_key(caption, text_fingerprint))
