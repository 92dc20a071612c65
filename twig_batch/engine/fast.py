"""The fast engine: image-token drawing over a static KV cache, held token-exact to the reference.

Same contract as `reference.batched.draw_image_tokens_batch` (CFG row pairs, left padding, per-row seeds and
positions, observer injections), but the cache is preallocated once per call and the decode step
has fixed shapes, so on a GPU it is captured and replayed as CUDA graphs (`graphs.py`).

Cache columns of a call: the prefill, then each image's control-token slots (the observer's
`max_control_slots`), then one column per decode step. An injection writes an image's control
tokens into its own next free slots (both CFG rows), so however many images fire, and at however
many different steps, the cache never needs more than those slots: its size is fixed by construction.

An injection is a pass over the injected images' rows only: a trigger that fires for a few images at
a time (the usual case: each image drifts on its own) costs those images' tokens, not a pass of the
whole batch.
"""
from __future__ import annotations

import torch

from twig_batch.engine.fused import FastModel
from twig_batch.engine.graphs import GraphedDecodeStep, KeptGraphs
from twig_batch.engine.hooks import ImageTokenObserver
from twig_batch.engine.inputs import both_rows, cfg_prefill_inputs, cfg_rows
from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.sampling import draw_image_step
from twig_batch.engine.static_decoder import StaticKVCache, forward_static
from twig_batch.settings import GenerationSettings

CONTROL_SLACK = 64  # control-token columns per image when the observer names no max_control_slots


