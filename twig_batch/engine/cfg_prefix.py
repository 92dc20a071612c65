"""Unconditional rows read their BOS and pads from one row: the shared CFG prefix.

Every unconditional CFG row is BOS, pads, begin-of-image (SPEC §2). Left padding puts every row's
begin-of-image in the same column S, and the keys and values of positions 0 .. n-2 are the same in
every unconditional row. In seed mode that prefix is ~460 of the ~750 columns a row holds while its
image tokens are drawn, since each stage's plan is in the prompt. A decode step can read it once
instead of once per image, with three attentions instead of one:
- conditional rows over all their columns;
- unconditional rows over their own columns from S on;
- every unconditional query at once over the longest unconditional row's prefix.
The last two are merged by their log-sum-exps. On an H200 (`benchmarks/split_attention_probe.py`,
256 rows) that takes a fifth less time per layer when the prefix is 460 of 640-768 columns, and
more than the one call when it is 64 of 384. Prompts shorter than MIN_SHARED_COLUMNS share nothing.

Prefills and control-token injections still write and read every row's own prefix; only decode
steps read the shared one. Off a GPU the same split runs on PyTorch's math, so the token-exact
tests cover it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MIN_SHARED_COLUMNS = 192  # prefix columns from which sharing pays (break-even is ~130 at 256 rows)
WIDTH_MULTIPLE = 32  # the text's width is rounded up to this when sharing: few distinct layouts to capture
_CUDNN = torch.ops.aten._scaled_dot_product_cudnn_attention.default


@dataclass(frozen=True)
class SharedPrefix:
    """Plain ints, so a captured CUDA graph is keyed by them."""
    own_start: int  # S: the begin-of-image column, the first an unconditional row reads of its own
    width: int  # columns read of the donor's prefix, those just before S (at least the longest prefix)


def wanted(cond_rows: list[list[int]], device: torch.device, fp8: bool) -> bool:
    """Share when the prompts are long enough, the cache holds the model's dtype, and on a GPU when
    cuDNN's attention is allowed (`deterministic` allows only kernels that repeat themselves)."""
    if fp8 or max(len(row) for row in cond_rows) - 1 < MIN_SHARED_COLUMNS:
        return False
    return device.type != "cuda" or torch.backends.cuda.cudnn_sdp_enabled()


def plan(cond_rows: list[list[int]], text_width: int) -> SharedPrefix:
    """For a prefill whose text was left-padded to `text_width` columns (a multiple of WIDTH_MULTIPLE)."""
    longest = max(len(row) for row in cond_rows) - 1  # BOS and pads: everything before begin-of-image
    own_start = text_width - 1
    return SharedPrefix(own_start, min(own_start, -(-longest // WIDTH_MULTIPLE) * WIDTH_MULTIPLE))


@dataclass
class SplitInputs:
    """What every layer's split attention reads, built once per step."""
    cond_mask: torch.Tensor  # [B, 1, 1, A] bool
    own_bias: torch.Tensor  # [B, 1, 1, A - S]
    shared_bias: torch.Tensor  # [1, 1, B, width]: query b sees the donor's first n_b - 1 positions
    donor: torch.Tensor  # [1] long: the cache row of the longest prefix
    shared: SharedPrefix


def split_inputs(valid: torch.Tensor, mask: torch.Tensor, shared: SharedPrefix, dtype: torch.dtype) -> SplitInputs:
    """valid [R, A] and mask [R, 1, 1, A]: the cache's valid columns and the step's mask."""
    start, width = shared.own_start, shared.width
    counts = valid[1::2, :start].sum(1)  # each unconditional row's prefix length (n_b - 1)
    longest = counts.max()
    donor = (2 * counts.argmax() + 1).reshape(1)
    position = torch.arange(width, device=valid.device) - width + longest  # donor's position at each column read
    visible = (position >= 0) & (position < counts[:, None])
    return SplitInputs(mask[0::2], _bias(mask[1::2, :, :, start:], dtype), _bias(visible[None, None], dtype), donor,
                       shared)


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def attend_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: SplitInputs) -> torch.Tensor:
    """q [R, H, 1, D]; k, v [R, H, A, D] (one layer's cache, A columns read). Rows 2b are conditional,
    2b + 1 unconditional. The attention of every row over its columns, [R, H, 1, D]."""
    start, width = split.shared.own_start, split.shared.width
    out = torch.empty_like(q)
    out[0::2] = F.scaled_dot_product_attention(q[0::2], k[0::2], v[0::2], attn_mask=split.cond_mask)
    q_uncond = q[1::2].contiguous()
    own, own_lse = _attention_with_lse(q_uncond, k[1::2, :, start:], v[1::2, :, start:], split.own_bias)
    donor_k = k[:, :, start - width:start].index_select(0, split.donor)  # [1, H, width, D]: a small copy
    donor_v = v[:, :, start - width:start].index_select(0, split.donor)
    shared, shared_lse = _attention_with_lse(q_uncond.transpose(0, 2).contiguous(), donor_k, donor_v,
                                             split.shared_bias)  # every unconditional query as one row's
    out[1::2] = merge(own, own_lse, shared.transpose(0, 2), shared_lse.transpose(0, 2))
    return out


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Two attentions of the same queries over disjoint columns (outputs [.., T, D], log-sum-exps
    [.., T]) joined into the attention over all of them."""
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = torch.exp(lse_a - top).unsqueeze(-1), torch.exp(lse_b - top).unsqueeze(-1)
    wide = torch.promote_types(out_a.dtype, torch.float32)
    joined = (out_a.to(wide) * weight_a + out_b.to(wide) * weight_b) / (weight_a + weight_b)
    return joined.to(out_a.dtype)


def _attention_with_lse(q, k, v, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and each query's log-sum-exp [.., T]: cuDNN's on a GPU, PyTorch's math elsewhere."""
    if q.is_cuda:
        out, lse = _CUDNN(q, k, v, bias, True, 0.0, False, False, scale=None)[:2]
        return out, lse.reshape(q.shape[:3]).float()
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)
