"""What differs between the modes inside the shared band loop: the text each band is drawn from.

- plain: the user's prompt for every band (drawing in bands changes nothing but the band images);
- twig: the thoughts of bands 1..k, joined (`twig_condition` template);
- seed: the stage prompt, "{prompt}, {part}" (`seed_stage` template; it may also use the guidance).
"""
from __future__ import annotations

from twig_batch.pipeline.bands import band_part
from twig_batch.prompts import Templates
from twig_batch.seeds import derive_seed


def condition_text(mode: str, templates: Templates, prompt: str, band: int, bands: int, texts: list[str]) -> str:
    """The text condition of band `band`'s image tokens; `texts` holds one thought or plan per band so far."""
    if mode == "plain":
        return prompt
    if mode == "twig":
        thoughts = " ".join(t for t in texts[: band + 1] if t)
        # A model that writes nothing at all leaves the prompt as the only sensible condition.
        return templates.twig_condition.format(prompt=prompt, thoughts=thoughts) if thoughts else prompt
    if mode == "seed":
        return templates.seed_stage.format(prompt=prompt, part=band_part(templates, band, bands), guidance=texts[band])
    raise ValueError(f"unknown mode {mode!r}")


def redraw_seed(image_seed: int, band: int) -> int:
    """Noise seed of a band's second drawing, so a redraw is a fresh draw even from the same text."""
    return derive_seed(image_seed, "band-redraw", band)
