"""The shared CFG prefix: unconditional rows read BOS and pads from one row, tokens unchanged."""
import pytest
import torch
import torch.nn.functional as F

from test_fast_engine import PROMPTS, ScriptedInjector
from twig_batch.engine import cfg_prefix, static_decoder
from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.reference import reference_image_tokens
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings


@pytest.fixture
def split_calls(monkeypatch):
    """Share from the shortest prompt on, and count the decode steps' split attentions."""
    calls = []
    monkeypatch.setattr(cfg_prefix, "MIN_SHARED_COLUMNS", 1)

    def counting(*args):
        calls.append(1)
        return cfg_prefix.attend_split(*args)
    monkeypatch.setattr(static_decoder, "attend_split", counting)
    return calls


def test_attend_split_is_the_one_masked_attention():
    """Rows 2b + 1 hold BOS and pads (the same values at the same positions) right-aligned before
    column S, then columns of their own, some masked; the split equals one softmax over each row."""
    gen = torch.Generator().manual_seed(0)
    images, heads, width, dim, start = 3, 2, 20, 8, 9
    k = torch.randn(2 * images, heads, width, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2 * images, heads, width, dim, generator=gen, dtype=torch.float64)
    q = torch.randn(2 * images, heads, 1, dim, generator=gen, dtype=torch.float64)
    prefix_k = torch.randn(heads, start, dim, generator=gen, dtype=torch.float64)
    prefix_v = torch.randn(heads, start, dim, generator=gen, dtype=torch.float64)
    valid = torch.rand(2 * images, width, generator=gen) > 0.3
    lengths = [4, 9, 6]  # BOS and pads before begin-of-image, per image
    for b, n in enumerate(lengths):
        row = 2 * b + 1
        k[row, :, start - n:start], v[row, :, start - n:start] = prefix_k[:, :n], prefix_v[:, :n]
        valid[row, :start] = False
        valid[row, start - n:start] = True
    valid[:, -1] = True  # the query's own column
    mask = valid[:, None, None, :]
    shared = cfg_prefix.SharedPrefix(own_start=start, width=9)
    split = cfg_prefix.split_inputs(valid, mask, shared, torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert int(split.donor) == 3  # the longest prefix's unconditional row
    torch.testing.assert_close(cfg_prefix.attend_split(q, k, v, split), expected, rtol=0, atol=1e-12)


def test_shared_prefix_changes_no_token(tiny64, split_calls):
    settings = GenerationSettings(top_k=100)
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]  # ragged: left padding differs per image
    prefix = torch.randint(0, 512, (3, 64), generator=torch.Generator().manual_seed(3))
    fast = draw_image_tokens_fast(tiny64, rows, [11, 12, 13], settings, 48, prefix_codes=prefix, first_step=64)
    assert len(split_calls) == 47 * tiny64.model.config.text_config.num_hidden_layers  # every decode step
    for b in range(3):
        ref = reference_image_tokens(tiny64, rows[b], 11 + b, settings, 48, prefix_codes=prefix[b], first_step=64)
        assert torch.equal(fast[b], ref)


def test_shared_prefix_with_injections_changes_no_token(tiny64, split_calls):
    settings = GenerationSettings(temperature=0.05)
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS]
    hidden = tiny64.model.config.text_config.hidden_size
    plan = {10: {"b"}, 30: {"b", "c"}}
    injected = draw_image_tokens_fast(tiny64, rows, [1, 2, 3], settings, 50,
                                      observer=ScriptedInjector(hidden, plan, ["a", "b", "c"]))
    assert split_calls
    for b, name in enumerate("abc"):
        single = ScriptedInjector(hidden, plan, [name])
        single.embeds = ScriptedInjector(hidden, plan, ["a", "b", "c"]).embeds[b:b + 1]
        assert torch.equal(injected[b], reference_image_tokens(tiny64, rows[b], b + 1, settings, 50, observer=single))


def test_long_prompts_share_and_short_ones_or_fp8_do_not(tiny64, split_calls, monkeypatch):
    monkeypatch.setattr(cfg_prefix, "MIN_SHARED_COLUMNS", 192)
    long_prompt = " ".join(["a quiet harbour at dawn with fishing boats and gulls"] * 30)
    rows = [t2i_prompt_ids(tiny64, long_prompt), t2i_prompt_ids(tiny64, "cat")]
    assert len(rows[0]) > 193
    cpu = torch.device("cpu")
    assert cfg_prefix.wanted(rows, cpu, fp8=False)
    assert not cfg_prefix.wanted(rows, cpu, fp8=True) and not cfg_prefix.wanted(rows[1:], cpu, fp8=False)
    plan = cfg_prefix.plan(rows, text_width=256)
    assert plan == cfg_prefix.SharedPrefix(own_start=255, width=min(255, -(-(len(rows[0]) - 1) // 32) * 32))
    settings = GenerationSettings()
    fast = draw_image_tokens_fast(tiny64, rows, [5, 6], settings, 4)
    assert split_calls  # shared with the real threshold
    for b in range(2):
        assert torch.equal(fast[b], reference_image_tokens(tiny64, rows[b], 5 + b, settings, 4))
