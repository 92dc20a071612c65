"""Static-cache text generation against the one-row reference (tiny model, float64)."""
import torch

from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.inputs import TextPrompt
from twig_batch.reference.texts import generate_text_batch, reference_text
from twig_batch.prompts import USER_TURN


def _prompts(bundle):
    texts = ["describe the top part", "a cat", "paint a large mountain over a river at night with stars"]
    prompts = [TextPrompt([bundle.tokens.bos, *bundle.encode(USER_TURN.format(text=t))], seed=i)
               for i, t in enumerate(texts)]
    features = torch.randn(bundle.understanding_tokens, bundle.model.config.text_config.hidden_size,
                           dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with_image = [bundle.tokens.bos, *([bundle.tokens.image] * bundle.understanding_tokens),
                  *bundle.encode("what is in the image")]
    return prompts + [TextPrompt(with_image, image_features=features, seed=9)]


def test_fast_text_matches_reference_greedy_and_sampled(tiny64):
    prompts = _prompts(tiny64)
    for temperature in (0.0, 1.0):
        fast = generate_text_fast(tiny64, prompts, 12, temperature)
        assert fast == generate_text_batch(tiny64, prompts, 12, temperature)
        assert fast == [reference_text(tiny64, p, 12, temperature) for p in prompts]
        assert all(len(t) == 12 for t in fast)  # random weights never write the stop token


def test_rows_stop_at_their_own_stop_token(tiny64):
    prompts = _prompts(tiny64)
    free = generate_text_fast(tiny64, prompts, 10, 1.0)
    stop = free[1][3]  # make row 1 stop right before its 4th token
    stopped = generate_text_fast(tiny64, prompts, 10, 1.0, stop_id=stop)
    assert stopped[1] == free[1][:free[1].index(stop)]
    for row in (0, 2, 3):
        expected = free[row][:free[row].index(stop)] if stop in free[row] else free[row]
        assert stopped[row] == expected


def test_finished_rows_leave_the_batch_and_the_rest_write_what_they_would_alone(tiny64, monkeypatch):
    from twig_batch.engine.static_decoder import StaticKVCache

    prompts = _prompts(tiny64)
    free = generate_text_fast(tiny64, prompts, 64, 1.0)
    # A stop token that ends at least half the rows within the first check (16 steps) and leaves a
    # row running past the halfway point: the batch must shrink, and the survivors keep going.
    stop = next(t for t in range(tiny64.model.config.text_config.vocab_size)
                if sum(t in row[:16] for row in free) * 2 >= len(free) and any(t not in row[:40] for row in free))
    kept = []
    real_keep = StaticKVCache.keep_rows
    monkeypatch.setattr(StaticKVCache, "keep_rows", lambda cache, rows: kept.append(rows.tolist())
                        or real_keep(cache, rows))
    stopped = generate_text_fast(tiny64, prompts, 64, 1.0, stop_id=stop)
    assert kept and len(kept[0]) <= len(prompts) // 2
    expected = [row[:row.index(stop)] if stop in row else row for row in free]
    assert stopped == expected
    assert stopped == [reference_text(tiny64, p, 64, 1.0, stop_id=stop) for p in prompts]
    assert max(map(len, stopped)) >= 40 and min(map(len, stopped)) < 16
