"""`deterministic`: attention only on kernels that repeat themselves, the same images on a CPU."""
import gc

import pytest
import torch

from twig_batch.engine.repeatable import attention_backends, attention_for
from twig_batch.engine.runner import Engine
from twig_batch.engine.static_decoder import StaticKVCache
from twig_batch.errors import InputError
from twig_batch.io.run_info import check_resume_matches
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.settings import GenerationSettings

CUDA = torch.backends.cuda


def test_only_repeatable_attention_kernels_inside_and_all_restored_after():
    before = attention_backends()
    assert CUDA.cudnn_sdp_enabled()  # PyTorch's default, which decode steps would otherwise use
    with attention_for(False):
        assert attention_backends() == before
    with attention_for(True):
        assert not CUDA.cudnn_sdp_enabled() and not CUDA.flash_sdp_enabled()
        assert CUDA.mem_efficient_sdp_enabled() and CUDA.math_sdp_enabled()
    assert attention_backends() == before


def test_kept_graphs_are_not_shared_between_the_two_kernel_choices(tiny64):
    """A graph replays the kernels it was captured with: a deterministic call must not replay a
    graph captured with cuDNN's attention over the same arena cache, nor the other way round."""
    engine = Engine(tiny64)
    gc.collect()
    cache = StaticKVCache(tiny64.language_model, rows=2, max_len=16, arenas=engine.arenas)
    assert cache.arena
    fast = engine.graphs.graph_set(engine.model, cache, tiny64.embed_image_codes, "image")
    with attention_for(True):
        repeatable = engine.graphs.graph_set(engine.model, cache, tiny64.embed_image_codes, "image")
        assert repeatable is not fast
        assert engine.graphs.graph_set(engine.model, cache, tiny64.embed_image_codes, "image") is repeatable
    assert engine.graphs.graph_set(engine.model, cache, tiny64.embed_image_codes, "image") is fast
    cache.close()


@pytest.mark.parametrize("mode", ["plain", "twig"])
def test_deterministic_draws_the_same_images_on_a_cpu(tiny64, mode):
    requests = [ImageRequest(str(i), prompt, 0, 40 + i) for i, prompt in enumerate(["a red cube", "a tall tree"])]
    settings = dict(mode=mode, think_max_tokens=6, reflect=mode == "twig")
    usual = generate_images(tiny64, requests, GenerationSettings(**settings))
    repeatable = generate_images(tiny64, requests, GenerationSettings(deterministic=True, **settings))
    for a, b in zip(usual, repeatable):
        assert torch.equal(a.codes, b.codes)
        assert a.thoughts == b.thoughts and a.reflections == b.reflections


def test_deterministic_must_be_true_or_false():
    assert GenerationSettings(deterministic=True).to_dict()["deterministic"] is True
    with pytest.raises(InputError, match="deterministic must be true or false, got 'yes'"):
        GenerationSettings(deterministic="yes")


def test_a_run_recorded_before_the_setting_existed_resumes_as_its_default():
    current = {"settings": GenerationSettings().to_dict()}
    older = {"settings": {k: v for k, v in current["settings"].items() if k != "deterministic"}}
    check_resume_matches(older, current, "dest")  # it ran with the default: nothing differs
    now_repeatable = {"settings": GenerationSettings(deterministic=True).to_dict()}
    with pytest.raises(InputError, match="cannot resume .* different settings"):
        check_resume_matches(older, now_repeatable, "dest")
