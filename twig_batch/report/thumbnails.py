"""Images as small inline thumbnails: the report is one file, so every picture is a data URI.

Sizes are chosen for a 1,000-image run: a grid thumbnail of at most 160 px and band images of at
most 128 px as JPEG come to a few kilobytes each, so the whole page stays in the tens of megabytes
and opens in a browser in seconds. Images already smaller than that are kept as they are (never
upscaled); the page scales them for display.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from PIL import Image

GRID_SIDE = 160
BAND_WIDTH = 128
JPEG_QUALITY = 80


@dataclass(frozen=True, slots=True)
class Thumbnail:
    src: str  # data URI
    width: int
    height: int

    @property
    def size_bytes(self) -> int:
        return len(self.src)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(png: bytes, max_width: int, max_height: int | None = None) -> Thumbnail:
    """Shrink (never enlarge) to fit the box, keep the aspect ratio, encode as JPEG."""
    with Image.open(io.BytesIO(png)) as image:
        image = image.convert("RGB")
        box = (max_width, max_height or max_width)
        if image.width > box[0] or image.height > box[1]:
            image.thumbnail(box, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        return Thumbnail(data_uri(buffer.getvalue(), "image/jpeg"), image.width, image.height)


def grid_thumbnail(png: bytes) -> Thumbnail:
    return thumbnail(png, GRID_SIDE, GRID_SIDE)


def band_thumbnail(png: bytes) -> Thumbnail:
    # Band images are the top part of the canvas: as wide as the image, growing in height.
    return thumbnail(png, BAND_WIDTH, BAND_WIDTH)


def png_thumbnail(png: bytes) -> Thumbnail:
    """Plots stay PNG (sharp lines and text); they are rendered at their display size already."""
    with Image.open(io.BytesIO(png)) as image:
        width, height = image.size
    return Thumbnail(data_uri(png, "image/png"), width, height)
