"""Does a shared CFG prefix pay when every part of the attention stays on cuDNN?

Every unconditional row opens with BOS and pads at positions 0, 1, 2, ..., so their keys and values
are the same in every such row. Instead of one masked attention over each row's full width, a step
could run three: conditional rows over their own columns, unconditional rows over their own columns
after the prefix, and all unconditional queries at once over one row's prefix; the last two merged by
their log-sum-exps. This times both, per layer, inside CUDA graphs, over several layers' tensors (so
the L2 cache cannot hold them), for interleaved CFG rows (cond 2b, uncond 2b + 1) and for a layout
with all conditional rows first, and checks the merged result against the single call.

    python split_attention_probe.py --out probe.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench_common import graph_time

HEADS, HEAD_DIM = 32, 128
CUDNN = torch.ops.aten._scaled_dot_product_cudnn_attention.default


def attend_with_lse(q, k, v, bias):
    """cuDNN attention that also returns each query's log-sum-exp, [R, H, T] float32."""
    out, lse = CUDNN(q, k, v, bias, True, 0.0, False, False, scale=None)[:2]
    return out, lse.reshape(q.shape[:3])


def merge(out_a, lse_a, out_b, lse_b):
    """Two attentions of the same queries over disjoint columns, joined into one."""
    top = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - top).unsqueeze(-1), torch.exp(lse_b - top).unsqueeze(-1)
    return ((out_a.float() * wa + out_b.float() * wb) / (wa + wb)).to(out_a.dtype)


def bias_of(mask):
    return torch.zeros(mask.shape, dtype=torch.bfloat16, device=mask.device).masked_fill_(~mask, float("-inf"))


def one_call(q, k, v, mask, width):
    return F.scaled_dot_product_attention(q, k[:, :, :width], v[:, :, :width], attn_mask=mask)


def split_calls(q, k, v, biases, width, prefix, cond, uncond):
    """cond/uncond: row selectors (slices). The shared prefix is read from the first uncond row."""
    own_bias, rest_bias, shared_bias = biases
    q_cond, q_uncond = q[cond], q[uncond]
    out_cond = attend_with_lse(q_cond, k[cond, :, :width], v[cond, :, :width], own_bias)[0]
    out_rest, lse_rest = attend_with_lse(q_uncond, k[uncond, :, prefix:width], v[uncond, :, prefix:width], rest_bias)
    donor = uncond.start
    shared_q = q_uncond.transpose(0, 2).contiguous()  # [1, H, rows, D]: every unconditional query against one prefix
    out_shared, lse_shared = attend_with_lse(shared_q, k[donor:donor + 1, :, :prefix], v[donor:donor + 1, :, :prefix],
                                             shared_bias)
    out_uncond = merge(out_rest, lse_rest, out_shared.transpose(0, 2), lse_shared.transpose(0, 2))
    return out_cond, out_uncond


def probe(rows: int, width: int, prefix: int, layers: int, max_len: int) -> dict:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (rows, HEADS, max_len, HEAD_DIM)
    ks = [torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(layers)]
    vs = [torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(layers)]
    q = torch.randn((rows, HEADS, 1, HEAD_DIM), generator=gen, device=device, dtype=torch.bfloat16)
    half = rows // 2
    mask = torch.ones((rows, 1, 1, width), dtype=torch.bool, device=device)
    biases = (bias_of(torch.ones((half, 1, 1, width), dtype=torch.bool, device=device)),
              bias_of(torch.ones((half, 1, 1, width - prefix), dtype=torch.bool, device=device)),
              bias_of(torch.ones((1, 1, half, prefix), dtype=torch.bool, device=device)))
    result = {"rows": rows, "width": width, "prefix": prefix, "layers_timed": layers}
    result["one_call_ms_per_layer"] = graph_time(lambda: [one_call(q, k, v, mask, width) for k, v in zip(ks, vs)]) / layers
    layouts = {"interleaved": (slice(0, rows, 2), slice(1, rows, 2)), "blocks": (slice(0, half), slice(half, rows))}
    for name, (cond, uncond) in layouts.items():
        for k, v in zip(ks, vs):  # this layout's unconditional rows hold the same prefix
            k[uncond, :, :prefix] = k[uncond.start:uncond.start + 1, :, :prefix]
            v[uncond, :, :prefix] = v[uncond.start:uncond.start + 1, :, :prefix]
        run = lambda: [split_calls(q, k, v, biases, width, prefix, cond, uncond) for k, v in zip(ks, vs)]  # noqa: E731
        result[f"split_{name}_ms_per_layer"] = graph_time(run) / layers
        reference = one_call(q, ks[0], vs[0], mask, width)
        out_cond, out_uncond = split_calls(q, ks[0], vs[0], biases, width, prefix, cond, uncond)
        result[f"split_{name}_max_abs_diff"] = max((out_cond - reference[cond]).abs().max().item(),
                                                   (out_uncond - reference[uncond]).abs().max().item())
    result["kv_read_floor_ms_per_layer"] = rows * width * 2 * HEADS * HEAD_DIM * 2 / 4.25e12 * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cases = [(256, 384, 64), (256, 768, 460), (256, 640, 460)]  # plain-like, seed-like (early and late)
    results = [probe(rows, width, prefix, layers=6, max_len=1024) for rows, width, prefix in cases]
    for row in results:
        print(json.dumps(row))
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
