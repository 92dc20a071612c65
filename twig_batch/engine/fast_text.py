"""Text generation (thoughts, reflections, stage plans) over the static KV cache.

Same contract as `pipeline.text_generation.generate_text_batch` and token-exact to its one-row
reference, but with fixed shapes: rows that finished keep a slot (their further tokens are thrown
away) so that on a GPU every step replays one captured CUDA graph. Tokens stay on the device; every
few steps the host asks how many rows are done: all of them ends the call, half of them (with
enough steps left) drops the finished rows from the cache, so ragged texts cost what they use.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fused import fuse_for_device
from twig_batch.engine.graphs import GraphedDecodeStep
from twig_batch.engine.sampling import sample_tokens
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.seeds import STREAM_TEXT

# Steps between checks whether every row has finished: each check waits for the device.
CHECK_EVERY = 16
COMPACT_MIN_STEPS = 32  # steps that must remain for dropping finished rows to pay


@torch.no_grad()
def generate_text_fast(bundle, prompts, max_new_tokens: int, temperature: float = 0.0, stop_id: int | None = None,
                       use_graphs: bool | None = None) -> list[list[int]]:
    """New token ids per prompt (`TextPrompt`s); the stop token is not included."""
    from twig_batch.pipeline.text_generation import text_prefill_inputs

    if not prompts:
        return []
    stop = bundle.tokens.eos if stop_id is None else stop_id
    device, lm = bundle.device, bundle.language_model
    embeds, mask, positions = text_prefill_inputs(bundle, prompts)
    fuse_for_device(lm)
    cache = StaticKVCache(lm, len(prompts), embeds.shape[1] + max_new_tokens)
    hidden = forward_static(lm, cache, embeds, positions, mask.bool())[:, -1]
    if use_graphs is None:
        use_graphs = device.type == "cuda"
    next_position = positions[:, -1:] + 1
    seeds = torch.tensor([p.seed for p in prompts], dtype=torch.int64, device=device)
    batch = _Rows(torch.arange(len(prompts), device=device), seeds, next_position)
    graphed = GraphedDecodeStep(bundle, cache, bundle.embed_text) if use_graphs else None
    written: list[list[int]] = [[] for _ in prompts]
    drawn, done = [], torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tokens = sample_tokens(bundle.text_logits(hidden), batch.seeds, step, temperature, stream=STREAM_TEXT)
        drawn.append(tokens)
        done |= tokens == stop
        last = step + 1 == max_new_tokens
        if last or step % CHECK_EVERY == CHECK_EVERY - 1:
            finished = int(done.sum())  # the only wait for the device, every CHECK_EVERY steps
            if last or finished == len(done):
                break
            if _worth_compacting(len(done), finished, max_new_tokens - step - 1):
                batch.record(written, drawn)
                drawn, keep = [], (~done).nonzero().flatten()
                cache.keep_rows(keep)
                batch, tokens, done = batch.select(keep), tokens[keep], done[keep]
                graphed = GraphedDecodeStep(bundle, cache, bundle.embed_text) if use_graphs else None
        if graphed is not None:
            hidden = graphed(tokens, batch.positions)
        else:
            step_embeds = bundle.embed_text(tokens).unsqueeze(1)
            valid = torch.ones((len(done), 1), dtype=torch.bool, device=device)
            hidden = forward_static(lm, cache, step_embeds, batch.positions, valid)[:, -1]
        batch.positions = batch.positions + 1
    batch.record(written, drawn)
    return [_until_stop(row, stop) for row in written]


class _Rows:
    """Which prompt each cache row is, with its noise seed and next position."""

    def __init__(self, index: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor):
        self.index, self.seeds, self.positions = index, seeds, positions

    def select(self, keep: torch.Tensor) -> "_Rows":
        return _Rows(self.index[keep], self.seeds[keep], self.positions[keep])

    def record(self, written: list[list[int]], drawn: list[torch.Tensor]) -> None:
        if not drawn:
            return
        for prompt, tokens in zip(self.index.tolist(), torch.stack(drawn, dim=1).tolist()):
            written[prompt].extend(tokens)


def _worth_compacting(rows: int, finished: int, steps_left: int) -> bool:
    """Rows that finished keep computing until dropped; dropping costs a copy of the live rows'
    cache (and, on a GPU, fresh graph captures), so do it when at least half the rows are idle and
    enough steps remain to earn it back."""
    return finished * 2 >= rows and steps_left >= COMPACT_MIN_STEPS


def _until_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop)] if stop in tokens else tokens
