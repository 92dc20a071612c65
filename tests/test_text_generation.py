from types import SimpleNamespace

import numpy as np
import pytest
import torch

from twig_batch.imaging import decode_codes
from twig_batch.engine.inputs import TextPrompt
from twig_batch.reference.texts import generate_text_batch, reference_text
from twig_batch.pipeline.understanding import image_features, understanding_prompts, vision_input
from twig_batch.prompts import DEFAULT_TEMPLATES, chat_ids

QUESTIONS = ["describe the top part", "a small cat on a large table next to a lamp, what is in the sky?",
             "tree", "what would a painter draw in the bottom part of a night sky with a moon?"]


def _prompts(bundle, seeds=(0, 0, 0, 0)):
    return [TextPrompt(chat_ids(bundle, q), None, s) for q, s in zip(QUESTIONS, seeds)]


def test_rows_leave_at_their_stop_token_and_each_writes_what_it_would_alone(tiny64):
    prompts = _prompts(tiny64)
    # Random weights never write EOS, so stop at a token the first prompt writes third.
    stop = reference_text(tiny64, prompts[0], 8)[2]
    alone = [reference_text(tiny64, p, 8, stop_id=stop) for p in prompts]
    assert len(alone[0]) == 2 and stop not in alone[0]
    assert max(len(a) for a in alone) > 2  # at least one row outlives the first to leave
    assert generate_text_batch(tiny64, prompts, 8, stop_id=stop) == alone
    assert generate_text_batch(tiny64, prompts[1:], 8, stop_id=stop) == alone[1:]


def test_sampled_text_depends_on_the_row_seed_only(tiny64):
    prompts = _prompts(tiny64, seeds=(11, 12, 13, 11))
    batch = generate_text_batch(tiny64, prompts, 6, temperature=1.0)
    assert batch == [reference_text(tiny64, p, 6, temperature=1.0) for p in prompts]
    assert batch[0] != generate_text_batch(tiny64, [TextPrompt(prompts[0].ids, None, 99)], 6, temperature=1.0)[0]
    greedy = generate_text_batch(tiny64, prompts, 6)
    assert greedy[0] == reference_text(tiny64, TextPrompt(prompts[0].ids, None, 99), 6)


def test_the_picture_reaches_the_model_through_the_understanding_path(tiny64):
    codes = torch.randint(0, 512, (2, 576), generator=torch.Generator().manual_seed(3))
    pixels = decode_codes(tiny64, codes)
    values = vision_input(tiny64, pixels)
    assert values.shape == (2, 3, tiny64.vision_px, tiny64.vision_px) and -1.0 <= values.min() < values.max() <= 1.0
    features = image_features(tiny64, pixels)
    assert features.shape == (2, tiny64.understanding_tokens, tiny64.model.config.text_config.hidden_size)
    assert torch.allclose(image_features(tiny64, pixels[1:]), features[1:])
    small = image_features(tiny64, pixels[:, ::2, ::2].contiguous())  # other sizes are resized to the vision input
    assert small.shape == features.shape
    text_only, shown = understanding_prompts(tiny64, ["what is here?"] * 2, [None, pixels[0]], DEFAULT_TEMPLATES)
    assert text_only.image_features is None and tiny64.tokens.image not in text_only.ids
    assert shown.ids.count(tiny64.tokens.image) == tiny64.understanding_tokens
    assert torch.allclose(shown.image_features, features[0])
    # Different pictures, different next-token distributions for the same question.
    other = understanding_prompts(tiny64, ["what is here?"], [pixels[1]], DEFAULT_TEMPLATES)[0]
    lm = tiny64.language_model

    def next_logits(prompt):
        from twig_batch.engine.inputs import embed_prompts

        ids = torch.tensor([prompt.ids])
        return tiny64.text_logits(lm(inputs_embeds=embed_prompts(tiny64, ids, [prompt])).last_hidden_state[:, -1])

    with torch.no_grad():
        assert not torch.allclose(next_logits(shown), next_logits(other))


@pytest.mark.parametrize("mean, std", [((0.5,) * 3, (0.5,) * 3), ((0.48145466, 0.4578275, 0.40821073),
                                                                  (0.26862954, 0.26130258, 0.27577711))])
def test_pixels_are_prepared_as_deepseeks_image_processor_prepares_them(mean, std):
    """Rescaled and normalised in float32 by transformers' own functions (the ones DeepSeek's image
    processor calls), then cast to bf16 once: every grey level and some colours, bit for bit."""
    from PIL import Image
    from transformers.image_transforms import normalize, rescale

    bundle = SimpleNamespace(vision_px=16, device=torch.device("cpu"), dtype=torch.bfloat16, image_mean=mean,
                             image_std=std)
    grey = torch.arange(256, dtype=torch.uint8).view(16, 16, 1).expand(16, 16, 3)
    colours = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    large = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))

    def deepseek(image):
        if image.shape[0] != 16:  # other sizes: PIL's bicubic resize of the 8-bit picture
            image = torch.from_numpy(np.array(Image.fromarray(image.numpy()).resize((16, 16), Image.BICUBIC)))
        x = rescale(image.numpy(), 1 / 255, data_format="channels_first", input_data_format="channels_last")
        x = normalize(x, mean, std, input_data_format="channels_first")
        return torch.from_numpy(x).to(torch.bfloat16)

    got = vision_input(bundle, torch.stack([grey, colours]))
    assert torch.equal(got, torch.stack([deepseek(grey), deepseek(colours)]))
    assert torch.equal(vision_input(bundle, large[None])[0], deepseek(large))
