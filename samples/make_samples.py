"""Draw the sample photos in samples/character/: one consistent made-up character ("Pip") in 12 scenes.

Procedural drawings made by this script (no third-party images): the same face, hair, eyes and scarf every
time, with the pose, size, expression, background and lighting varied the way a photo set varies. They are
what ``charforge pipeline samples/character --out out`` (the README's first command) runs on.

    python samples/make_samples.py        # rewrite samples/character/*.jpg (deterministic)

Drawn faces are not something face detectors are trained on, so the pipeline's dataset stage runs on these
with the face rules off (``--no-face-check``, which the demo passes); real photos keep them on.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parent / "character"
SIZE = (576, 704)
COUNT = 12
SKIN = (241, 194, 160)
HAIR = (196, 74, 38)
EYES = (46, 108, 170)
SCARF = (40, 150, 96)


def _background(rng: random.Random, draw: ImageDraw.ImageDraw, index: int) -> None:
    w, h = SIZE
    kind = index % 4
    top = tuple(rng.randint(60, 220) for _ in range(3))
    bottom = tuple(max(0, c - rng.randint(30, 90)) for c in top)
    for y in range(h):
        t = y / h
        draw.line(
            [(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom, strict=True))
        )
    if kind == 0:  # stripes (a wall)
        for x in range(0, w, rng.randint(24, 48)):
            draw.rectangle([x, 0, x + 8, h], fill=tuple(max(0, c - 25) for c in top))
    elif kind == 1:  # trees / circles (a park)
        for _ in range(14):
            x, y, r = rng.randint(0, w), rng.randint(0, h // 2), rng.randint(20, 70)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(rng.randint(30, 80), rng.randint(110, 170), 60))
    elif kind == 2:  # checker floor (a room)
        step = rng.randint(40, 64)
        for y in range(h // 2, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step, y + step], fill=tuple(max(0, c - 40) for c in bottom))
    else:  # skyline
        x = 0
        while x < w:
            bw, bh = rng.randint(40, 90), rng.randint(120, 380)
            draw.rectangle([x, h - bh, x + bw, h], fill=tuple(rng.randint(40, 110) for _ in range(3)))
            for wy in range(h - bh + 12, h - 10, 22):
                draw.rectangle([x + 8, wy, x + 16, wy + 10], fill=(250, 230, 140))
            x += bw + rng.randint(4, 16)


def _character(draw: ImageDraw.ImageDraw, cx: float, cy: float, scale: float, tilt: float, mood: int) -> None:
    r = 120 * scale  # head radius
    # body and scarf
    draw.rounded_rectangle(
        [cx - 1.5 * r, cy + 0.9 * r, cx + 1.5 * r, cy + 3.4 * r], radius=int(0.6 * r), fill=(70, 70, 160)
    )
    draw.polygon(
        [
            (cx - 1.0 * r, cy + 0.8 * r),
            (cx + 1.0 * r, cy + 0.8 * r),
            (cx + 0.8 * r, cy + 1.2 * r),
            (cx - 0.8 * r, cy + 1.2 * r),
        ],
        fill=SCARF,
    )
    draw.rectangle([cx + 0.3 * r, cy + 1.0 * r, cx + 0.6 * r, cy + 2.0 * r], fill=SCARF)
    # hair behind the head
    draw.ellipse([cx - 1.15 * r, cy - 1.2 * r, cx + 1.15 * r, cy + 0.7 * r], fill=HAIR)
    # head and ears
    draw.ellipse([cx - 1.12 * r, cy - 0.15 * r, cx - 0.82 * r, cy + 0.25 * r], fill=SKIN)
    draw.ellipse([cx + 0.82 * r, cy - 0.15 * r, cx + 1.12 * r, cy + 0.25 * r], fill=SKIN)
    draw.ellipse(
        [cx - 0.95 * r, cy - 0.95 * r, cx + 0.95 * r, cy + 0.95 * r],
        fill=SKIN,
        outline=(150, 100, 80),
        width=max(1, int(3 * scale)),
    )
    # fringe: three locks
    for k in (-1, 0, 1):
        x0 = cx + k * 0.55 * r
        draw.pieslice([x0 - 0.6 * r, cy - 1.15 * r, x0 + 0.6 * r, cy - 0.05 * r], 180, 360, fill=HAIR)
    # eyes follow the tilt (where the character looks)
    dx = math.sin(tilt) * 0.12 * r
    for side in (-1, 1):
        ex, ey = cx + side * 0.38 * r + dx, cy + 0.05 * r
        draw.ellipse(
            [ex - 0.2 * r, ey - 0.24 * r, ex + 0.2 * r, ey + 0.24 * r],
            fill=(255, 255, 255),
            outline=(60, 40, 40),
            width=max(1, int(2 * scale)),
        )
        draw.ellipse(
            [ex - 0.12 * r + dx * 0.3, ey - 0.14 * r, ex + 0.12 * r + dx * 0.3, ey + 0.14 * r], fill=EYES
        )
        draw.ellipse(
            [ex - 0.05 * r + dx * 0.3, ey - 0.06 * r, ex + 0.05 * r + dx * 0.3, ey + 0.06 * r],
            fill=(20, 20, 30),
        )
        draw.line(
            [ex - 0.22 * r, ey - 0.36 * r, ex + 0.2 * r, ey - 0.4 * r],
            fill=(120, 50, 30),
            width=max(2, int(6 * scale)),
        )
    # freckles (the character's mark) and nose
    for side in (-1, 1):
        for j in range(3):
            fx, fy = cx + side * (0.5 + 0.09 * j) * r, cy + 0.38 * r + (j % 2) * 0.06 * r
            draw.ellipse(
                [fx - 3 * scale, fy - 3 * scale, fx + 3 * scale, fy + 3 * scale], fill=(190, 120, 90)
            )
    draw.arc(
        [cx - 0.1 * r + dx, cy + 0.2 * r, cx + 0.1 * r + dx, cy + 0.4 * r],
        200,
        340,
        fill=(170, 110, 90),
        width=max(1, int(3 * scale)),
    )
    # mouth: smile, grin, surprised
    mx, my = cx + dx, cy + 0.6 * r
    if mood == 0:
        draw.arc(
            [mx - 0.35 * r, my - 0.2 * r, mx + 0.35 * r, my + 0.15 * r],
            20,
            160,
            fill=(140, 40, 50),
            width=max(2, int(5 * scale)),
        )
    elif mood == 1:
        draw.chord([mx - 0.35 * r, my - 0.2 * r, mx + 0.35 * r, my + 0.2 * r], 0, 180, fill=(140, 40, 50))
    else:
        draw.ellipse([mx - 0.1 * r, my - 0.08 * r, mx + 0.1 * r, my + 0.14 * r], fill=(140, 40, 50))


def render(index: int) -> Image.Image:
    rng = random.Random(1000 + index)
    image = Image.new("RGB", SIZE)
    draw = ImageDraw.Draw(image)
    _background(rng, draw, index)
    w, h = SIZE
    scale = rng.uniform(0.75, 1.35)
    cx = w / 2 + rng.uniform(-90, 90)
    cy = h * rng.uniform(0.36, 0.48)
    _character(draw, cx, cy, scale, rng.uniform(-0.9, 0.9), index % 3)
    if index % 5 == 4:  # a softer, warmer shot now and then
        image = image.filter(ImageFilter.GaussianBlur(0.8))
    light = rng.uniform(0.85, 1.12)
    return image.point(lambda v: max(0, min(255, int(v * light))))


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.jpg"):
        old.unlink()
    total = 0
    for i in range(COUNT):
        path = OUT / f"pip_{i + 1:02d}.jpg"
        render(i).save(path, quality=88, optimize=True)
        total += path.stat().st_size
    print(f"wrote {COUNT} images to {OUT} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
