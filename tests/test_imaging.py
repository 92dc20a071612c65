"""Decoding codes to pixels in slices of images gives the pixels of one pass."""
import torch

from twig_batch import imaging


def test_decoding_in_slices_of_images_changes_no_pixel(tiny64, monkeypatch):
    codes = torch.randint(0, 512, (5, tiny64.grid * tiny64.grid), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(imaging, "DECODE_CHUNK", 64)
    whole = imaging.decode_codes(tiny64, codes)
    monkeypatch.setattr(imaging, "DECODE_CHUNK", 2)  # slices of 2, 2 and 1
    assert torch.equal(imaging.decode_codes(tiny64, codes), whole)
    band = imaging.decode_codes(tiny64, codes[:, : 2 * tiny64.grid], token_rows=2)
    assert band.shape[:2] == (5, whole.shape[1] * 2 // tiny64.grid)
