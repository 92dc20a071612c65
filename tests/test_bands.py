import pytest
import torch

from twig_batch.errors import InputError
from twig_batch.imaging import decode_codes, fill_to_grid
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.pipeline.bands import BandSchedule, band_label, band_part, band_pixels, canvas_pixels
from twig_batch.pipeline.staged import generate_staged
from twig_batch.prompts import DEFAULT_TEMPLATES
from twig_batch.settings import GenerationSettings


@pytest.mark.parametrize("bands", [1, 2, 3, 4, 6, 8])
def test_band_image_after_band_j_has_rows_for_bands_0_to_j(tiny64, bands):
    schedule, grid = BandSchedule(tiny64.grid, bands), tiny64.grid
    codes = torch.randint(0, 512, (1, 576), generator=torch.Generator().manual_seed(bands))
    # The bands tile the grid in order: equal whole token rows, each starting where the rows before
    # it end, the last one ending the image.
    ends = [schedule.rows_after(j) for j in range(bands)]
    assert ends[-1] == grid and len({after - before for before, after in zip([0] + ends, ends)}) == 1
    assert [schedule.start(j) for j in range(bands)] == [rows * grid for rows in [0] + ends[:-1]]
    for j in sorted({0, bands // 2, bands - 1}):  # decoding is the slow part: first, a middle and the last band
        pixels = band_pixels(tiny64, codes, schedule, j)
        assert pixels.shape == (1, schedule.rows_after(j) * tiny64.downsample, tiny64.image_px, 3)


def test_canvas_shows_undrawn_positions_as_code_zero(tiny64):
    codes = torch.randint(1, 512, (1, 192), generator=torch.Generator().manual_seed(0))
    canvas = canvas_pixels(tiny64, codes)
    assert canvas.shape == (1, tiny64.image_px, tiny64.image_px, 3)
    padded = torch.cat([codes, torch.zeros(1, 576 - 192, dtype=torch.long)], dim=1)
    assert torch.equal(canvas, decode_codes(tiny64, padded))
    assert torch.equal(fill_to_grid(codes, 24)[:, 192:], torch.zeros(1, 384, dtype=torch.long))


@pytest.mark.parametrize("bands", [0, 5, 7, 25, -3])
def test_a_band_count_that_does_not_divide_the_rows_is_a_clear_error(tiny64, bands):
    with pytest.raises(InputError, match="bands"):
        BandSchedule(tiny64.grid, bands)
    if bands >= 1:  # settings refuse < 1 themselves
        settings = GenerationSettings(mode="twig", bands=bands)
        with pytest.raises(InputError, match=r"does not divide the image's 24 token rows; use one of \[1, 2, 3"):
            generate_staged(tiny64, [ImageRequest("p", "x", 0, 1)], settings)
        with pytest.raises(InputError, match="does not divide"):
            generate_images(tiny64, [ImageRequest("p", "x", 0, 1)], settings)


def test_band_names_and_labels():
    t = DEFAULT_TEMPLATES
    assert [band_part(t, k, 3) for k in range(3)] == ["top part", "middle part", "bottom part"]
    assert [band_part(t, k, 2) for k in range(2)] == ["top part", "bottom part"]
    assert band_part(t, 0, 1) == "whole image"
    assert band_part(t, 1, 5) == "band 2 of 5"
    assert band_label(1, 3) == "band-2-of-3" and band_label(1, 3, redrawn=True) == "band-2-of-3-redrawn"


def test_plain_mode_in_bands_draws_the_same_image_as_one_pass(tiny64):
    from twig_batch.reference.image_tokens import reference_plain

    settings = GenerationSettings(bands=4)
    [result] = generate_images(tiny64, [ImageRequest("p", "a red cube", 0, 21)], settings)
    assert torch.equal(result.codes, reference_plain(tiny64, "a red cube", 21, settings))
    assert [label for label, _ in result.band_images] == [f"band-{k}-of-4" for k in range(1, 5)]
    assert [im.size for _, im in result.band_images] == [(96, 24), (96, 48), (96, 72), (96, 96)]
    assert result.band_images[-1][1].tobytes() == result.image.tobytes()
    assert result.thoughts == [] and result.reflections == [] and result.timings["image_tokens_s"] > 0


@pytest.mark.parametrize("mode", ["twig", "seed"])
def test_every_text_sees_the_prompt_stripped_of_surrounding_whitespace(tiny64, mode):
    """As DeepSeek's chat template and TwiG's code read their prompts: a prompt padded with spaces and
    newlines is asked about, planned and drawn exactly as the bare one."""
    seen, drawn = [], []

    class Stand:  # thinker, scorer and guide in one: records the prompt each request names
        def think(self, bundle, requests, settings):
            seen.extend(r.prompt for r in requests)
            return [f"thought {r.band}" for r in requests]

        def reflect(self, bundle, requests, settings):
            seen.extend(r.prompt for r in requests)
            return ["Score: 99\nBetter: same"] * len(requests)

        guide = think

    class DrawOnly:  # the stand-ins write every text: the engine only draws
        def draw_image_tokens(self, conditions, seeds, settings, n_tokens, **_):
            drawn.append(conditions)
            return torch.zeros((len(conditions), n_tokens), dtype=torch.long)

    settings = GenerationSettings(mode=mode, bands=2)
    for prompt in ("  a red cube\n", "a red cube"):
        generate_staged(tiny64, [ImageRequest("p", prompt, 0, 1)], settings, thinker=Stand(), scorer=Stand(),
                        guide=Stand(), engine=DrawOnly())
    assert seen and set(seen) == {"a red cube"}
    assert drawn[:len(drawn) // 2] == drawn[len(drawn) // 2:]
