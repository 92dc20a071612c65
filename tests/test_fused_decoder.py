"""Joined projections and fused element-wise steps compute the same decoder (tiny model, float64)."""
import pytest
import torch

from twig_batch.engine.fused import FastModel, Kernels
from twig_batch.engine.runner import Engine
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.model import load_janus
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "blue sky over a long river with many clouds and a tiny boat"]


@pytest.fixture(scope="module")
def fused64(tiny_hf_dir):
    """An engine that joins the projections of its own copy of the model (joining makes the modules'
    weights views of the joined ones)."""
    return Engine(load_janus(str(tiny_hf_dir), "cpu", torch.float64), fused=True)


def hidden_states(model: FastModel, seed=0):
    lm = model.lm
    embeds = torch.randn(3, 7, lm.config.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, :2] = False  # a left-padded row
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = StaticKVCache(lm, 3, 16)
    return forward_static(model, cache, embeds, positions, valid)


def test_joined_weights_share_memory_with_the_modules(fused64, tiny64):
    lm = fused64.bundle.language_model
    joined = fused64.model.joined
    attn = lm.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == joined.qkv[0].data_ptr()
    assert torch.equal(joined.qkv[0][joined.q_size:joined.q_size + joined.kv_size], attn.k_proj.weight)
    again = FastModel.compiled(lm).joined  # joining again finds the same weights: no second copy
    assert again.qkv[0].data_ptr() == joined.qkv[0].data_ptr() and torch.equal(again.qkv[0], joined.qkv[0])
    assert again.gate_up[-1].data_ptr() == joined.gate_up[-1].data_ptr()
    assert set(vars(lm)) == set(vars(tiny64.language_model))  # nothing is marked on the model


def test_fused_forward_matches_the_plain_forward(tiny64, fused64):
    plain = hidden_states(FastModel.plain(tiny64.language_model))
    fused = hidden_states(fused64.model)
    assert torch.allclose(plain, fused, rtol=0, atol=1e-12)
    assert not torch.equal(plain, hidden_states(FastModel.plain(tiny64.language_model), seed=1))  # inputs tell apart


def test_fused_engine_stays_token_exact_to_the_reference(fused64, tiny64):
    settings = GenerationSettings(top_k=100)
    rows = [t2i_prompt_ids(fused64.bundle, p) for p in PROMPTS]
    fast = fused64.draw_image_tokens(rows, [5, 6], settings, 96)
    for b in range(2):
        assert torch.equal(fast[b], reference_image_tokens(tiny64, rows[b], 5 + b, settings, 96))


def test_a_kernel_that_cannot_be_compiled_runs_as_written_and_is_listed(monkeypatch):
    def no_compiler(fn, **options):
        def compiled(*args):
            raise TypeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(Kernels, "compiles_on", lambda self, device: True)  # as on a GPU
    kernels, x = Kernels(), torch.arange(3.0)
    with pytest.warns(UserWarning, match="running double uncompiled"):
        assert torch.equal(kernels.get("double", lambda t: 2 * t, x.device)(x), 2 * x)
    assert torch.equal(kernels.get("double", lambda t: 2 * t, x.device)(x), 2 * x)  # no second try
    assert kernels.uncompiled == [{"name": "double", "error": "TypeError: no compiler here"}]
