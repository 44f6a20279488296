"""The benchmark's inputs, the same on both sides: the question and the image."""

from __future__ import annotations

from pathlib import Path

PROMPT = "Describe this image in detail."
CAT = Path(__file__).resolve().parent.parent / "assets" / "cat.jpg"


def bench_image(size: tuple[int, int], path: str | None = None):
    """The benchmark image: `path`, or the bundled cat photo resized to size = (width, height)."""
    from PIL import Image

    img = Image.open(path or CAT).convert("RGB")
    return img if path else img.resize(size, Image.BICUBIC)
