"""The controller in the staged modes, and SPEC §4's six prototype defects, each pinned by a test.

A 6 x 6 token grid (3 bands of 12 tokens) keeps the staged runs short; float64 on CPU.
"""
import gc

import pytest
import torch

from twig_batch.controller import ControllerConfig, LatentController
from twig_batch.controller import controller as controller_module
from twig_batch.controller.weights import _SHARED
from twig_batch.imaging import decode_codes
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.pipeline.bands import BandSchedule
from twig_batch.pipeline.staged import generate_staged
from twig_batch.reference.staged import reference_staged
from twig_batch.prompts import USER_TURN
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "  a small cat on a large table next to a lamp ", "a red cube"]  # parallel samples too
# The tiny model is always unsure, so it fires at every evaluation: 3 injections per 12-token band.
CONFIG = ControllerConfig(min_history=2, min_gap=4)
ACCEPT = "Score: 95\nBetter: keep it"


@pytest.fixture(scope="module")
def grid6(tiny_hf_dir):
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    bundle.model.config.vq_config.num_patches = 6
    return bundle


def settings_for(mode, **kw):
    return GenerationSettings(mode=mode, bands=3, think_max_tokens=4, guidance_max_tokens=4, controller=CONFIG, **kw)


def requests_for(prompts):
    return [ImageRequest(f"p{i}", p, i, 300 + i) for i, p in enumerate(prompts)]


class ScriptedScorer:
    def __init__(self, answer):
        self.answer = answer

    def reflect(self, bundle, requests, settings):
        return [self.answer(r) for r in requests]


def _reject_first_draw_of_band_1_for_image_1(request):
    return "Score: 10\nBetter: a grey band" if (request.prompt, request.band) == (PROMPTS[1].strip(), 1) else ACCEPT


@pytest.fixture(scope="module")
def seed_batch(grid6):
    return generate_images(grid6, requests_for(PROMPTS), settings_for("seed"))


def _same_image(a, b):
    assert torch.equal(a.codes, b.codes) and a.thoughts == b.thoughts and a.redrawn_bands == b.redrawn_bands
    assert a.image.tobytes() == b.image.tobytes()
    assert [(r["band"], r["attempt"], r["step"], r["fired"], r["injected"]) for r in a.trigger_log] == \
        [(r["band"], r["attempt"], r["step"], r["fired"], r["injected"]) for r in b.trigger_log]
    assert [r["s_t"] for r in a.trigger_log] == pytest.approx([r["s_t"] for r in b.trigger_log], rel=1e-9)


# Defect 5 (batch size handled inconsistently): every batch size, parallel samples included, gives
# each image exactly what it gets alone and what the one-image reference loop gives.
def test_seed_mode_batch_equals_singles_and_reference_with_the_controller(grid6, seed_batch):
    settings = settings_for("seed")
    for request, result in zip(requests_for(PROMPTS), seed_batch):
        assert len(result.thoughts) == 3 and result.record()["n_injections"] >= 6
        [single] = generate_images(grid6, [request], settings)
        _same_image(result, single)
        reference = reference_staged(grid6, request, settings, LatentController(grid6, [request.prompt], CONFIG))
        _same_image(result, reference)
    assert not torch.equal(seed_batch[0].codes, seed_batch[2].codes)  # same prompt, another sample


def test_twig_mode_with_a_redraw_matches_singles_and_reference_with_the_controller(grid6):
    settings = settings_for("twig")
    scorer = ScriptedScorer(_reject_first_draw_of_band_1_for_image_1)
    requests = requests_for(PROMPTS[:2])
    batch = generate_staged(grid6, requests, settings, LatentController(grid6, PROMPTS[:2], CONFIG), scorer=scorer)
    assert [r.redrawn_bands for r in batch] == [[], [1]]
    redraw_log = [r for r in batch[1].trigger_log if r["attempt"] == 1]
    assert redraw_log and {r["band"] for r in redraw_log} == {1} and any(r["injected"] for r in redraw_log)
    for request, result in zip(requests, batch):
        [single] = generate_staged(grid6, [request], settings, LatentController(grid6, [request.prompt], CONFIG),
                                   scorer=scorer)
        _same_image(result, single)
        reference = reference_staged(grid6, request, settings, LatentController(grid6, [request.prompt], CONFIG),
                                     scorer=scorer)
        _same_image(result, reference)


