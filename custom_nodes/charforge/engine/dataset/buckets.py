"""Resolution buckets: the sizes a trainer batches images at, in 64-pixel steps.

Each model family trains at about one pixel count (SD1.5 ~512x512, SDXL ~1024x1024); a bucket list
holds every width in 64-px steps with the tallest height that keeps the area within that count, so
portrait and landscape photos keep their shape instead of being cropped square. An image goes to the
bucket whose aspect ratio is closest to its own.
"""

from __future__ import annotations

import math

STEP = 64
# base side, smallest and largest side allowed
BUCKET_SETS = {
    "sdxl": (1024, 512, 2048),
    "sd15": (512, 256, 1024),
}


def bucket_list(kind: str = "sdxl", step: int = STEP) -> list[tuple[int, int]]:
    """(width, height) buckets of `kind`, sorted by aspect ratio (tall to wide)."""
    if kind not in BUCKET_SETS:
        raise ValueError(f"bucket set {kind!r} is not one of {', '.join(BUCKET_SETS)}")
    base, smallest, largest = BUCKET_SETS[kind]
    area = base * base
    buckets = set()
    for width in range(smallest, largest + 1, step):
        height = min(largest, (area // width) // step * step)
        if height >= smallest:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def square_bucket(kind: str = "sdxl") -> tuple[int, int]:
    base = BUCKET_SETS[kind][0]
    return base, base


def closest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (compared as log ratios)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def fit_without_upscale(
    bucket: tuple[int, int], width: float, height: float, step: int = STEP
) -> tuple[int, int]:
    """The bucket, or the largest size of about its shape, in `step`s, that a width x height photo covers.

    A photo smaller than its bucket is trained at its own size (rounded down to the step) rather than
    blown up, which only adds blur. Rounding each side down may change the shape slightly: crop to the
    size returned, not to the bucket.
    """
    bw, bh = bucket
    scale = min(1.0, width / bw, height / bh)
    if scale >= 1.0:
        return bucket
    width = max(step, int(bw * scale) // step * step)
    height = max(step, int(bh * scale) // step * step)
    return width, height
