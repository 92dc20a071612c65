"""`generate_images`: requests in, finished images and their records out, for any batch size."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from twig_batch.engine.repeatable import attention_for
from twig_batch.settings import GenerationSettings


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


def generate_images(bundle, requests: list[ImageRequest], settings: GenerationSettings, observer=None,
                    templates=None) -> list[ImageResult]:
    """Generate one image per request; all requests share the settings, each has its own seed.

    Every mode runs the one band loop (`staged.generate_staged`); `templates` (see
    `prompts.load_templates`) replaces the wording of the staged modes' prompts. With
    `settings.controller` set (and no `observer` given) a latent controller watches every image and
    its trigger log lands in the image's result.
    """
    if not requests:
        return []
    settings.check_geometry(bundle.grid)
    from twig_batch.pipeline.staged import generate_staged  # noqa: PLC0415 (staged imports this module)

    if observer is None and settings.controller is not None:
        from twig_batch.controller import LatentController
        from twig_batch.controller.weights import shared_controller_net

        observer = LatentController(bundle, [r.prompt for r in requests], settings.controller,
                                    weights=shared_controller_net(bundle, settings.controller))

    with attention_for(settings.deterministic):
        return generate_staged(bundle, requests, settings, observer, templates=templates)
