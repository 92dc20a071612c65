"""twig-batch: Ray-distributed batch text-to-image with Janus-Pro and Thinking-while-Generating."""
from twig_batch.errors import InputError, ModelLoadError, OutputError, TwigBatchError
from twig_batch.model import JanusBundle, load_janus
from twig_batch.pipeline import ImageRequest, ImageResult, generate_images
from twig_batch.settings import GenerationSettings

__version__ = "0.1.0"
__all__ = ["GenerationSettings", "ImageRequest", "ImageResult", "InputError", "JanusBundle", "ModelLoadError",
           "OutputError", "TwigBatchError", "generate_images", "load_janus", "__version__"]
