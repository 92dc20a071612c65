"""Image-token codes -> pixels, for whole images and for the partial images between bands."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image


# Images per decoder pass. At 384 px the decoder's widest activations take ~150 MB an image, so a
# whole batch at once (128 images: ~20 GB) would not fit beside a worker's KV cache.
DECODE_CHUNK = 16


@torch.no_grad()
def decode_codes(bundle, codes: torch.Tensor, token_rows: int | None = None) -> torch.Tensor:
    """Decode codes [B, token_rows * grid] (raster order) to uint8 pixels [B, rows*ds, grid*ds, 3], left
    on the decoder's device (`to_pil` reads them; reading here would wait for everything queued).

    `token_rows` smaller than the grid decodes just the rows generated so far (a band image).
    Images are decoded DECODE_CHUNK at a time (the decoder treats each image on its own).
    """
    rows = bundle.grid if token_rows is None else token_rows
    if codes.shape[1] != rows * bundle.grid:
        raise ValueError(f"expected {rows * bundle.grid} codes for {rows} token rows, got {codes.shape[1]}")
    return torch.cat([_decode(bundle, codes[i:i + DECODE_CHUNK], rows) for i in range(0, codes.shape[0], DECODE_CHUNK)])


def _decode(bundle, codes: torch.Tensor, rows: int) -> torch.Tensor:
    vq = bundle.model.model.vqmodel
    latent = F.normalize(vq.quantize.embedding(codes.to(bundle.device)), p=2, dim=-1)
    latent = latent.view(codes.shape[0], rows, bundle.grid, -1).permute(0, 3, 1, 2).contiguous()
    pixels = vq.decoder(vq.post_quant_conv(latent)).float()
    pixels = ((pixels.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)  # truncation, as Janus-Pro's recipe
    return pixels.permute(0, 2, 3, 1)


def fill_to_grid(codes: torch.Tensor, grid: int) -> torch.Tensor:
    """Pad a partial raster [B, n] with code 0 up to the full grid (positions not generated yet)."""
    full = torch.zeros(codes.shape[0], grid * grid, dtype=codes.dtype, device=codes.device)
    full[:, : codes.shape[1]] = codes
    return full


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """uint8 pixels [B, H, W, 3] (on any device: read in one copy) as PIL images."""
    return [Image.fromarray(p.numpy(), mode="RGB") for p in pixels.cpu()]
