"""twig-batch: Ray-distributed batch text-to-image with Janus-Pro and Thinking-while-Generating."""
from twig_batch.errors import InputError, ModelLoadError, OutputError, TwigBatchError
from twig_batch.first_use import names_on_first_use
from twig_batch.settings import GenerationSettings

__version__ = "0.1.0"
__all__ = ["GenerationSettings", "ImageRequest", "ImageResult", "InputError", "JanusBundle", "ModelLoadError",
           "OutputError", "TwigBatchError", "generate_images", "load_janus", "__version__"]
# The model and the pipeline load torch: imported when first used, not by the batch driver.
__getattr__ = names_on_first_use(globals(), {"JanusBundle": "twig_batch.model", "load_janus": "twig_batch.model",
                                             "ImageRequest": "twig_batch.pipeline",
                                             "ImageResult": "twig_batch.pipeline",
                                             "generate_images": "twig_batch.pipeline"})
