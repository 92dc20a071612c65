"""The band schedule: K horizontal bands of equal token rows, and the images seen between bands.

After band j (0-based) the image holds (rows / K) * (j + 1) token rows. Two pictures are made from
that partial raster: the band image (just the rows drawn so far, decoded at their own height, what
users see and what gets saved) and the canvas (the full-size image with every position not drawn
yet set to code 0, what the model looks at through its understanding path).

The schedule itself needs no torch: the batch driver checks a run's bands against the model's grid
with it before any actor starts, and only the pictures load the image code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from twig_batch.errors import InputError
from twig_batch.prompts import Templates

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class BandSchedule:
    grid: int  # token rows (= token columns) of the whole image
    bands: int

    def __post_init__(self) -> None:
        if not isinstance(self.bands, int) or isinstance(self.bands, bool) or self.bands < 1:
            raise InputError(f"bands must be a whole number >= 1, got {self.bands!r}")
        if self.grid % self.bands:
            divisors = [k for k in range(1, self.grid + 1) if self.grid % k == 0]
            raise InputError(
                f"bands={self.bands} does not divide the image's {self.grid} token rows; use one of {divisors}"
            )

    @property
    def rows_per_band(self) -> int:
        return self.grid // self.bands

    @property
    def tokens_per_band(self) -> int:
        return self.rows_per_band * self.grid

    def start(self, band: int) -> int:
        """Index of the band's first image token (also the sampling step it starts at)."""
        self._check(band)
        return band * self.tokens_per_band

    def rows_after(self, band: int) -> int:
        """Token rows drawn once band `band` (0-based) is finished."""
        self._check(band)
        return self.rows_per_band * (band + 1)

    def _check(self, band: int) -> None:
        if not 0 <= band < self.bands:
            raise IndexError(f"band {band} outside 0..{self.bands - 1}")


def band_part(templates: Templates, band: int, bands: int) -> str:
    """How prompts name band `band` (0-based): top/middle/bottom for 2 or 3 bands, numbers beyond."""
    if bands == 1:
        return templates.part_whole
    if bands <= 3:
        names = [templates.part_top, templates.part_middle, templates.part_bottom]
        return names[band] if bands == 3 else [names[0], names[2]][band]
    return templates.part_numbered.format(band=band + 1, bands=bands)


def band_label(band: int, bands: int, redrawn: bool = False) -> str:
    """File-name-safe label of a band image, e.g. 'band-2-of-3' or 'band-2-of-3-redrawn'."""
    return f"band-{band + 1}-of-{bands}" + ("-redrawn" if redrawn else "")


def band_pixels(bundle, codes: torch.Tensor, schedule: BandSchedule, band: int) -> torch.Tensor:
    """Band images [B, rows*ds, px, 3] of partial rasters `codes` [B, >= rows_after(band) * grid]."""
    from twig_batch.imaging import decode_codes

    rows = schedule.rows_after(band)
    return decode_codes(bundle, codes[:, : rows * schedule.grid], token_rows=rows)


def canvas_pixels(bundle, codes: torch.Tensor) -> torch.Tensor:
    """Full-size images [B, px, px, 3] of partial rasters, undrawn positions as code 0."""
    from twig_batch.imaging import decode_codes, fill_to_grid

    return decode_codes(bundle, fill_to_grid(codes, bundle.grid))


def canvases_after(bundle, codes: torch.Tensor, schedule: BandSchedule, band: int,
                   pixels: torch.Tensor) -> torch.Tensor:
    """The canvases [B, px, px, 3] the model looks at after band `band` of partial rasters `codes`
    [B, rows_after(band) * grid], whose band images are `pixels` (`band_pixels`). After the last band
    a band image is the whole picture, the same codes as its canvas: it is not decoded again."""
    if schedule.rows_after(band) == schedule.grid:
        return pixels
    return canvas_pixels(bundle, codes)
