"""Classifier-free guidance and sampling over logits, batch-invariant by construction.

Gumbel-max sampling runs through the `kernels` of the caller's `fused.FastModel` (the engine's:
one Triton kernel on a GPU); without, as written.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fused import AS_WRITTEN
from twig_batch.engine.noise import noise_from_keys, row_keys
from twig_batch.seeds import STREAM_IMAGE


def guided_logits(logits_pairs: torch.Tensor, cfg_weight: float) -> torch.Tensor:
    """Rows come as (conditional, unconditional) pairs: [2B, V] -> [B, V] = u + w (c - u)."""
    cond, uncond = logits_pairs[0::2], logits_pairs[1::2]
    return uncond + cfg_weight * (cond - uncond)


def draw_image_step(bundle, hidden: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor, settings,
                    kernels=AS_WRITTEN):
    """One image token per image from the last hidden states of its CFG row pairs [2B, D]: the
    guided logits [B, V] and the sampled tokens [B] (noise keyed by each image's seed and `step`)."""
    logits = guided_logits(bundle.image_logits(hidden), settings.cfg_weight)
    return logits, sample_tokens(logits, seeds, step, settings.temperature, settings.top_k, settings.top_p,
                                 kernels=kernels)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p  # the most likely token always survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    stream: int = STREAM_IMAGE,
    kernels=AS_WRITTEN,
) -> torch.Tensor:
    """Gumbel-max sampling from softmax(logits / T) with per-row noise; T == 0 means greedy."""
    logits = logits.to(torch.float64)
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    logits = filter_top_k_top_p(logits / temperature, top_k, top_p)
    keys = row_keys(seeds.to(logits.device), step, stream)
    return kernels.get("gumbel_argmax", _gumbel_argmax, logits.device)(logits, keys)


def _gumbel_argmax(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    gumbel = -torch.log(-torch.log(noise_from_keys(keys, logits.shape[-1])))
    return torch.argmax(logits + gumbel, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row. Run as written on a GPU too: a few kernels at the
    controller's evaluated steps, where compiling them would start PyTorch's compiler in every worker."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return -(logp.exp() * logp).sum(-1)
