"""Images per call from free memory: the estimate follows the KV cache each mode keeps."""
import pytest
import torch

from twig_batch.engine.memory import MAX_IMAGES_PER_CALL, free_device_bytes, kv_bytes_per_token, prefill_slice_bytes
from twig_batch.engine.static_decoder import StaticKVCache
from twig_batch.pipeline.sequences import bytes_per_image, images_per_call
from twig_batch.settings import ControllerConfig, GenerationSettings


def test_kv_bytes_per_token_is_what_the_static_cache_allocates(tiny64):
    lm = tiny64.language_model
    cache = StaticKVCache(lm, rows=3, max_len=10)
    allocated = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert cache.max_len >= 10  # a cache lent by the KV arena may be wider than asked
    assert kv_bytes_per_token(lm) * 3 * cache.max_len == allocated


def test_each_mode_costs_its_cache_and_more_text_costs_more(tiny64):
    plain = bytes_per_image(tiny64, GenerationSettings())
    twig = bytes_per_image(tiny64, GenerationSettings(mode="twig", think_max_tokens=64))
    seed = bytes_per_image(tiny64, GenerationSettings(mode="seed", guidance_max_tokens=300))
    per_token = kv_bytes_per_token(tiny64.language_model)
    assert plain >= 2 * (128 + 576) * per_token  # two CFG rows over prompt + image tokens
    assert plain < twig and plain < seed
    assert bytes_per_image(tiny64, GenerationSettings(mode="twig", think_max_tokens=128)) > twig
    assert bytes_per_image(tiny64, GenerationSettings(mode="seed", guidance_max_tokens=600)) > seed
    # twig's text call holds a reflection and the next thought per image, each showing the canvas
    assert twig >= 2 * (tiny64.understanding_tokens + 3 * 64) * per_token
    steered = GenerationSettings(controller=ControllerConfig(max_injections_per_band=4, control_tokens=4))
    assert bytes_per_image(tiny64, steered) >= plain + 2 * 16 * per_token  # control-token slots
    assert bytes_per_image(tiny64, GenerationSettings(), prompt_tokens=512) > plain


def test_images_per_call_scales_with_free_memory_and_is_bounded(tiny64):
    settings = GenerationSettings()
    one = bytes_per_image(tiny64, settings)
    once = prefill_slice_bytes(tiny64.language_model)  # one prefill slice's activations, whatever the batch
    assert images_per_call(tiny64, settings, free_bytes=100 * one + once, headroom=1.0) == 100
    assert images_per_call(tiny64, settings, free_bytes=100 * one + once - 1, headroom=1.0) == 99
    assert images_per_call(tiny64, settings, free_bytes=int((100 * one + once) / 0.8) + 1) == 100  # default headroom
    assert images_per_call(tiny64, settings, free_bytes=one // 2) == 1  # never zero: one image may still fit
    assert images_per_call(tiny64, settings, free_bytes=10**15) == MAX_IMAGES_PER_CALL


def test_a_7b_sized_model_fits_about_what_was_measured_on_an_h200():
    """A Janus-Pro-7B-sized bf16 model (30 layers, 4096 wide): 160 plain images with 64-token prompts
    took 110.7 GiB at peak on an H200 (weights 13.8 GB), about 656 MB per image; with ~125 GB free,
    ~190 would fit. The estimate must stay well below that and not waste half the GPU. Twig at 128
    images peaked at 130.7 GiB, its text calls in one round; the estimate must stay below that too."""
    from types import SimpleNamespace

    config = SimpleNamespace(num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32, hidden_size=4096,
                             intermediate_size=11008, head_dim=128)
    embed = SimpleNamespace(weight=torch.zeros(1, dtype=torch.bfloat16))
    bundle = SimpleNamespace(language_model=SimpleNamespace(config=config, embed_tokens=embed), image_tokens=576,
                             understanding_tokens=576)
    fit = images_per_call(bundle, GenerationSettings(), free_bytes=125 * 10**9, prompt_tokens=64)
    assert 110 < fit < 175
    twig = images_per_call(bundle, GenerationSettings(mode="twig", think_max_tokens=64), 125 * 10**9, 64)
    assert 90 < twig < 128


def test_no_free_memory_figure_off_the_gpu():
    assert free_device_bytes(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_free_memory_on_a_gpu_is_positive():
    assert free_device_bytes(torch.device("cuda")) > 0
