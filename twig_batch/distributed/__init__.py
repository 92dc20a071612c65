"""Ray: the batch job driver, its model actors, and `ImageGenerator` (the class each model actor holds)."""
from twig_batch.distributed.image_generator import ImageGenerator
from twig_batch.distributed.run_config import RunConfig

__all__ = ["ImageGenerator", "RunConfig", "run_batch"]


def run_batch(config: RunConfig, echo=print) -> dict:
    from twig_batch.distributed.batch_job import run_batch as _run_batch

    return _run_batch(config, echo)
