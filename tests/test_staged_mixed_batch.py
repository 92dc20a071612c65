"""One batch mixing ragged thoughts, controller injections and a band redraw (tiny model, float64).

Rows of the text engine finish at different steps (a stop token that some thoughts meet early), the
controller injects into every image, one image redraws a band: each image must still be exactly
what it is alone and what the one-image reference loop draws.
"""
from functools import partial

import pytest
import torch

from twig_batch.controller import ControllerConfig, LatentController
from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.static_decoder import StaticKVCache
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest
from twig_batch.pipeline.staged import generate_staged
from twig_batch.reference.staged import reference_staged
from twig_batch.pipeline.text_generation import clean_text
from twig_batch.reference.texts import reference_text
from twig_batch.pipeline.thinking import ModelThinker
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "a small cat on a large table next to a lamp", "blue sky over a river", "a tower"]
CONFIG = ControllerConfig(min_history=2, min_gap=4)
SETTINGS = GenerationSettings(mode="twig", bands=3, think_max_tokens=48, controller=CONFIG)
ACCEPT, REJECT = "Score: 95\nBetter: keep it", "Score: 10\nBetter: a grey band"


@pytest.fixture(scope="module")
def grid6(tiny_hf_dir):
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    bundle.model.config.vq_config.num_patches = 6  # 3 bands of 12 tokens
    return bundle


class Scorer:
    """Rejects image 2's first drawing of band 1; accepts everything else."""

    def reflect(self, bundle, requests, settings):
        return [REJECT if (r.prompt, r.band) == (PROMPTS[2], 1) else ACCEPT for r in requests]


class RecordingText:
    """The fast text engine with a stop token, keeping every call's token ids."""

    def __init__(self, stop=None):
        self.stop, self.calls = stop, []

    def __call__(self, bundle, prompts, max_new_tokens, temperature=0.0):
        ids = generate_text_fast(bundle, prompts, max_new_tokens, temperature, stop_id=self.stop)
        self.calls.append(ids)
        return [clean_text(bundle, row) for row in ids]


def ragging_stop(calls: list[list[list[int]]], vocab: int) -> int:
    """A token absent from the earlier calls (so they run as before) that, in one call, ends at least
    half the rows within 16 tokens while another row runs past 32."""
    for n, call in enumerate(calls):
        seen = {t for earlier in calls[:n] for row in earlier for t in row}
        for t in range(vocab):
            if t not in seen and sum(t in row[:16] for row in call) * 2 >= len(call) and \
                    any(t not in row[:33] for row in call):
                return t
    raise AssertionError("no token makes these thoughts ragged")


class ReferenceTextWithStop:
    def __init__(self, stop):
        self.stop = stop

    def __call__(self, bundle, prompts, max_new_tokens, temperature=0.0):
        return [clean_text(bundle, reference_text(bundle, p, max_new_tokens, temperature, stop_id=self.stop))
                for p in prompts]


def requests():
    return [ImageRequest(f"p{i}", p, 0, 500 + i) for i, p in enumerate(PROMPTS)]


def run_batch(bundle, reqs, text):
    controller = LatentController(bundle, [r.prompt for r in reqs], CONFIG)
    return generate_staged(bundle, reqs, SETTINGS, controller, thinker=ModelThinker(text=text), scorer=Scorer())


def test_ragged_thoughts_injections_and_a_redraw_in_one_batch(grid6, monkeypatch):
    free = RecordingText()
    run_batch(grid6, requests(), free)
    # With this stop token the thoughts are ragged and a text batch sheds its finished rows.
    stop = ragging_stop(free.calls, grid6.model.config.text_config.vocab_size)
    shrunk = []
    real_keep = StaticKVCache.keep_rows
    monkeypatch.setattr(StaticKVCache, "keep_rows", lambda cache, rows: shrunk.append(len(rows))
                        or real_keep(cache, rows))
    ragged = RecordingText(stop)
    batch = run_batch(grid6, requests(), ragged)
    lengths = [len(row) for call in ragged.calls for row in call]
    assert min(lengths) < 16 and max(lengths) > 32 and shrunk
    assert [r.redrawn_bands for r in batch] == [[], [], [1], []]
    assert all(r.record()["n_injections"] > 0 for r in batch)
    for request, result in zip(requests(), batch):
        [alone] = run_batch(grid6, [request], RecordingText(stop))
        reference = reference_staged(grid6, request, SETTINGS, LatentController(grid6, [request.prompt], CONFIG),
                                     thinker=ModelThinker(text=ReferenceTextWithStop(stop)), scorer=Scorer())
        for other in (alone, reference):
            assert torch.equal(result.codes, other.codes) and result.thoughts == other.thoughts
            assert result.redrawn_bands == other.redrawn_bands
            assert [(t["band"], t["attempt"], t["step"], t["injected"]) for t in result.trigger_log] == \
                [(t["band"], t["attempt"], t["step"], t["injected"]) for t in other.trigger_log]
