"""Which attention calls give the same bits twice? A decode step's masked attention (one query per
row, bf16) run twice on the same inputs, for several batch sizes and widths, per SDPA backend, and
its time; then the engine run twice: plain tokens over 130 steps (small and full batch, bf16 and fp8
KV, with and without `deterministic`), twig images through `generate_images`, and what
`deterministic` costs a full plain batch.

    python determinism_probe.py --out determinism.json
"""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench_common import plain_workload
from twig_batch.engine.repeatable import attention_for
from twig_batch.pipeline import generate_images

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}


def attention_repeats(rows: int, width: int, backend, tries: int = 5) -> bool:
    gen = torch.Generator(device="cuda").manual_seed(rows * 1000 + width)
    q = torch.randn((rows, 32, 1, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn((rows, 32, width, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn((rows, 32, width, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    mask = (torch.arange(width, device="cuda") < width - 7).expand(rows, 1, 1, width)
    call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    with sdpa_kernel(backend) if backend is not None else nullcontext():
        first = call()
        return all(torch.equal(first, call()) for _ in range(tries))


def attention_ms(rows: int, width: int, backend, layers: int = 6) -> float:
    """Milliseconds per layer of the masked decode attention, replayed from a CUDA graph over `layers`
    layers' tensors (more than the L2 cache holds)."""
    from bench_common import graph_time

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn((rows, 32, 1, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    kv = [(torch.randn((rows, 32, width, 128), generator=gen, device="cuda", dtype=torch.bfloat16),
           torch.randn((rows, 32, width, 128), generator=gen, device="cuda", dtype=torch.bfloat16)) for _ in range(layers)]
    mask = (torch.arange(width, device="cuda") < width - 7).expand(rows, 1, 1, width)

    def run():
        with sdpa_kernel(backend):
            return [F.scaled_dot_product_attention(q, k, v, attn_mask=mask) for k, v in kv]
    return graph_time(run) / layers


def prefill_repeats(backend, rows: int = 16, length: int = 700, tries: int = 5) -> bool:
    """A prefill's masked attention (causal, left padding) run twice on the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn((rows, 32, length, 128), generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cols = torch.arange(length, device="cuda")
    mask = ((cols[None, :] <= cols[:, None]) & (cols >= 5)[None, :]) | (cols[None, :] == cols[:, None])
    mask = mask.expand(rows, 1, length, length)
    with sdpa_kernel(backend):
        first = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return all(torch.equal(first, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) for _ in range(tries))


def engine_repeats(bundle, images: int, deterministic: bool = False, kv_cache: str = "model") -> dict:
    """The plain engine's tokens over 130 steps, run twice with the same seeds."""
    from bench_common import prompts_of_length
    from twig_batch.engine.runner import Engine
    from twig_batch.settings import GenerationSettings

    rows = prompts_of_length(bundle, images)
    seeds = list(range(images))
    settings = GenerationSettings(kv_cache=kv_cache)
    engine = Engine(bundle, kv_cache=kv_cache, deterministic=deterministic)  # its calls allow the kernels chosen
    a, b = (engine.draw_image_tokens(rows, seeds, settings, 130) for _ in range(2))
    differs = (a != b).any(dim=0).nonzero()
    return {"images": images, "deterministic": deterministic, "kv_cache": kv_cache,
            "tokens_repeat": bool(torch.equal(a, b)), "first_differing_step": int(differs[0]) if len(differs) else None}


def pipeline_repeats(bundle, mode: str, deterministic: bool, images: int = 8) -> dict:
    """`generate_images` run twice: image tokens, every thought and reflection, and the pixels."""
    import numpy as np

    from bench_common import requests_for, workload_settings

    settings = workload_settings(mode)
    settings.deterministic = deterministic
    a, b = (generate_images(bundle, requests_for(images), settings) for _ in range(2))
    same = lambda f: all(f(x) == f(y) for x, y in zip(a, b))  # noqa: E731
    return {"mode": mode, "images": images, "deterministic": deterministic,
            "tokens_repeat": all(torch.equal(x.codes, y.codes) for x, y in zip(a, b)),
            "text_repeats": same(lambda r: (r.thoughts, r.reflections)),
            "pixels_repeat": all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"attention": []}
    for name, backend in BACKENDS.items():
        for rows in (8, 64, 256):
            for width in (128, 160, 384, 640):
                if name == "math" and rows * width > 64 * 640:
                    continue
                row = {"backend": name, "rows": rows, "width": width}
                try:
                    row["repeats"] = attention_repeats(rows, width, backend)
                except RuntimeError as exc:
                    row["error"] = str(exc)[:200]
                result["attention"].append(row)
                print(json.dumps(row), flush=True)
    for name in ("cudnn", "efficient"):
        backend = BACKENDS[name]
        result[f"prefill_{name}_repeats"] = prefill_repeats(backend)
        for rows, width in ((256, 384), (256, 640), (512, 384), (768, 300)):
            result[f"decode_{name}_ms_per_layer_{rows}x{width}"] = attention_ms(rows, width, backend)
        print(json.dumps({k: v for k, v in result.items() if name in k}), flush=True)
    from twig_batch.model import load_janus

    bundle = load_janus("random-7b", "cuda", torch.bfloat16)  # each engine below joins its projections
    cases = [(4, False, "model"), (128, False, "model"), (128, True, "model"), (128, False, "fp8")]
    result["engine"] = [engine_repeats(bundle, *case) for case in cases]
    print(json.dumps(result["engine"]), flush=True)
    result["pipeline"] = [pipeline_repeats(bundle, "twig", d) for d in (False, True)]
    print(json.dumps(result["pipeline"]), flush=True)
    with attention_for(True):  # what the repeatable kernels cost a full plain batch
        result["plain_deterministic"] = plain_workload(bundle, 128)
    print(json.dumps(result["plain_deterministic"]), flush=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
