"""Text samples as a picture: each sample drawn in PIL's built-in bitmap font, one block per sample."""

from __future__ import annotations

from pathlib import Path

__all__ = ["render_text_strip"]


def _printable(line: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 else ("    " if c == "\t" else "?") for c in line)


def render_text_strip(texts: list[str], out: str | Path, *, max_lines: int = 6, width: int = 96) -> Path:
    """Draw ``texts`` (at most ``max_lines`` lines of ``width`` characters each, non-ASCII shown as ``?``) as one
    black-on-white PNG at ``out``; returns the path."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    blocks = []
    for text in texts:
        lines = [_printable(line)[:width] for line in text.split("\n")][:max_lines]
        blocks.append(lines)
    cw, ch, pad = 6, 11, 6
    height = sum(len(b) * ch + 2 * pad for b in blocks) + pad
    img = Image.new("RGB", (width * cw + 2 * pad, max(height, 2 * pad)), "white")
    draw = ImageDraw.Draw(img)
    y = pad
    for block in blocks:
        draw.line([(0, y), (img.width, y)], fill=(200, 200, 200))
        y += pad
        for line in block:
            draw.text((pad, y), line, fill="black", font=font)
            y += ch
        y += pad
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
