"""From requests to finished images: the modes (plain, twig, seed) over the engine."""
from twig_batch.pipeline.generator import generate_images
from twig_batch.pipeline.request import ImageRequest, ImageResult

__all__ = ["ImageRequest", "ImageResult", "generate_images"]
