"""The storyboard sheet: the frames in a grid, each with its number, caption and scores (Pillow only)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from ..score.render import BACKGROUND, INK, MUTED, load_font, text_width
from .storyboard import StoryFrame

FAIL_INK = (190, 50, 40)
NOT_PASSED = (220, 30, 30)  # frame never passed the retry thresholds: border, badge and legend
LEGEND_NOT_PASSED = "red frame: retried, never passed the thresholds (best attempt shown)"


def _columns(count: int) -> int:
    """A readable grid: 3 columns up to 6 frames (2 rows), 4 up to 8, 5 up to 10."""
    if count <= 3:
        return max(count, 1)
    return min(5, max(3, math.ceil(count / 2)))


def _score_line(frame: StoryFrame) -> str:
    parts = []
    if frame.identity is not None:
        parts.append(f"identity {frame.identity:.2f}")
    elif frame.candidates:
        parts.append("no face")
    if frame.guide_identity is not None:
        parts.append(f"vs frame 1 {frame.guide_identity:.2f}")
    if frame.text is not None:
        parts.append(f"text {frame.text:.2f}")
    if frame.candidates > 1:
        parts.append(f"best of {frame.candidates}")
    return " | ".join(parts)


def storyboard_sheet(
    images: Sequence,
    frames: Sequence[StoryFrame],
    title: str = "",
    columns: int | None = None,
    thumb: int = 320,
    font_size: int = 14,
):
    """A PIL image of `images` (PIL, one per frame, any sizes) in a grid with the frames' captions and scores."""
    from PIL import Image, ImageDraw

    if len(images) != len(frames):
        raise ValueError(
            f"the sheet needs one image per frame: got {len(images)} image(s) for {len(frames)} frame(s)"
        )
    if not images:
        raise ValueError("a storyboard sheet needs at least one frame")
    columns = columns or _columns(len(images))
    rows = math.ceil(len(images) / columns)
    font, small, bold = load_font(font_size), load_font(font_size - 2), load_font(font_size + 6)
    pad, gap, line = 16, 14, font_size + 6
    wrap = max(16, int(thumb / (font_size * 0.55)))
    captions = [textwrap.wrap(f"{f.index + 1}. {f.caption or f.prompt}", wrap)[:3] for f in frames]
    caption_lines = max(len(c) for c in captions)
    cell_h = thumb + 8 + caption_lines * line + line + 6
    header = (line + 16) if title else 0
    width = pad * 2 + columns * thumb + (columns - 1) * gap
    legend = (line + 8) if any(f.passed is False for f in frames) else 0
    height = pad * 2 + header + rows * cell_h + (rows - 1) * gap + legend
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=INK, font=bold)
    for position, (image, frame, caption) in enumerate(zip(images, frames, captions, strict=True)):
        col, row = position % columns, position // columns
        x = pad + col * (thumb + gap)
        y = pad + header + row * (cell_h + gap)
        picture = image.convert("RGB")
        scale = thumb / max(picture.size)
        shown = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
            Image.Resampling.LANCZOS,
        )
        draw.rectangle([x - 1, y - 1, x + thumb, y + thumb], outline=(210, 210, 210))
        sheet.paste(shown, (x + (thumb - shown.width) // 2, y + (thumb - shown.height) // 2))
        if frame.passed is False:
            for width_px in range(4):
                draw.rectangle(
                    [x - 1 - width_px, y - 1 - width_px, x + thumb + width_px, y + thumb + width_px],
                    outline=NOT_PASSED,
                )
            draw.rectangle([x, y, x + 22, y + 22], fill=NOT_PASSED)
            draw.text((x + 8, y + 3), "!", fill=(255, 255, 255), font=font)
        ty = y + thumb + 8
        for text in caption:
            draw.text((x, ty), text, fill=INK, font=font)
            ty += line
        score = _score_line(frame)
        ty = y + thumb + 8 + caption_lines * line
        colour = FAIL_INK if frame.identity is None and frame.candidates else MUTED
        while score and text_width(draw, score, small) > thumb and " | " in score:
            score = score.rsplit(" | ", 1)[0]
        draw.text((x, ty), score, fill=colour, font=small)
    if legend:
        ly = height - pad - line
        draw.rectangle([pad, ly + 2, pad + 14, ly + 16], fill=NOT_PASSED)
        draw.text((pad + 22, ly), LEGEND_NOT_PASSED, fill=INK, font=small)
    return sheet
