"""Each mode as one image's program for the mixed loop (`engine/mixed/loop.py`).

A program is a generator: it yields the stages it needs next (a list: texts and bands of image
tokens that do not wait for each other, or host calls: band decodes and canvas features, made for
every image that needs one at the same time, `HostWork`) and gets their results back, reading
reflections and building prompts itself in between, then returns the image's `ImageResult`. It is `reference/staged.py`
for one image, step for step, with the model's asks turned into yields, so the two give the same
tokens, texts and pixels.

Where the model writes both, the reflection on band k and the thought for band k + 1 are asked
together (they look at the same canvas): the thought is kept only if the band is accepted, since a
rejected band changes the plan and the canvas it read. A stand-in thinker, scorer or guide (any
object without `prompts`) answers on the host, where the program asks it.
"""
from __future__ import annotations

import torch

from twig_batch.engine.mixed.stages import HostCall, ImageStage, TextStage
from twig_batch.engine.transfer import HostCopy
from twig_batch.imaging import to_pil
from twig_batch.pipeline.bands import BandSchedule, band_label, band_pixels, canvases_after
from twig_batch.pipeline.guidance import GuidanceRequest
from twig_batch.pipeline.modes import condition_text, redraw_seed
from twig_batch.pipeline.reflection import ReflectionRequest, read_reflection
from twig_batch.pipeline.request import ImageRequest, ImageResult
from twig_batch.pipeline.text_generation import clean_text
from twig_batch.pipeline.thinking import ThoughtRequest
from twig_batch.pipeline.understanding import canvas_features
from twig_batch.prompts import Templates, t2i_prompt_ids
from twig_batch.settings import GenerationSettings


class Askers:
    """Who writes an image's texts: `thinker` (twig thoughts), `scorer` (reflections), `guide` (seed plans)."""

    def __init__(self, templates: Templates, thinker, scorer, guide):
        self.templates, self.thinker, self.scorer, self.guide = templates, thinker, scorer, guide


class HostWork:
    """The programs' work beside the model, for many images at once (`HostCall`s of one call's
    programs share these two bound methods, so the loop batches them)."""

    def __init__(self, bundle, schedule: BandSchedule):
        self.bundle, self.schedule = bundle, schedule

    def decode(self, items: list[tuple[torch.Tensor, int, bool]]) -> list[tuple]:
        """(band pixels, canvas or None) per (codes so far, band just drawn, canvas wanted?), the
        images of each band decoded together, and their canvases."""
        results: list = [None] * len(items)
        by_band: dict[int, list[int]] = {}
        for index, (_, band, _) in enumerate(items):
            by_band.setdefault(band, []).append(index)
        for band, members in by_band.items():
            drawn = self.schedule.rows_after(band) * self.schedule.grid  # codes drawn so far
            codes = torch.stack([items[i][0][:drawn] for i in members])
            pixels = band_pixels(self.bundle, codes, self.schedule, band)
            seen = [n for n, i in enumerate(members) if items[i][2]]
            canvases = canvases_after(self.bundle, codes[seen], self.schedule, band, pixels[seen]) if seen else []
            canvas_of = {members[n]: canvas for n, canvas in zip(seen, canvases)}
            for n, index in enumerate(members):
                results[index] = (pixels[n:n + 1], canvas_of.get(index))
        return results

    def features(self, canvases: list[torch.Tensor]) -> list[torch.Tensor]:
        """The vision model's features of each canvas, all canvases in one batch."""
        return canvas_features(self.bundle, canvases)


def image_program(bundle, request: ImageRequest, settings: GenerationSettings, askers: Askers, work: HostWork,
                  observer=None, image: int = 0):
    """The program of `request`'s image in `settings.mode`; `observer` (the latent controller) knows
    it as its request `image` and watches each of its bands. `work` is shared by the call's programs."""
    canvas = _Canvas(bundle, request, settings, work, observer, image)
    if settings.mode == "plain":
        return _plain(canvas)
    if settings.mode == "seed":
        return _seed(canvas, askers)
    if settings.mode == "twig":
        return _twig(canvas, askers)
    raise ValueError(f"unknown mode {settings.mode!r}")


def _ask(bundle, asker, requests: list, settings: GenerationSettings, work: HostWork):
    """The asker's answers to `requests`: as text stages when the model writes them, else on the host."""
    if not hasattr(asker, "prompts"):
        answer = getattr(asker, "think", None) or getattr(asker, "reflect", None) or asker.guide
        return answer(bundle, requests, settings)
    features = yield from _seen(requests, work)
    ids = yield _stages(bundle, asker, requests, settings, features)
    return [clean_text(bundle, written) for written in ids]


def _seen(requests: list, work: HostWork):
    """The vision features of each request's canvas (None without one), or None when no request has
    a canvas field (stage plans)."""
    if not all(hasattr(r, "canvas") for r in requests):
        return None
    shown = [i for i, r in enumerate(requests) if r.canvas is not None]
    features = (yield [HostCall(work.features, requests[i].canvas) for i in shown]) if shown else []
    feature_of = dict(zip(shown, features))
    return [feature_of.get(i) for i in range(len(requests))]


def _stages(bundle, asker, requests: list, settings: GenerationSettings, features=None) -> list[TextStage]:
    max_new_tokens, temperature = asker.text_rule(settings)
    prompts = asker.prompts(bundle, requests) if features is None else asker.prompts(bundle, requests, features)
    return [TextStage(prompt, max_new_tokens, temperature) for prompt in prompts]


