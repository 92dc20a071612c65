"""`generate_images`: requests in, finished images and their records out, for any batch size."""
from __future__ import annotations

from twig_batch.engine.repeatable import attention_for
from twig_batch.pipeline.request import ImageRequest, ImageResult
from twig_batch.settings import GenerationSettings


def generate_images(bundle, requests: list[ImageRequest], settings: GenerationSettings, observer=None,
                    templates=None, engine=None, on_result=None) -> list[ImageResult]:
    """Generate one image per request; all requests share the settings, each has its own seed.

    Every mode runs the one band loop: each phase of every image together (`staged.generate_staged`),
    or, where `settings.runs_mixed`, each image through its stages on its own in the engine's mixed
    loop (`mixed.generate_mixed`; the same images in float64); `templates` (see
    `prompts.load_templates`) replaces the wording of the staged modes' prompts. With
    `settings.controller` set (and no `observer` given) a latent controller watches every image and
    its trigger log lands in the image's result. `engine` (`engine/runner.py`) is the worker's own,
    built once; without one, a fresh one for `settings` serves this call. `on_result(index, result)`
    hears of each image as soon as it is done: in the mixed loop one by one, in lockstep all at the end.
    """
    if not requests:
        return []
    # the engine loads when images are drawn, not on import
    from twig_batch.engine.runner import Engine
    from twig_batch.pipeline.staged import generate_staged

    engine = engine or Engine.for_settings(bundle, settings)
    if observer is None and settings.controller is not None:
        from twig_batch.controller import LatentController
        from twig_batch.controller.weights import shared_controller_net

        observer = LatentController(bundle, [r.prompt for r in requests], settings.controller,
                                    weights=shared_controller_net(bundle, settings.controller), model=engine.model)

    if settings.runs_mixed(bundle.device.type == "cuda"):
        from twig_batch.pipeline.mixed import generate_mixed

        return generate_mixed(bundle, requests, settings, observer, engine=engine, templates=templates,
                              loop=engine.mixed_loop(), on_result=on_result)
    with attention_for(engine.deterministic):
        results = generate_staged(bundle, requests, settings, observer, engine=engine, templates=templates)
    for index, result in enumerate(results if on_result is not None else ()):
        on_result(index, result)
    return results
