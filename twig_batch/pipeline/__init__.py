"""From requests to finished images: the modes (plain, twig, seed) over the engine.

Imported on first use (the engine loads torch): the batch driver reads this package's torch-free
modules (text lengths, sequence counts) without loading it.
"""
from twig_batch.first_use import names_on_first_use

__all__ = ["ImageRequest", "ImageResult", "generate_images"]
__getattr__ = names_on_first_use(globals(), {"ImageRequest": "twig_batch.pipeline.request",
                                             "ImageResult": "twig_batch.pipeline.request",
                                             "generate_images": "twig_batch.pipeline.generator"})
