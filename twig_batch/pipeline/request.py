"""What a generation is asked for and what it gives back: `ImageRequest` in, `ImageResult` out."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass(frozen=True, slots=True)
class ImageRequest:
    prompt_id: str
    prompt: str
    sample_index: int
    seed: int


@dataclass
class ImageResult:
    request: ImageRequest
    codes: torch.Tensor
    image: Image.Image
    mode: str
    band_images: list[tuple[str, Image.Image]] = field(default_factory=list)  # (label, partial image)
    thoughts: list[str] = field(default_factory=list)
    reflections: list[dict] = field(default_factory=list)
    redrawn_bands: list[int] = field(default_factory=list)
    trigger_log: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        """The JSON-able summary of this image (no pixels)."""
        return {
            "id": self.request.prompt_id, "prompt": self.request.prompt, "sample_index": self.request.sample_index,
            "seed": self.request.seed, "mode": self.mode, "width": self.image.width, "height": self.image.height,
            "thoughts": self.thoughts, "reflections": self.reflections, "redrawn_bands": self.redrawn_bands,
            "bands": sum(1 for label, _ in self.band_images if not label.endswith("-redrawn")),
            "band_images": [label for label, _ in self.band_images],
            "n_evaluations": len(self.trigger_log),
            "n_triggers": sum(1 for t in self.trigger_log if t.get("fired")),
            "n_injections": sum(1 for t in self.trigger_log if t.get("injected")),
            "timings": self.timings,
        }
