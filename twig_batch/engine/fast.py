"""The fast engine: image-token drawing over a static KV cache, held token-exact to the reference.

Same contract as `batched.draw_image_tokens_batch` (CFG row pairs, left padding, per-row seeds and
positions, observer injections), but the cache is preallocated once per call and the decode step
has fixed shapes, so on a GPU it is captured and replayed as CUDA graphs (`graphs.py`).
"""
from __future__ import annotations

import torch

from twig_batch.engine.batched import cfg_prefill_inputs
from twig_batch.engine.fused import fuse_for_device
from twig_batch.engine.graphs import GraphedDecodeStep
from twig_batch.engine.hooks import ImageTokenObserver
from twig_batch.engine.sampling import guided_logits, sample_tokens
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.settings import GenerationSettings

CONTROL_SLACK = 64  # cache columns reserved for control tokens when the observer names no budget


@torch.no_grad()
def draw_image_tokens_fast(
    bundle, cond_rows: list[list[int]], seeds: list[int], settings: GenerationSettings, n_tokens: int,
    prefix_codes: torch.Tensor | None = None, first_step: int = 0, observer: ImageTokenObserver | None = None,
    use_graphs: bool | None = None,
) -> torch.Tensor:
    """Codes [B, n_tokens]; image b matches `reference_image_tokens(bundle, cond_rows[b], seeds[b], ...)`."""
    device = bundle.device
    embeds, valid, positions = cfg_prefill_inputs(bundle, cond_rows, prefix_codes)
    rows = embeds.shape[0]
    lm = bundle.language_model
    slack = getattr(observer, "max_control_slots", CONTROL_SLACK) if observer is not None else 0
    fuse_for_device(lm)
    with StaticKVCache(lm, rows, embeds.shape[1] + n_tokens + slack, fp8=settings.kv_cache == "fp8") as cache:
        hidden = forward_static(lm, cache, embeds, positions, valid)[:, -1]
        next_position = positions[:, -1:] + 1
        if use_graphs is None:
            use_graphs = device.type == "cuda"
        graphed = GraphedDecodeStep(bundle, cache, bundle.embed_image_codes) if use_graphs else None
        all_valid = torch.ones((rows, 1), dtype=torch.bool, device=device)

        def step_forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if graphed is not None:
                return graphed(tokens.repeat_interleave(2), positions)
            return _decode_step(bundle, cache, tokens, positions, all_valid)

        row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        codes = []
        decide = _decider(observer)
        for i in range(n_tokens):
            step = first_step + i
            logits = guided_logits(bundle.image_logits(hidden), settings.cfg_weight)
            tokens = sample_tokens(logits, row_seeds, step, settings.temperature, settings.top_k, settings.top_p)
            codes.append(tokens)
            decision = decide(step, hidden[0::2], logits, tokens)
            if i + 1 == n_tokens:
                injection = decision.resolve() if decision is not None else None
                if injection is not None and bool(injection.rows.any()):
                    _inject(bundle, cache, next_position, injection)
                break
            # The next step goes to the device before the verdict is read, so the device never waits for
            # the host; an injection (rare) takes that step back and redoes it after the control tokens.
            column = cache.used
            hidden = step_forward(tokens, next_position)
            injection = decision.resolve() if decision is not None else None
            if injection is not None and bool(injection.rows.any()):
                cache.used = column
                next_position = _inject(bundle, cache, next_position, injection)
                hidden = step_forward(tokens, next_position)
            next_position = next_position + 1
        return torch.stack(codes, dim=1).cpu()


def _decider(observer):
    """observer -> fn(step, hidden, logits, tokens) giving an object with `resolve()` (or None)."""
    if observer is None:
        return lambda *args: None
    deferred = getattr(observer, "observe_deferred", None)
    if deferred is not None:
        return deferred
    return lambda *args: _Resolved(observer.observe(*args))


class _Resolved:
    def __init__(self, injection):
        self.injection = injection

    def resolve(self):
        return self.injection


def _decode_step(bundle, cache, tokens, positions, valid):
    step_embeds = bundle.embed_image_codes(tokens.repeat_interleave(2)).unsqueeze(1)
    return forward_static(bundle.language_model, cache, step_embeds, positions, valid)[:, -1]


def _inject(bundle, cache, next_position, injection):
    rows = injection.rows.to(next_position.device).repeat_interleave(2)
    k = injection.embeds.shape[1]
    control = injection.embeds.to(bundle.device, bundle.dtype).repeat_interleave(2, dim=0)
    positions = next_position + torch.arange(k, device=next_position.device)
    forward_static(bundle.language_model, cache, control, positions, rows.unsqueeze(1).expand(-1, k))
    return next_position + rows.long().unsqueeze(1) * k
