"""The staged modes end to end on the tiny model (float64, a 6 x 6 token grid to keep runs short)."""
import pytest
import torch

from twig_batch.engine.runner import Engine
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest
from twig_batch.pipeline.bands import canvas_pixels
from twig_batch.pipeline.staged import generate_staged
from twig_batch.pipeline.thinking import ModelThinker
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.reference.batched import draw_image_tokens_batch
from twig_batch.reference.staged import reference_staged
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "a small cat on a large table next to a lamp", "tree", "night sky with a moon", "a house"]
ACCEPT = "Score: 95\nBetter: keep it as it is"


@pytest.fixture(scope="module")
def small(tiny_hf_dir):
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    bundle.model.config.vq_config.num_patches = 6  # 36 image tokens: 3 bands of 2 token rows
    return bundle


def settings_for(mode, **kw):
    return GenerationSettings(mode=mode, bands=3, think_max_tokens=5, guidance_max_tokens=5, **kw)


def requests_for(prompts, base_seed=100):
    return [ImageRequest(f"p{i}", p, 0, base_seed + i) for i, p in enumerate(prompts)]


class ReferenceDrawing(Engine):
    """The engine's texts, the reference's batched loop for the image tokens."""

    def draw_image_tokens(self, cond_rows, seeds, settings, n_tokens, prefix_codes=None, first_step=0, observer=None):
        return draw_image_tokens_batch(self.bundle, cond_rows, seeds, settings, n_tokens, prefix_codes, first_step,
                                       observer)


class ScriptedScorer:
    """Stands in for the model's reflection: `answer(request) -> text`."""

    def __init__(self, answer):
        self.answer, self.seen = answer, []

    def reflect(self, bundle, requests, settings):
        self.seen += requests
        return [self.answer(r) for r in requests]


class RecordingObserver:
    def __init__(self):
        self.bands, self.steps = [], []

    def begin_band(self, images, band):
        self.bands.append((list(images), band))

    def observe(self, step, hidden, logits, tokens):
        self.steps.append((step, tokens.shape[0]))

    def trigger_log(self, image):
        return [{"image": image, "draws": len(self.bands)}]


def same(a, b):
    return (torch.equal(a.codes, b.codes) and a.thoughts == b.thoughts and a.reflections == b.reflections
            and a.redrawn_bands == b.redrawn_bands and a.image.tobytes() == b.image.tobytes()
            and [(lbl, im.tobytes()) for lbl, im in a.band_images] == [(lbl, im.tobytes()) for lbl, im in b.band_images])


@pytest.mark.parametrize("mode", ["plain", "twig", "seed"])
def test_every_mode_is_deterministic_per_seed(small, mode):
    settings = settings_for(mode)
    first = generate_staged(small, requests_for(PROMPTS[:2]), settings)
    again = generate_staged(small, requests_for(PROMPTS[:2]), settings)
    other = generate_staged(small, requests_for(PROMPTS[:2], base_seed=200), settings)
    for a, b, c in zip(first, again, other):
        assert same(a, b) and a.mode == mode and a.image.size == (24, 24)
        assert not torch.equal(a.codes, c.codes)
    if mode == "seed":  # sampled stage plans follow the seed too
        assert first[0].thoughts != other[0].thoughts and len(first[0].thoughts) == 3


# Images 1 and 3 fail their second band, image 2 its first: a batch redraws a subset of its rows.
FIRST_DRAW_FAILS = {PROMPTS[1]: 1, PROMPTS[3]: 1, PROMPTS[2]: 0}


def _reject_some(request):
    return "Score: 20\nBetter: a plain grey band" if FIRST_DRAW_FAILS.get(request.prompt) == request.band else ACCEPT


@pytest.mark.parametrize("mode", ["plain", "twig", "seed", "twig-rejects"])
def test_a_batch_of_five_equals_five_singles_and_the_reference(small, mode):
    kw = {"scorer": ScriptedScorer(_reject_some)} if mode == "twig-rejects" else {}
    settings = settings_for(mode.split("-")[0])
    requests = requests_for(PROMPTS)
    batch = generate_staged(small, requests, settings, **kw)
    for request, result in zip(requests, batch):
        [single] = generate_staged(small, [request], settings, **kw)
        assert same(result, single), request
        assert same(result, reference_staged(small, request, settings, **kw)), request
    if mode == "twig-rejects":
        assert [r.redrawn_bands for r in batch] == [[], [1], [0], [1], []]
    if mode == "twig":  # random weights answer nonsense: every band accepted, flagged as unparseable
        assert all(len(r.reflections) == 3 and all(x["parse_failed"] and x["accepted"] for x in r.reflections)
                   for r in batch)