class _Canvas:
    """An image drawn band by band: its codes so far, its band images and pixels. Codes and pixels
    stay on the model's device while it is drawn, each on its way to the host as soon as it is made
    (`HostCopy`), so that no program waits for the device before its image is done."""

    def __init__(self, bundle, request: ImageRequest, settings: GenerationSettings, work: HostWork,
                 observer=None, image: int = 0):
        self.bundle, self.request, self.settings, self.schedule = bundle, request, settings, work.schedule
        self.work, self.observer, self.image = work, observer, image
        self.codes = torch.zeros(0, dtype=torch.long, device=bundle.device)
        self.codes_read: HostCopy | None = None
        self.band_images: list[tuple[str, HostCopy]] = []
        self.canvas = None

    def draw(self, condition: str, band: int, seed: int, n_tokens: int | None = None):
        """Draws band `band` (every band from it on with `n_tokens`) again from `condition`."""
        start = self.schedule.start(band)
        watch = None if self.observer is None else self.observer.watch(self.image, band)
        stage = ImageStage(t2i_prompt_ids(self.bundle, condition), seed, self.settings,
                           n_tokens or self.schedule.tokens_per_band, self.codes[:start] if start else None, start,
                           watch)
        drawn = yield [stage]
        self.codes = torch.cat([self.codes[:start], drawn[0]])
        self.codes_read = HostCopy(self.codes)

    def show(self, band: int, redrawn: bool = False, canvas: bool = True):
        """Decodes the image after band `band` (and, with `canvas`, the full-size canvas the model
        looks at), beside the other programs' decodes."""
        [(pixels, seen)] = yield [HostCall(self.work.decode, (self.codes, band, canvas))]
        if canvas:
            self.canvas = seen
        self.band_images.append((band_label(band, self.schedule.bands, redrawn), HostCopy(pixels)))

    def result(self, texts=(), reflections=(), redrawn=()) -> ImageResult:
        log = [] if self.observer is None else self.observer.trigger_log(self.image)
        band_images = [(label, to_pil(pixels.values())[0]) for label, pixels in self.band_images]
        return ImageResult(request=self.request, codes=self.codes_read.values(), image=band_images[-1][1],
                           mode=self.settings.mode, band_images=band_images, thoughts=list(texts),
                           reflections=list(reflections), redrawn_bands=list(redrawn), trigger_log=log)


def _plain(image: _Canvas):
    request, schedule = image.request, image.schedule
    yield from image.draw(request.prompt.strip(), 0, request.seed, n_tokens=image.bundle.image_tokens)
    for band in range(schedule.bands):
        yield from image.show(band, canvas=False)
    return image.result()


def _seed(image: _Canvas, askers: Askers):
    bundle, request, settings = image.bundle, image.request, image.settings
    prompt, bands = request.prompt.strip(), image.schedule.bands
    asks = [GuidanceRequest(prompt, band, bands, request.seed) for band in range(bands)]
    plans = yield from _ask(bundle, askers.guide, asks, settings, image.work)
    for band in range(bands):
        yield from image.draw(condition_text("seed", askers.templates, prompt, band, bands, plans), band, request.seed)
        yield from image.show(band, canvas=False)
    return image.result(plans)


def _twig(image: _Canvas, askers: Askers):
    bundle, request, settings = image.bundle, image.request, image.settings
    prompt, bands, seed = request.prompt.strip(), image.schedule.bands, request.seed
    texts, reflections, redrawn = [], [], []
    ahead = None  # the thought for this band, written beside the last reflection

    def condition(band):
        return condition_text("twig", askers.templates, prompt, band, bands, texts)

    for band in range(bands):
        if ahead is None:
            ask = ThoughtRequest(prompt, band, bands, tuple(texts), image.canvas if band else None, seed)
            ahead = (yield from _ask(bundle, askers.thinker, [ask], settings, image.work))[0]
        texts.append(ahead)
        ahead = None
        yield from image.draw(condition(band), band, seed)
        yield from image.show(band)
        if not settings.reflect:
            continue
        ask = ReflectionRequest(prompt, band, bands, texts[band], tuple(texts), image.canvas, seed)
        answer, ahead = yield from _reflect_and_think(bundle, askers, ask, settings, band + 1 < bands, image.work)
        verdict = read_reflection(answer, band, settings.theta)
        reflections.append(verdict.record())
        if verdict.accepted:
            continue
        ahead = None
        texts[band] = verdict.improved
        redrawn.append(band)
        yield from image.draw(condition(band), band, redraw_seed(seed, band))
        yield from image.show(band, redrawn=True)
    return image.result(texts, reflections, redrawn)


def _reflect_and_think(bundle, askers: Askers, ask: ReflectionRequest, settings, think_ahead: bool,
                       work: HostWork):
    """(the reflection's answer, the next band's thought or None). Both in one yield when the model
    writes both; the thought is asked only later otherwise."""
    thinker, scorer = askers.thinker, askers.scorer
    if not (think_ahead and hasattr(thinker, "prompts") and hasattr(scorer, "prompts")):
        return (yield from _ask(bundle, scorer, [ask], settings, work))[0], None
    thought = ThoughtRequest(ask.prompt, ask.band + 1, ask.bands, ask.earlier, ask.canvas, ask.seed)
    features = yield from _seen([ask], work)  # both questions show this canvas
    stages = (_stages(bundle, scorer, [ask], settings, features)
              + _stages(bundle, thinker, [thought], settings, features))
    answer, next_thought = yield stages
    return clean_text(bundle, answer), clean_text(bundle, next_thought)
