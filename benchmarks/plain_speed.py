"""Speed of plain text-to-image on one GPU, beside the anchors of BENCHMARK.md, in one run.

Usage: python benchmarks/plain_speed.py --out DIR [--images 128] [--size 7b]
Writes DIR/plain_speed.json and DIR/plain_speed.md. Model: Janus-Pro-sized, random weights, bf16.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bf16_checks import graph_vs_eager, greedy_agreement
from twig_batch.engine.fast import draw_image_tokens_fast
from twig_batch.engine.memory import reserve_kv_arena
from twig_batch.imaging import decode_codes
from twig_batch.model import load_janus
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings

WORDS = "a small red cube on a wooden table next to a blue lamp under warm morning light".split()


def prompts_of_length(bundle, n: int, tokens: int = 64) -> list[list[int]]:
    """n distinct conditional rows of exactly `tokens` tokens (BOS + chat turn + begin-of-image)."""
    rows = []
    for i in range(n):
        words, row = [], []
        while True:
            candidate = t2i_prompt_ids(bundle, " ".join(words + [WORDS[(i + len(words)) % len(WORDS)]]))
            if len(candidate) > tokens:
                break
            words.append(WORDS[(i + len(words)) % len(WORDS)])
            row = candidate
        rows.append(row)
    return rows


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def device_anchors() -> dict:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    _, t = timed(lambda: [y.copy_(x) for _ in range(10)])
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    a @ a
    _, m = timed(lambda: [a @ a for _ in range(10)])
    del x, y, a
    return {"copy_tb_s": 2 * 2 * 1024**3 * 10 / t / 1e12, "bf16_matmul_tflop_s": 2 * 8192**3 * 10 / m / 1e12}


def seed_style_anchor(bundle, steps: int = 64) -> dict:
    """One image, CFG pair, eager LM over transformers' dynamic cache, as the design's prototype does."""
    from transformers import DynamicCache

    from twig_batch.engine.cached_forward import cached_forward

    lm = bundle.language_model
    ids = torch.tensor(prompts_of_length(bundle, 1)[0], device="cuda").repeat(2, 1)
    cache = DynamicCache(config=lm.config)
    with torch.no_grad():
        hidden = cached_forward(lm, cache, inputs_embeds=bundle.embed_text(ids)).last_hidden_state
        token = torch.zeros(2, dtype=torch.long, device="cuda")

        def loop():
            for _ in range(steps):
                cached_forward(lm, cache, inputs_embeds=bundle.embed_image_codes(token).unsqueeze(1))
        _, t = timed(loop)
    return {"seed_style_ms_per_step": t / steps * 1e3, "seed_style_s_per_image_576": t / steps * 576}


def native_generate_inputs(bundle, images: int) -> torch.Tensor:
    """`images` prompts cut to one width, each still ending on begin-of-image: no padding to mask."""
    rows = prompts_of_length(bundle, images)
    width = min(len(r) for r in rows)
    return torch.tensor([r[:width - 1] + r[-1:] for r in rows], device=bundle.device)


def native_generate(bundle, ids: torch.Tensor) -> torch.Tensor:
    """transformers' own Janus image `generate` over `ids`, CFG 5, sampled: the codes, [rows, image tokens].

    It builds the unconditional rows from the bundle's generation config (pad and begin-of-image ids);
    the attention mask it needs is ours to pass.
    """
    return bundle.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_mode="image",
                                 do_sample=True, guidance_scale=5.0, max_new_tokens=bundle.image_tokens)


def native_generate_anchor(bundle, images: int = 128) -> dict:
    try:
        ids = native_generate_inputs(bundle, images)
        _, t = timed(lambda: native_generate(bundle, ids))
        return {"native_images": images, "native_s": t, "native_img_s": images / t}
    except Exception as exc:  # recorded, not fatal: a broken release must not cost the rest of the suite
        return {"native_error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def plain_workload(bundle, images: int, use_graphs: bool = True, kv_cache: str = "model") -> dict:
    """The batch drawn twice: first cold (graph captures), then as a worker's every later batch is."""
    settings = GenerationSettings(kv_cache=kv_cache)
    rows = prompts_of_length(bundle, images)
    seeds = list(range(images))
    draw_image_tokens_fast(bundle, rows[:2], seeds[:2], settings, 8)  # compiled kernels, outside both timings
    reserve_kv_arena(bundle, settings, images, prompt_tokens=64)  # as a worker does before its first batch
    runs = []
    for _ in range(2):
        torch.cuda.reset_peak_memory_stats()
        codes, t_tokens = timed(lambda: draw_image_tokens_fast(bundle, rows, seeds, settings, bundle.image_tokens,
                                                               use_graphs=use_graphs))
        _, t_decode = timed(lambda: decode_codes(bundle, codes))  # it decodes DECODE_CHUNK images a pass
        runs.append((t_tokens, t_decode))
    (cold_tokens, cold_decode), (t_tokens, t_decode) = runs
    total = t_tokens + t_decode
    return {"images": images, "cuda_graphs": use_graphs, "kv_cache": kv_cache, "tokens_s": t_tokens, "decode_s": t_decode, "img_s": images / total,
            "ms_per_step": t_tokens / bundle.image_tokens * 1e3, "cold_img_s": images / (cold_tokens + cold_decode),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, nargs="+", default=[128, 160])
    parser.add_argument("--size", default="7b")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    result |= device_anchors()
    start = time.perf_counter()
    bundle = load_janus(f"random-{args.size}", "cuda", torch.bfloat16)
    result["model_build_s"] = time.perf_counter() - start
    import transformers
    result["transformers"] = transformers.__version__
    result |= seed_style_anchor(bundle)
    checks_rows = prompts_of_length(bundle, 4)
    result |= greedy_agreement(bundle, checks_rows) | graph_vs_eager(bundle, checks_rows)
    result["plain"] = [plain_workload(bundle, n) for n in args.images]
    result["plain"].append(plain_workload(bundle, args.images[0], use_graphs=False))
    result |= native_generate_anchor(bundle, 16)
    (args.out / "plain_speed.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