def test_a_forced_reject_redraws_exactly_that_band_once_and_differently(small):
    settings = settings_for("twig")
    requests = requests_for(PROMPTS[:2])
    improved = "a bright red cube on a wooden table"
    kept = generate_staged(small, requests, settings, scorer=ScriptedScorer(lambda r: ACCEPT))
    observer = RecordingObserver()
    reject = ScriptedScorer(lambda r: f"Score: 30\nBetter: {improved}" if (r.prompt, r.band) == (PROMPTS[0], 1)
                            else ACCEPT)
    redrawn = generate_staged(small, requests, settings, observer, scorer=reject)
    tpb = 12
    a, b = kept[0], redrawn[0]
    assert b.redrawn_bands == [1] and redrawn[1].redrawn_bands == []
    assert [x["accepted"] for x in b.reflections] == [True, False, True] and len(reject.seen) == 6
    assert b.reflections[1]["score"] == 30.0 and b.reflections[1]["improved"] == improved
    assert b.thoughts[0] == a.thoughts[0] and b.thoughts[1] == improved
    assert torch.equal(b.codes[:tpb], a.codes[:tpb]) and not torch.equal(b.codes[tpb:2 * tpb], a.codes[tpb:2 * tpb])
    assert same(redrawn[1], kept[1])
    assert [lbl for lbl, _ in b.band_images] == ["band-1-of-3", "band-2-of-3", "band-2-of-3-redrawn", "band-3-of-3"]
    assert b.band_images[1][1].tobytes() != b.band_images[2][1].tobytes()
    # One drawing call per band for everybody, plus one redraw of band 2 for image 0 only.
    assert observer.bands == [([0, 1], 0), ([0, 1], 1), ([0], 1), ([0, 1], 2)]
    assert b.trigger_log == [{"image": 0, "draws": 4}]
    assert sorted({s for s, _ in observer.steps}) == list(range(36))


def test_a_band_is_never_redrawn_twice(small):
    always = ScriptedScorer(lambda r: "Score: 0\nBetter: something else entirely")
    [result] = generate_staged(small, requests_for(PROMPTS[:1]), settings_for("twig"), scorer=always)
    assert result.redrawn_bands == [0, 1, 2] and len(result.reflections) == 3 and len(always.seen) == 3
    assert [lbl for lbl, _ in result.band_images].count("band-2-of-3-redrawn") == 1


def test_unusable_answers_are_accepted_and_flagged_in_the_record(small):
    answers = {0: "I think it looks nice", 1: "Score: 250\nBetter: a moon", 2: "Score: 15"}
    scorer = ScriptedScorer(lambda r: answers[r.band])
    [result] = generate_staged(small, requests_for(PROMPTS[:1]), settings_for("twig"), scorer=scorer)
    assert result.redrawn_bands == []
    assert [(x["accepted"], x["parse_failed"], x["problem"]) for x in result.reflections] == [
        (True, True, "unparseable"), (True, True, "score out of range"), (True, True, "missing improved description")]
    assert result.record()["reflections"] == result.reflections


def test_thoughts_see_the_partial_image_and_condition_the_band(small):
    seen, drawn = [], []

    class RecordingThinker(ModelThinker):
        def think(self, bundle, requests, settings):
            seen.extend(requests)
            return super().think(bundle, requests, settings)

    class Recording(ReferenceDrawing):
        def draw_image_tokens(self, cond_rows, seeds, settings, n_tokens, prefix_codes=None, first_step=0,
                              observer=None):
            drawn.append((cond_rows, prefix_codes, first_step))
            return super().draw_image_tokens(cond_rows, seeds, settings, n_tokens, prefix_codes, first_step, observer)

    settings = settings_for("twig", reflect=False)
    [result] = generate_staged(small, requests_for(PROMPTS[:1]), settings, thinker=RecordingThinker(),
                               engine=Recording(small))
    assert [r.band for r in seen] == [0, 1, 2] and seen[0].canvas is None
    assert [r.earlier for r in seen] == [(), tuple(result.thoughts[:1]), tuple(result.thoughts[:2])]
    for band in (1, 2):
        expected = canvas_pixels(small, result.codes[None, : 12 * band])[0]
        assert torch.equal(seen[band].canvas, expected)
    for band, (cond_rows, prefix, first_step) in enumerate(drawn):
        assert cond_rows == [t2i_prompt_ids(small, " ".join(result.thoughts[: band + 1]))]
        assert first_step == 12 * band
        assert (prefix is None) if band == 0 else torch.equal(prefix[0], result.codes[: 12 * band])
    assert result.reflections == [] and "reflection_s" not in result.timings and result.timings["thinking_s"] > 0


def test_seed_mode_draws_each_stage_from_its_stage_prompt(small):
    drawn = []

    class Recording(ReferenceDrawing):
        def draw_image_tokens(self, cond_rows, *args, **kw):
            drawn.append(cond_rows[0])
            return super().draw_image_tokens(cond_rows, *args, **kw)

    [result] = generate_staged(small, requests_for(PROMPTS[:1]), settings_for("seed"), engine=Recording(small))
    parts = ["top part", "middle part", "bottom part"]
    assert drawn == [t2i_prompt_ids(small, f"a red cube, {part}") for part in parts]
    assert len(result.thoughts) == 3 and all(result.thoughts) and result.reflections == []
    assert result.timings["guidance_s"] > 0


def test_the_fast_engine_draws_the_same_staged_images(small):
    requests = requests_for(PROMPTS[:3])
    scorer = ScriptedScorer(_reject_some)
    fast = generate_staged(small, requests, settings_for("twig"), scorer=scorer)
    eager = generate_staged(small, requests, settings_for("twig"), scorer=scorer, engine=ReferenceDrawing(small))
    assert all(same(a, b) for a, b in zip(fast, eager)) and fast[1].redrawn_bands == [1]
