"""Text generation (thoughts, reflections, stage plans) over the static KV cache.

Same contract as `pipeline.text_generation.generate_text_batch` and token-exact to its one-row
reference, but with fixed shapes: rows that finished keep a slot (their further tokens are thrown
away) so that on a GPU every step replays one captured CUDA graph. Tokens stay on the device until
the end; whether all rows are done is asked only every few steps, so the host never stalls the GPU.
"""
from __future__ import annotations

import torch

from twig_batch.engine.batched import pad_left
from twig_batch.engine.fused import fuse_for_device
from twig_batch.engine.graphs import GraphedDecodeStep
from twig_batch.engine.sampling import sample_tokens
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.seeds import STREAM_TEXT

# Steps between checks whether every row has finished: each check waits for the device.
CHECK_EVERY = 16


@torch.no_grad()
def generate_text_fast(bundle, prompts, max_new_tokens: int, temperature: float = 0.0, stop_id: int | None = None,
                       use_graphs: bool | None = None) -> list[list[int]]:
    """New token ids per prompt (`TextPrompt`s); the stop token is not included."""
    from twig_batch.pipeline.text_generation import embed_prompts

    if not prompts:
        return []
    stop = bundle.tokens.eos if stop_id is None else stop_id
    device, lm = bundle.device, bundle.language_model
    ids, mask = pad_left([p.ids for p in prompts], bundle.tokens.pad)
    ids, valid = ids.to(device), mask.to(device).bool()
    positions = (mask.to(device).cumsum(-1) - 1).clamp(min=0)
    fuse_for_device(lm)
    cache = StaticKVCache(lm, len(prompts), ids.shape[1] + max_new_tokens)
    hidden = forward_static(lm, cache, embed_prompts(bundle, ids, prompts), positions, valid)[:, -1]
    if use_graphs is None:
        use_graphs = device.type == "cuda"
    graphed = GraphedDecodeStep(bundle, cache, bundle.embed_text) if use_graphs else None
    next_position = positions[:, -1:] + 1
    seeds = torch.tensor([p.seed for p in prompts], dtype=torch.int64, device=device)
    all_valid = torch.ones((len(prompts), 1), dtype=torch.bool, device=device)
    drawn, done = [], torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = sample_tokens(bundle.text_logits(hidden), seeds, step, temperature, stream=STREAM_TEXT)
        drawn.append(tokens)
        done |= tokens == stop
        if step + 1 == max_new_tokens or (step % CHECK_EVERY == CHECK_EVERY - 1 and bool(done.all())):
            break
        if graphed is not None:
            hidden = graphed(tokens.to(device), next_position)
        else:
            step_embeds = bundle.embed_text(tokens.to(device)).unsqueeze(1)
            hidden = forward_static(lm, cache, step_embeds, next_position, all_valid)[:, -1]
        next_position = next_position + 1
    return [_until_stop(row, stop) for row in torch.stack(drawn, dim=1).tolist()]


def _until_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop)] if stop in tokens else tokens
