"""Prompts that open with the same picture prefill it once, and still write what they would alone."""
import pytest
import torch

from twig_batch.engine import fast_text
from twig_batch.engine.fast_text import generate_text_fast
from twig_batch.engine.shared_prefix import sharing_plan
from twig_batch.engine.inputs import TextPrompt
from twig_batch.reference.texts import reference_text
from twig_batch.prompts import chat_ids

QUESTIONS = ["What is in the top part?", "Score the middle band from 0 to 100 and describe it better.",
             "Describe the bottom of the picture in one literal sentence, please."]


def pictures(bundle, n: int) -> list[torch.Tensor]:
    shape = (bundle.understanding_tokens, bundle.model.config.text_config.hidden_size)
    return [torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=bundle.dtype) for i in range(n)]


def asking(bundle, question: str, picture, seed: int = 0) -> TextPrompt:
    ids = chat_ids(bundle, question, "You look at pictures.", image_tokens=bundle.understanding_tokens)
    return TextPrompt(ids, picture, seed)


@pytest.mark.parametrize("temperature", [0.0, 0.05])
def test_shared_pictures_are_prefilled_once_and_every_prompt_matches_the_reference(tiny64, monkeypatch, temperature):
    a, b, c = pictures(tiny64, 3)
    # Interleaved, ragged questions; picture c appears once (a group of one).
    prompts = [asking(tiny64, QUESTIONS[0], a, 1), asking(tiny64, QUESTIONS[1], b, 2), asking(tiny64, QUESTIONS[2], a, 3),
               asking(tiny64, QUESTIONS[0], c, 4), asking(tiny64, QUESTIONS[2], b, 5), asking(tiny64, QUESTIONS[1], a, 6)]
    plans = []
    spied = fast_text.prefill_shared

    def spy(bundle, plan, *args):
        plans.append(plan)
        return spied(bundle, plan, *args)

    monkeypatch.setattr(fast_text, "prefill_shared", spy)
    written = generate_text_fast(tiny64, prompts, 10, temperature=temperature)
    assert [p.distinct for p in plans] == [3] and sorted(plans[0].order) == list(range(6))
    for prompt, tokens in zip(prompts, written):
        assert tokens == reference_text(tiny64, prompt, 10, temperature=temperature)


def test_nothing_is_shared_without_a_common_picture(tiny64):
    a, b = pictures(tiny64, 2)
    assert sharing_plan(tiny64, [asking(tiny64, QUESTIONS[0], a), asking(tiny64, QUESTIONS[0], b)]) is None
    # Equal values in another tensor are not "the same picture": only the same features are trusted.
    assert sharing_plan(tiny64, [asking(tiny64, QUESTIONS[0], a), asking(tiny64, QUESTIONS[1], a.clone())]) is None
    text_only = TextPrompt(chat_ids(tiny64, QUESTIONS[0], "You look at pictures."))
    assert sharing_plan(tiny64, [asking(tiny64, QUESTIONS[0], a), asking(tiny64, QUESTIONS[1], a), text_only]) is None
    other_system = TextPrompt(chat_ids(tiny64, QUESTIONS[1], "You look at pictures carefully.",
                                       image_tokens=tiny64.understanding_tokens), a)
    assert sharing_plan(tiny64, [asking(tiny64, QUESTIONS[0], a), other_system]) is None
    plan = sharing_plan(tiny64, [asking(tiny64, QUESTIONS[0], a), asking(tiny64, QUESTIONS[1], b),
                                 asking(tiny64, QUESTIONS[2], a)])
    assert (plan.order, plan.distinct, plan.source) == ([0, 1, 2], 2, [0])