@torch.no_grad()
def draw_image_tokens_fast(
    bundle, cond_rows: list[list[int]], seeds: list[int], settings: GenerationSettings, n_tokens: int,
    prefix_codes: torch.Tensor | None = None, first_step: int = 0, observer: ImageTokenObserver | None = None,
    use_graphs: bool | None = None, fp8: bool | None = None, arenas: KVArenas | None = None,
    kept: KeptGraphs | None = None, model: FastModel | None = None,
) -> torch.Tensor:
    """Codes [B, n_tokens]; image b matches `reference_image_tokens(bundle, cond_rows[b], seeds[b], ...)`.

    An engine (`runner.py`) passes its `model` (joined projections, compiled kernels), KV `arenas`
    and `kept` graph sets, and its cache kind as `fp8` (None: `settings.kv_cache`); without them the
    call runs the model's own modules, nothing compiled, and its cache and graphs are its own."""
    device = bundle.device
    embeds, valid, positions = cfg_prefill_inputs(bundle, cond_rows, prefix_codes)
    rows = embeds.shape[0]
    lm = bundle.language_model
    model = model or FastModel.plain(lm)
    slack = getattr(observer, "max_control_slots", CONTROL_SLACK) if observer is not None else 0
    # The prefill, the slots, then a column per decode step: every token but the last is fed back.
    columns = embeds.shape[1] + slack + max(n_tokens - 1, 0)
    if fp8 is None:
        fp8 = settings.kv_cache == "fp8"
    with StaticKVCache(lm, rows, columns, fp8=fp8, arenas=arenas) as cache:
        hidden = forward_static(model, cache, embeds, positions, valid)[:, -1]
        next_position = positions[:, -1:] + 1
        slots = ControlSlots(cache.used, slack, len(cond_rows))
        cache.used += slack  # decode steps write after the slots
        if use_graphs is None:
            use_graphs = device.type == "cuda"
        graphed = GraphedDecodeStep(model, cache, bundle.embed_image_codes, "image", kept) if use_graphs else None
        all_valid = torch.ones((rows, 1), dtype=torch.bool, device=device)

        def step_forward(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if graphed is not None:
                return graphed(both_rows(tokens), positions)
            return _decode_step(bundle, model, cache, tokens, positions, all_valid)

        row_seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        codes = []
        decide = _decider(observer)
        for i in range(n_tokens):
            step = first_step + i
            logits, tokens = draw_image_step(bundle, hidden, row_seeds, step, settings, model.kernels)
            codes.append(tokens)
            decision = decide(step, hidden[0::2], logits, tokens)
            if i + 1 == n_tokens:
                # The controller still hears its verdict out (it thinks and logs), but tokens after the
                # last one would read the control tokens, and there are none: nothing to write.
                if decision is not None:
                    decision.resolve()
                break
            # The next step goes to the device before the verdict is read, so the device never waits for
            # the host; an injection (rare) takes that step back and redoes it after the control tokens.
            column = cache.used
            hidden = step_forward(tokens, next_position)
            injection = decision.resolve() if decision is not None else None
            if injection is not None and bool(injection.rows.any()):
                hidden, next_position = _redo_behind_control(bundle, model, cache, slots, column, tokens,
                                                             next_position, hidden, injection)
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


def _decode_step(bundle, model: FastModel, cache, tokens, positions, valid):
    step_embeds = bundle.embed_image_codes(both_rows(tokens)).unsqueeze(1)
    return forward_static(model, cache, step_embeds, positions, valid)[:, -1]


class ControlSlots:
    """Each image's control-token columns in one drawing call: `width` columns from `first` on, filled
    in order, one injection after another (`taken` counts them per image, on the host)."""

    def __init__(self, first: int, width: int, images: int):
        self.first, self.width = first, width
        self.taken = [0] * images

    def take(self, images: list[int], k: int) -> torch.Tensor:
        """[len(images), k] cache columns for an injection of k tokens into `images`: each one's next
        free slots, which are then taken."""
        columns = torch.empty((len(images), k), dtype=torch.long)
        for row, image in enumerate(images):
            taken = self.taken[image]
            if taken + k > self.width:
                raise RuntimeError(
                    f"image {image} of this drawing call was given {taken + k} control tokens, more than the "
                    f"{self.width} cache columns its observer reserved (max_control_slots: for the latent "
                    "controller, max_injections_per_band x control_tokens); an observer must not inject more")
            columns[row] = self.first + taken + torch.arange(k)
            self.taken[image] = taken + k
        return columns


# Cache rows one injection pass takes at most: each layer reads a copy of its rows' keys and values.
INJECTION_ROWS = 64


def _redo_behind_control(bundle, model: FastModel, cache, slots: ControlSlots, column: int, tokens, next_position,
                         hidden, injection):
    """The step just taken, taken again for the injected images behind their control tokens.

    One pass over both CFG rows of each injected image: its K control tokens into its own slots, then
    the step's image token back into `column` (where the step just wrote it without them). The other
    rows keep the step as it was. Returns (hidden, next positions)."""
    device = next_position.device
    k = injection.embeds.shape[1]
    images = injection.rows.nonzero().flatten().tolist()
    slot_columns = slots.take(images, k).to(device)
    hidden = hidden.clone()  # the captured step's output buffer is the graph's own
    control_embeds = injection.embeds.to(bundle.device, bundle.dtype)
    for first in range(0, len(images), INJECTION_ROWS // 2):
        chosen = images[first:first + INJECTION_ROWS // 2]
        image_index = torch.tensor(chosen, device=device)
        rows = cfg_rows(image_index)
        control = both_rows(control_embeds[image_index])
        token = bundle.embed_image_codes(both_rows(tokens[image_index])).unsqueeze(1)
        embeds = torch.cat([control, token.to(control.dtype)], dim=1)
        columns = torch.cat([both_rows(slot_columns[first:first + len(chosen)]),
                             torch.full((len(rows), 1), column, dtype=torch.long, device=device)], dim=1)
        positions = next_position[rows] + torch.arange(k + 1, device=device)
        valid = torch.ones(columns.shape, dtype=torch.bool, device=device)
        hidden[rows] = forward_static(model, cache, embeds, positions, valid, columns=columns,
                                      rows=rows)[:, -1]
    return hidden, next_position + both_rows(injection.rows.to(device)).long().unsqueeze(1) * k
