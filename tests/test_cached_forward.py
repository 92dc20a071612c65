import warnings

import torch

from twig_batch.reference.forward import cache_argument
from twig_batch.reference.image_tokens import reference_image_tokens
from twig_batch.engine.inputs import TextPrompt
from twig_batch.reference.texts import reference_text
from twig_batch.prompts import chat_ids, t2i_prompt_ids
from twig_batch.settings import GenerationSettings


def test_the_cache_goes_under_the_name_the_installed_decoder_declares(tiny64):
    class Older(torch.nn.Module):  # a release before the rename
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None):
            return past_key_values

    class Newer(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None, use_cache=None):
            return cache

    assert (cache_argument(Older), cache_argument(Newer)) == ("past_key_values", "cache")
    assert cache_argument(type(tiny64.language_model)) in ("past_key_values", "cache")


def test_the_reference_paths_use_no_argument_marked_for_removal(tiny64):
    """Images and texts drawn over transformers' own cache, with its deprecation warnings as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        codes = reference_image_tokens(tiny64, t2i_prompt_ids(tiny64, "a red cube"), 1, GenerationSettings(), 3)
        text = reference_text(tiny64, TextPrompt(chat_ids(tiny64, "what is here?")), 3)
    assert codes.shape == (3,) and len(text) == 3
