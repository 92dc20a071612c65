"""Joined projections and fused element-wise steps compute the same decoder (tiny model, float64)."""
import pytest
import torch

from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.fused import FUSED_ATTR, fuse_decoder
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.model import load_janus
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "blue sky over a long river with many clouds and a tiny boat"]


@pytest.fixture(scope="module")
def fused64(tiny_hf_dir):
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float64)  # its own copy: fusing changes the modules
    fuse_decoder(bundle.language_model)
    return bundle


def hidden_states(bundle, seed=0):
    lm = bundle.language_model
    embeds = torch.randn(3, 7, lm.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, :2] = False  # a left-padded row
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache(lm, 3, 16)
    return forward_static(lm, cache, embeds, positions, valid)


def test_joined_weights_share_memory_with_the_modules(fused64):
    lm = fused64.language_model
    joined = getattr(lm, FUSED_ATTR)
    attn = lm.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == joined.qkv[0].data_ptr()
    assert torch.equal(joined.qkv[0][joined.q_size:joined.q_size + joined.kv_size], attn.k_proj.weight)
    assert fuse_decoder(lm) is joined  # idempotent


def test_fused_forward_matches_the_plain_forward(tiny64, fused64):
    assert getattr(tiny64.language_model, FUSED_ATTR, None) is None
    plain, fused = hidden_states(tiny64), hidden_states(fused64)
    assert torch.allclose(plain, fused, rtol=0, atol=1e-12)
    assert not torch.equal(plain, hidden_states(tiny64, seed=1))  # the comparison can tell inputs apart


def test_fused_engine_stays_token_exact_to_the_reference(fused64, tiny64):
    settings = GenerationSettings(top_k=100)
    rows = [t2i_prompt_ids(fused64, p) for p in PROMPTS]
    fast = draw_image_tokens_fast(fused64, rows, [5, 6], settings, 96)
    for b in range(2):
        assert torch.equal(fast[b], reference_image_tokens(tiny64, rows[b], 5 + b, settings, 96))
