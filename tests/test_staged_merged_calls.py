"""The staged loop's merged text calls (tiny model, float64, a 6 x 6 token grid): seed mode writes all
stage plans in one call, twig mode writes each reflection with the next band's thoughts. Fewer calls,
and every image exactly as the unmerged loop and the one-image reference draw it, redraws included.
"""
import itertools
import zlib

import pytest
import torch

from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest
from twig_batch.pipeline import staged as staged_module
from twig_batch.pipeline.bands import band_part
from twig_batch.pipeline.guidance import ModelGuide
from twig_batch.pipeline.reflection import ModelScorer
from twig_batch.pipeline.staged import PhaseClock, generate_staged
from twig_batch.reference.staged import reference_staged
from twig_batch.pipeline.text_generation import BatchedText
from twig_batch.reference.texts import ReferenceText
from twig_batch.pipeline.thinking import ModelThinker
from twig_batch.prompts import DEFAULT_TEMPLATES
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "a small cat on a large table next to a lamp", "blue sky over a river", "a tower"]
# Image 1 rejects its first two bands, image 2 its middle band, image 3 its last band (no thought after it).
REJECTED = {(PROMPTS[1], 0), (PROMPTS[1], 1), (PROMPTS[2], 1), (PROMPTS[3], 2)}
REJECT = "Score: 10\nBetter: a plain grey band"


@pytest.fixture(scope="module")
def grid6(tiny_hf_dir):
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    bundle.model.config.vq_config.num_patches = 6  # 3 bands of 12 tokens
    return bundle


def settings_for(mode, **kw):
    return GenerationSettings(mode=mode, bands=3, think_max_tokens=5, guidance_max_tokens=5, **kw)


def requests():
    return [ImageRequest(f"p{i}", p, 0, 700 + i) for i, p in enumerate(PROMPTS)]


class ScriptedText:
    """A text writer around `inner` that records how many prompts each call had and answers the
    reflections on the (prompt, band) pairs of `rejected` with a reject (recognised by their wording,
    so this works in merged calls too). Every other answer is the model's, marked with a fingerprint
    of its prompt (ids and picture): the tiny model's few greedy tokens hardly depend on the prompt, so
    a thought written from the wrong plan or canvas would otherwise go unnoticed."""

    def __init__(self, inner, rejected=frozenset()):
        self.inner, self.rejected, self.calls = inner, rejected, []

    def __call__(self, bundle, prompts, max_new_tokens, temperature=0.0):
        self.calls.append(len(prompts))
        answers = self.inner(bundle, prompts, max_new_tokens, temperature)
        return [REJECT if self.is_rejected(bundle.decode(p.ids)) else f"{a} #{fingerprint(p)}"
                for p, a in zip(prompts, answers)]

    def is_rejected(self, prompt_text):
        opening = DEFAULT_TEMPLATES.reflect.split('"{thought}"')[0]  # names the prompt and the band
        return any(opening.format(prompt=prompt, part=band_part(DEFAULT_TEMPLATES, band, 3), band=band + 1, bands=3)
                   in prompt_text for prompt, band in self.rejected)


def fingerprint(prompt):
    picture = None if prompt.image_features is None else round(float(prompt.image_features.sum()), 6)
    return zlib.crc32(repr((prompt.ids, picture)).encode())


def fast_text(rejected=frozenset()):
    return ScriptedText(BatchedText(), rejected)


def writers(text):
    """The model's thinker, scorer and guide, all over the one text writer `text` (so calls may merge)."""
    return dict(thinker=ModelThinker(text=text), scorer=ModelScorer(text=text), guide=ModelGuide(text=text))


def run_merged(bundle, settings, text, reqs=None):
    return generate_staged(bundle, reqs or requests(), settings, **writers(text))


def run_unmerged(bundle, settings, think_text, reflect_text):
    """The model thinks and reflects, but with two text writers, so no call is shared."""
    return generate_staged(bundle, requests(), settings, thinker=ModelThinker(text=think_text),
                           scorer=ModelScorer(text=reflect_text))


def run_reference(bundle, request, settings, rejected=frozenset()):
    text = ScriptedText(ReferenceText(), rejected)
    return reference_staged(bundle, request, settings, thinker=ModelThinker(text=text), scorer=ModelScorer(text=text))