# Defect 1 (stage height (24 // 3) * stage_idx, 0 at the first stage) and defect 2 (saving a partial
# image that was never decoded): band j's image holds (grid / K) * (j + 1) token rows and is the
# decode of exactly those codes.
def test_band_images_have_the_right_height_and_are_decoded_from_their_codes(grid6, seed_batch, tmp_path):
    schedule = BandSchedule(6, 3)
    ds = grid6.downsample
    for result in seed_batch:
        assert [label for label, _ in result.band_images] == ["band-1-of-3", "band-2-of-3", "band-3-of-3"]
        for j, (label, image) in enumerate(result.band_images):
            rows = schedule.rows_after(j)
            assert rows == 2 * (j + 1) and image.size == (6 * ds, rows * ds)
            decoded = decode_codes(grid6, result.codes[None, : rows * 6], token_rows=rows)[0]
            assert image.tobytes() == decoded.numpy().tobytes()
            assert len(set(image.tobytes()[i:i + 3] for i in range(0, len(image.tobytes()), 3))) > 1  # real content, not an empty canvas
            image.save(tmp_path / f"{label}.png")
        assert result.band_images[-1][1].tobytes() == result.image.tobytes()


# Defect 3 (the controller built with the wrong tokenizer): the think step reads the processor's own
# token ids; defect 4 (the think prompt polluted with formatting): only the clean user prompt, in
# every band and mode, never the chat template, the stage suffix or the guidance.
@pytest.mark.parametrize("mode", ["seed", "twig"])
def test_think_step_reads_the_clean_prompt_through_the_processor_tokenizer(grid6, tiny_hf_dir, monkeypatch, mode):
    from transformers import JanusProcessor

    processor_tokenizer = JanusProcessor.from_pretrained(str(tiny_hf_dir)).tokenizer
    config = ControllerConfig(think_tokens=5, min_history=2, min_gap=4)
    seen, thinks = [], []

    class SpyContext(controller_module.ThinkContext):
        def __init__(self, bundle, texts, memory_tokens, model=None):
            seen.extend(t.clone() for t in texts)
            super().__init__(bundle, texts, memory_tokens, model)

        def latents(self, rows, memory):
            thinks.append(len(rows))
            return super().latents(rows, memory)

    monkeypatch.setattr(controller_module, "ThinkContext", SpyContext)
    settings = GenerationSettings(mode=mode, bands=3, think_max_tokens=4, guidance_max_tokens=4, reflect=False,
                                  controller=config)
    results = generate_images(grid6, requests_for(PROMPTS[1:2]), settings)
    expected_ids = processor_tokenizer(PROMPTS[1].strip(), add_special_tokens=False)["input_ids"][-5:]
    assert processor_tokenizer.decode(expected_ids).strip().endswith("next to a lamp")
    expected = grid6.embed_text(torch.tensor(expected_ids))
    assert sum(thinks) == results[0].record()["n_injections"] >= 6  # every injection of every band thought
    assert seen
    assert all(torch.equal(embeds, expected) for embeds in seen)
    controller = LatentController(grid6, PROMPTS, config)
    assert controller.think_ids[1] == expected_ids
    formatted = processor_tokenizer(USER_TURN.format(text=PROMPTS[1]), add_special_tokens=False)["input_ids"]
    assert formatted[-5:] != expected_ids  # the chat-formatted text would have been a different tail


# Defect 6 (memory growth: intermediates and caches not freed between stages, or across prompts).
def test_no_memory_growth_across_bands_or_batches(grid6):
    def live_tensor_bytes():
        gc.collect()
        return sum(o.numel() * o.element_size() for o in gc.get_objects()
                   if type(o) is torch.Tensor and o.device.type == "cpu")

    at_band_start = []

    class Measured(LatentController):
        def begin_band(self, images, band):
            super().begin_band(images, band)  # drops the previous band's window
            at_band_start.append(live_tensor_bytes())

    settings = settings_for("seed")
    requests = requests_for(PROMPTS[:2])
    after_batch = []
    for run in range(3):
        # Runs 1 and 2 build (and drop) their own controller; run 3 measures at every band start.
        observer = Measured(grid6, [r.prompt for r in requests], CONFIG) if run == 2 else None
        results = generate_images(grid6, requests, settings, observer)
        del results, observer
        after_batch.append(live_tensor_bytes())
    # A KV cache kept from one band to the next would be > 100 kB here; the band's codes are a few hundred bytes.
    assert len(at_band_start) == 3 and max(at_band_start) - min(at_band_start) < 16 * 1024, at_band_start
    assert after_batch[1] == after_batch[2], after_batch  # nothing accumulates from batch to batch
    assert len([key for key in _SHARED.keys() if key is grid6.model]) == 1  # one set of controller weights
