import torch

from twig_batch.reference.batched import generate_plain_batch
from twig_batch.reference.image_tokens import cfg_pair, reference_plain
from twig_batch.imaging import decode_codes, to_pil
from twig_batch.settings import GenerationSettings

PROMPTS = ["a red cube", "a small cat on a large table next to a lamp", "tree", "night sky with a moon",
           "a house", "blue ocean wave", "portrait of an old dog", "snow"]


def test_unconditional_row_masks_everything_but_bos_and_begin_of_image(tiny64):
    pair = cfg_pair(tiny64, "a red cube on a table")
    cond, uncond = pair.tolist()
    t = tiny64.tokens
    assert len(cond) == len(uncond) and cond[0] == t.bos and cond[-1] == t.boi
    assert uncond[0] == t.bos and uncond[-1] == t.boi
    assert all(tok == t.pad for tok in uncond[1:-1])
    assert any(tok != t.pad for tok in cond[1:-1])


def test_same_seed_same_image_other_seed_other_image(tiny64):
    settings = GenerationSettings()
    a = reference_plain(tiny64, "a red cube", 7, settings)
    b = reference_plain(tiny64, "a red cube", 7, settings)
    c = reference_plain(tiny64, "a red cube", 8, settings)
    assert a.shape == (576,)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5
    assert not torch.equal(decode_codes(tiny64, a[None]), decode_codes(tiny64, c[None]))


def test_batched_matches_reference_and_batch_composition_does_not_matter(tiny64):
    settings = GenerationSettings(top_k=200, top_p=0.95)
    seeds = [1000 + i for i in range(len(PROMPTS))]
    batch = generate_plain_batch(tiny64, PROMPTS, seeds, settings)
    alone = reference_plain(tiny64, PROMPTS[1], seeds[1], settings)
    assert torch.equal(batch[1], alone)
    single = generate_plain_batch(tiny64, [PROMPTS[1]], [seeds[1]], settings)
    assert torch.equal(single[0], alone)


def test_cfg_weight_and_temperature_change_the_image(tiny64):
    base = reference_plain(tiny64, "a red cube", 3, GenerationSettings())
    assert not torch.equal(base, reference_plain(tiny64, "a red cube", 3, GenerationSettings(cfg_weight=1.0)))
    greedy = GenerationSettings(temperature=0)
    assert torch.equal(reference_plain(tiny64, "a red cube", 3, greedy), reference_plain(tiny64, "a red cube", 4, greedy))


def test_image_size_tiny_and_real_geometry(tiny64, tmp_path):
    from twig_batch.model import load_janus
    from twig_batch.model.tiny import make_tiny_model

    codes = torch.zeros(2, 576, dtype=torch.long)
    images = to_pil(decode_codes(tiny64, codes))
    assert [im.size for im in images] == [(96, 96)] * 2
    real = load_janus(str(make_tiny_model(tmp_path / "real", vq_downsample=16)))
    assert real.image_px == 384
    assert to_pil(decode_codes(real, codes[:1]))[0].size == (384, 384)


def test_band_with_prefix_matches_reference(tiny64):
    from twig_batch.reference.batched import draw_image_tokens_batch
    from twig_batch.reference.image_tokens import reference_image_tokens
    from twig_batch.prompts import t2i_prompt_ids

    settings = GenerationSettings()
    rows = [t2i_prompt_ids(tiny64, p) for p in PROMPTS[:3]]
    prefix = torch.randint(0, 512, (3, 192), generator=torch.Generator().manual_seed(0))
    batch = draw_image_tokens_batch(tiny64, rows, [5, 6, 7], settings, 192, prefix_codes=prefix, first_step=192)
    for b in range(3):
        ref = reference_image_tokens(tiny64, rows[b], [5, 6, 7][b], settings, 192, prefix_codes=prefix[b],
                                     first_step=192)
        assert torch.equal(batch[b], ref)
