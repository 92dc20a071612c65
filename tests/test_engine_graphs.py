"""Which CUDA graphs an engine captures at its sizing step, and that a first call then replays them.

There is no GPU here: the test records the attention bucket of every decode pass, and stands in for
a CUDA graph with an eager replay of the same step over the same static inputs, so the choice of
buckets and the engine's keeping of graph sets run as they do on a GPU.
"""
import pytest
import torch

from twig_batch.engine import static_decoder
from twig_batch.engine.graphs import GraphSet, decode_buckets
from twig_batch.engine.runner import Engine
from twig_batch.pipeline.sequences import call_shape
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "blue sky over a long river with many clouds and a tiny boat", "cat"]


class Quiet:
    """An observer that reserves control-token slots and never injects."""

    max_control_slots = 12

    def observe(self, step, hidden, logits, tokens):
        return None

    def trigger_log(self, image):
        return []


@pytest.fixture
def passes(monkeypatch):
    """(tokens, per-row columns?, attend, cache width) of every forward pass over a static cache."""
    seen = []
    forward_at = static_decoder.forward_at

    def spy(model, tensors, embeds, positions, valid, start, attend, columns=None, **kwargs):
        seen.append((embeds.shape[1], columns is not None, attend, tensors.k.shape[3]))
        return forward_at(model, tensors, embeds, positions, valid, start, attend, columns, **kwargs)

    monkeypatch.setattr(static_decoder, "forward_at", spy)
    return seen


@pytest.fixture
def captures(monkeypatch):
    """Graph captures (their buckets), each standing in for a graph with an eager replay."""
    captured = []

    def capture(graph_set, attend):
        captured.append(attend)
        out = graph_set._body(attend)

        class EagerGraph:
            def replay(self):
                out.copy_(graph_set._body(attend))

        return EagerGraph(), out

    monkeypatch.setattr(GraphSet, "_capture", capture)
    return captured


@pytest.mark.parametrize("observer", [None, Quiet()], ids=["plain", "control-slots"])
@pytest.mark.parametrize("prefix_tokens", [0, 40], ids=["first-band", "later-band"])
def test_the_listed_buckets_are_the_ones_a_call_reads(tiny64, passes, observer, prefix_tokens):
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    prefix = torch.randint(0, 512, (len(rows), prefix_tokens), generator=torch.Generator().manual_seed(1))
    n_tokens = 70
    Engine(tiny64).draw_image_tokens(rows, [1, 2, 3], GenerationSettings(), n_tokens,
                                     prefix_codes=prefix if prefix_tokens else None, first_step=prefix_tokens,
                                     observer=observer)
    prefill_width, _, _, width = passes[0]
    steps = [attend for tokens, own_columns, attend, _ in passes[1:] if tokens == 1 and not own_columns]
    assert len(steps) == n_tokens - 1
    slots = observer.max_control_slots if observer is not None else 0
    listed = decode_buckets(prefill_width + slots, n_tokens - 1, width)
    assert len(listed) > 2 and set(steps) == set(listed)


def test_the_sizing_step_captures_what_the_first_call_replays(tiny64, captures):
    settings = GenerationSettings(top_k=100)
    shape = call_shape(tiny64, settings)
    engine = Engine(tiny64, use_graphs=True)
    engine.reserve(shape, images=len(PROMPTS))
    [graph_set] = engine.graphs
    width = graph_set.tensors.k.shape[3]
    assert captures == engine.image_buckets(shape, width) == decode_buckets(0, shape.image_row, width)
    assert captures[-1] == static_decoder.bucket_width(shape.image_row, width)

    captures.clear()
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    replayed = engine.draw_image_tokens(rows, [4, 5, 6], settings, tiny64.image_tokens)
    assert captures == [] and len(engine.graphs) == 1  # the first call replayed the graphs of the sizing step
    eager = Engine(tiny64).draw_image_tokens(rows, [4, 5, 6], settings, tiny64.image_tokens)
    assert torch.equal(replayed, eager)

    engine.reserve(shape, images=len(PROMPTS))  # sizing again captures nothing new
    assert captures == []
    engine.reserve(shape, images=len(PROMPTS), call_images=2)  # calls of fewer images: a set of their own
    assert len(engine.graphs) == 2 and captures == decode_buckets(0, shape.image_row, width)


def test_no_graphs_off_a_gpu_and_none_for_an_fp8_cache(tiny64, captures):
    Engine(tiny64).reserve(call_shape(tiny64, GenerationSettings()), images=2)  # use_graphs: False on a CPU
    fp8 = Engine(tiny64, kv_cache="fp8", use_graphs=True)
    fp8.reserve(call_shape(tiny64, GenerationSettings(kv_cache="fp8")), images=2)
    assert captures == [] and len(fp8.graphs) == 0