def assert_same(a, b):
    assert torch.equal(a.codes, b.codes) and a.thoughts == b.thoughts and a.reflections == b.reflections
    assert a.redrawn_bands == b.redrawn_bands and a.image.tobytes() == b.image.tobytes()
    assert [(lbl, im.tobytes()) for lbl, im in a.band_images] == [(lbl, im.tobytes()) for lbl, im in b.band_images]


def test_seed_mode_writes_every_stage_plan_in_one_call(grid6):
    text = fast_text()
    batch = run_merged(grid6, settings_for("seed"), text)
    assert text.calls == [3 * len(PROMPTS)]
    for request, result in zip(requests(), batch):
        assert len(result.thoughts) == 3 and result.timings["guidance_s"] > 0
        guide = ModelGuide(text=ScriptedText(ReferenceText()))
        assert_same(result, reference_staged(grid6, request, settings_for("seed"), guide=guide))


def test_twig_reflections_and_next_thoughts_share_calls_when_every_band_stands(grid6):
    n = len(PROMPTS)
    merged_text = fast_text()
    merged = run_merged(grid6, settings_for("twig"), merged_text)
    think_text, reflect_text = fast_text(), fast_text()
    unmerged = run_unmerged(grid6, settings_for("twig"), think_text, reflect_text)
    # think band 1; reflect band 1 + think band 2; reflect band 2 + think band 3; reflect band 3.
    assert merged_text.calls == [n, 2 * n, 2 * n, n]
    assert len(think_text.calls) + len(reflect_text.calls) == 6
    assert all(r.redrawn_bands == [] for r in merged)
    for a, b in zip(merged, unmerged):
        assert_same(a, b)
        assert a.timings["thinking_s"] > 0 and a.timings["reflection_s"] > 0


def test_rejected_images_drop_the_speculative_thought_and_think_again(grid6):
    n = len(PROMPTS)
    merged_text = fast_text(REJECTED)
    merged = run_merged(grid6, settings_for("twig"), merged_text)
    assert [r.redrawn_bands for r in merged] == [[], [0, 1], [1], [2]]
    # Image 1 thinks band 2 again after redrawing band 1, images 1 and 2 band 3 after redrawing band 2.
    assert merged_text.calls == [n, 2 * n, 1, 2 * n, 2, n]
    unmerged = run_unmerged(grid6, settings_for("twig"), fast_text(REJECTED), fast_text(REJECTED))
    for request, a, b in zip(requests(), merged, unmerged):
        assert_same(a, b)
        assert_same(a, run_reference(grid6, request, settings_for("twig"), REJECTED))


def test_a_merged_call_shows_each_canvas_to_the_vision_model_once(grid6, monkeypatch):
    shown = []
    real = grid6.model.model.get_image_features
    monkeypatch.setattr(grid6.model.model, "get_image_features", lambda pixels: shown.append(len(pixels))
                        or real(pixels))
    run_merged(grid6, settings_for("twig"), fast_text(), requests()[:2])
    assert shown == [2, 2, 2]  # after each band, one look at both canvases for reflections and thoughts


def test_without_reflection_or_with_stand_ins_nothing_is_merged(grid6):
    text = fast_text()
    run_merged(grid6, settings_for("twig", reflect=False), text, requests()[:2])
    assert text.calls == [2, 2, 2]

    class AcceptAll:
        def reflect(self, bundle, reqs, settings):
            return ["Score: 95\nBetter: keep it"] * len(reqs)

    text = fast_text()
    generate_staged(grid6, requests()[:2], settings_for("twig"), thinker=ModelThinker(text=text), scorer=AcceptAll())
    assert text.calls == [2, 2, 2]


def test_a_shared_call_is_charged_to_its_phases_by_their_prompts(monkeypatch):
    ticks = itertools.count(10.0, 6.0)  # the call takes 6 s
    monkeypatch.setattr(staged_module.time, "perf_counter", lambda: next(ticks))
    clock = PhaseClock(3)
    with clock.shared(("reflection_s", [0, 1, 2]), ("thinking_s", [1, 2])):
        pass
    assert clock.timings == [{"reflection_s": 1.2}, {"reflection_s": 1.2, "thinking_s": 1.2},
                             {"reflection_s": 1.2, "thinking_s": 1.2}]
    assert sum(sum(t.values()) for t in clock.timings) == pytest.approx(6.0)
