"""Draw the pack's icon (docs/icon.png, named by ``[tool.comfy] Icon`` in pyproject.toml) with Pillow.

python docs/make_icon.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIZE = 256
OUT = Path(__file__).resolve().parent / "icon.png"


def draw() -> Image.Image:
    icon = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    pen = ImageDraw.Draw(icon)
    # A dark rounded tile with a warm "forge" glow rising from the bottom.
    for y in range(SIZE):
        t = y / (SIZE - 1)
        colour = (int(40 + 150 * t**2), int(44 + 50 * t**2), int(70 - 40 * t), 255)
        pen.line([(0, y), (SIZE, y)], fill=colour)
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, SIZE - 1, SIZE - 1], radius=48, fill=255)
    icon.putalpha(mask)
    # A head-and-shoulders silhouette: the character.
    pen.ellipse([88, 40, 168, 120], fill=(245, 236, 220, 255))
    pen.pieslice([48, 128, 208, 288], 180, 360, fill=(245, 236, 220, 255))
    # Sparks.
    for x, y, r in ((196, 64, 7), (214, 96, 4), (182, 40, 4), (60, 70, 5)):
        pen.ellipse([x - r, y - r, x + r, y + r], fill=(255, 190, 80, 255))
    font = ImageFont.load_default(size=44)
    pen.text((SIZE // 2, 232), "CF", font=font, anchor="ms", fill=(40, 44, 70, 255))
    return icon


if __name__ == "__main__":
    draw().save(OUT, optimize=True)
    print(f"wrote {OUT}")
