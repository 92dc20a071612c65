"""From requests to finished images: the modes (plain, twig, seed) over the engine."""
from twig_batch.pipeline.generator import ImageRequest, ImageResult, generate_images

__all__ = ["ImageRequest", "ImageResult", "generate_images"]
