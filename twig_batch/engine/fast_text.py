"""Text generation (thoughts, reflections, stage plans) over the static KV cache.

Same contract as `reference.texts.generate_text_batch` and token-exact to its one-row
reference, but with fixed shapes: rows that finished keep a slot (their further tokens are thrown
away) so that on a GPU every step replays one captured CUDA graph. Tokens stay on the device; every
few steps the host asks how many rows are done. Finished rows are handed to prompts still waiting
for a row (continuous batching, when a call has more prompts than rows); with nobody waiting, all
rows done ends the call and half of them done (with enough steps left) drops the finished rows
from the cache, so ragged texts cost what they use. A prompt's `stop_after` ends its row exactly
as a stop token would (the row is done at that step), never by planning around it: the emulated
lengths of `pipeline/text_lengths.py` must cost what real short texts would.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from twig_batch.engine.fused import fuse_for_device
from twig_batch.engine.graphs import GraphedDecodeStep, KeptGraphs
from twig_batch.engine.inputs import text_prefill_inputs
from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.memory import free_device_bytes, planning_budget, text_rows_that_fit
from twig_batch.engine.sampling import sample_tokens
from twig_batch.engine.shared_prefix import prefill_shared, sharing_plan
from twig_batch.engine.static_decoder import PREFILL_CHUNK_TOKENS, StaticKVCache, forward_static
from twig_batch.engine.text_slots import place_rows
from twig_batch.seeds import STREAM_TEXT

# Steps between checks whether rows have finished: each check waits for the device, so a finished
# row idles (or its slot stays empty) for up to CHECK_EVERY - 1 steps before a waiting prompt takes it.
CHECK_EVERY = 16
COMPACT_MIN_STEPS = 32  # steps that must remain for dropping finished rows to pay
_NEVER = 2**62  # the stop step of a row whose prompt has no `stop_after`


@torch.no_grad()
def generate_text_fast(bundle, prompts, max_new_tokens: int, temperature: float = 0.0, stop_id: int | None = None,
                       use_graphs: bool | None = None, max_rows: int | None = None, arenas: KVArenas | None = None,
                       kept: KeptGraphs | None = None) -> list[list[int]]:
    """New token ids per prompt (`TextPrompt`s); the stop token is not included.

    At most `max_rows` prompts are written at once (None: all of them, or on a GPU as many as fit in
    its free memory); the others wait in order and take the rows of prompts that finish. An engine
    (`runner.py`) passes its KV `arenas` and `kept` graph sets; without them the caches are the call's own.
    """
    if not prompts:
        return []
    fuse_for_device(bundle.language_model)
    if use_graphs is None:
        use_graphs = bundle.device.type == "cuda"
    if max_rows is None:
        max_rows = _rows_that_fit(bundle, prompts, max_new_tokens, arenas)
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    call = _Call(bundle, prompts, max_new_tokens, temperature, bundle.tokens.eos if stop_id is None else stop_id,
                 use_graphs, arenas, kept, waiting=list(range(len(prompts))), written=[[] for _ in prompts])
    while call.waiting:
        _Round(call, max_rows).run()
    # A row keeps computing after its budget or stop until a check notices (or its round ends).
    return [_until_stop(row[:prompt.budget(max_new_tokens)], call.stop)
            for prompt, row in zip(prompts, call.written)]


@dataclass
class _Call:
    bundle: object
    prompts: list
    max_new_tokens: int
    temperature: float
    stop: int
    use_graphs: bool
    arenas: KVArenas | None  # the engine's, which the round's cache borrows from
    kept: KeptGraphs | None  # the engine's graph sets kept over arena caches
    waiting: list[int]  # prompts not started yet, in the order they take rows
    written: list[list[int]]  # tokens drawn so far per prompt, stop token and beyond included


class _Round:
    """One cache: up to `max_rows` waiting prompts prefilled together, then decoded a token per step;
    prompts still waiting take the rows of finished ones for as long as their budget fits."""

    def __init__(self, call: _Call, max_rows: int):
        self.call = call
        first, call.waiting = call.waiting[:max_rows], call.waiting[max_rows:]
        # A joiner's prompt goes into the columns just before the current one, so the prefill is as
        # wide as every waiting prompt and the cache has room for a second budget of tokens.
        width = max(len(call.prompts[i].ids) for i in first + call.waiting)
        # The round's own width, even in a wider cache (the KV arena may lend one): every step
        # attends to all columns written so far, so a round that ran on would slow every row.
        self.columns = width + call.max_new_tokens * (2 if call.waiting else 1)
        self.cache, self.hidden, positions, first = _prefill(call, first, width, self.columns, share=True)
        self.rows = _Rows.starting(call, first, positions, step=0)
        self.graphed = self._graphed()
        self.done = torch.zeros(len(first), dtype=torch.bool, device=call.bundle.device)
        self.drawn: list[torch.Tensor] = []

    def run(self) -> None:
        call, step = self.call, 0
        while True:
            self.tokens = self.rows.sample(call.bundle.text_logits(self.hidden), step, call.temperature)
            self.drawn.append(self.tokens)
            self.done |= (self.tokens == call.stop) | self.rows.stopping(step)
            checking = step == self.rows.last_step(call.max_new_tokens) or step % CHECK_EVERY == CHECK_EVERY - 1
            if checking and not self._check(step):
                break
            self._decode()
            step += 1
        self._flush()
        self.cache.close()  # the next call may have the KV arena now

    def _check(self, step: int) -> bool:
        """Hands finished rows to waiting prompts, or drops them; False when no row has work left."""
        call = self.call
        done = self.done | self.rows.past_budget(step, call.max_new_tokens)
        finished = int(done.sum())  # waits for the device
        while finished and call.waiting and self._room_for_joiners():
            # Joiners are prefilled in a cache of their own before moving in: a slice of rows at a
            # time keeps that cache small beside the round's.
            group = max(1, PREFILL_CHUNK_TOKENS // max(len(call.prompts[i].ids) for i in call.waiting))
            self._join(done.nonzero().flatten()[:min(len(call.waiting), group)], step)
            done = self.done | self.rows.past_budget(step, call.max_new_tokens)
            finished = int(done.sum())
        self.done = done
        if finished == len(done):
            return False
        steps_left = self.rows.last_step(call.max_new_tokens) - step
        joining_later = call.waiting and self._room_for_joiners()  # they need the rows, not a smaller cache
        if not joining_later and _worth_compacting(len(done), finished, steps_left):
            self._compact()
        return True

    def _room_for_joiners(self) -> bool:
        # A joiner's first token is written at column `used`, its last before `used + budget`.
        return self.cache.used + self.call.max_new_tokens <= self.columns

    def _join(self, slots: torch.Tensor, step: int) -> None:
        """The next waiting prompts take rows `slots`: prefilled on their own, their K/V copied into
        those rows and their first token drawn (with their own token index 0) in place of the
        finished rows' tokens of this step."""
        call = self.call
        self._flush()
        joining, call.waiting = call.waiting[:len(slots)], call.waiting[len(slots):]
        width = max(len(call.prompts[i].ids) for i in joining)
        scratch, hidden, positions, joining = _prefill(call, joining, width, width)
        joiners = _Rows.starting(call, joining, positions, step)
        first = joiners.sample(call.bundle.text_logits(hidden), step, call.temperature)
        place_rows(self.cache, slots, scratch)
        scratch.close()
        self.rows = self.rows.joined(slots, joiners)
        self.tokens[slots] = first
        self.done[slots] = (first == call.stop) | joiners.stopping(step)
        for prompt, token in zip(joining, first.tolist()):
            call.written[prompt].append(token)

    def _compact(self) -> None:
        self._flush()
        keep = (~self.done).nonzero().flatten()
        self.cache.keep_rows(keep)
        self.rows, self.tokens, self.done = self.rows.select(keep), self.tokens[keep], self.done[keep]
        self.graphed = self._graphed()

    def _decode(self) -> None:
        if self.graphed is not None:
            self.hidden = self.graphed(self.tokens, self.rows.positions)
        else:
            bundle = self.call.bundle
            step_embeds = bundle.embed_text(self.tokens).unsqueeze(1)
            valid = torch.ones((len(self.tokens), 1), dtype=torch.bool, device=bundle.device)
            self.hidden = forward_static(bundle.language_model, self.cache, step_embeds, self.rows.positions,
                                         valid)[:, -1]
        self.rows.positions = self.rows.positions + 1

    def _graphed(self) -> GraphedDecodeStep | None:
        if not self.call.use_graphs:
            return None
        return GraphedDecodeStep(self.call.bundle, self.cache, self.call.bundle.embed_text, "text", self.call.kept)

    def _flush(self) -> None:
        self.rows.record(self.call.written, self.drawn)
        self.drawn = []


def _prefill(call: _Call, indices: list[int], width: int, columns: int, share: bool = False):
    """A cache `columns` wide holding these prompts left-padded to `width` columns; the last hidden
    states [R, D], each row's next position [R, 1] and the prompt of each row. With `share`, prompts
    that open with the same picture prefill it once (`shared_prefix.py`; rows come back reordered)."""
    plan = sharing_plan(call.bundle, [call.prompts[i] for i in indices]) if share else None
    if plan is not None:
        indices = [indices[j] for j in plan.order]
    embeds, mask, positions = text_prefill_inputs(call.bundle, [call.prompts[i] for i in indices])
    if plan is not None:
        return (*prefill_shared(call.bundle, plan, embeds, mask, width, columns, call.arenas), indices)
    extra = width - embeds.shape[1]  # masked columns with zero embeddings: nobody attends to them
    embeds, mask, positions = F.pad(embeds, (0, 0, extra, 0)), F.pad(mask, (extra, 0)), F.pad(positions, (extra, 0))
    lm = call.bundle.language_model
    cache = StaticKVCache(lm, len(indices), columns, arenas=call.arenas)
    hidden = forward_static(lm, cache, embeds, positions, mask.bool())[:, -1]
    return cache, hidden, positions[:, -1:] + 1, indices


class _Rows:
    """Which prompt each cache row is, with its noise seed, next position, the step of the call at
    which it drew its first token (its token index is the call's step minus that) and the step at
    which it draws the last token its prompt's `stop_after` allows (_NEVER without one)."""

    def __init__(self, index: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor, starts: list[int],
                 stops: torch.Tensor):
        self.index, self.seeds, self.positions, self.starts, self.stops = index, seeds, positions, starts, stops

    @classmethod
    def starting(cls, call: _Call, indices: list[int], positions: torch.Tensor, step: int) -> "_Rows":
        device = call.bundle.device
        seeds = torch.tensor([call.prompts[i].seed for i in indices], dtype=torch.int64, device=device)
        stops = [_NEVER if call.prompts[i].stop_after is None else step + call.prompts[i].stop_after - 1
                 for i in indices]
        return cls(torch.tensor(indices, device=device), seeds, positions, [step] * len(indices),
                   torch.tensor(stops, dtype=torch.int64, device=device))

    def select(self, keep: torch.Tensor) -> "_Rows":
        return _Rows(self.index[keep], self.seeds[keep], self.positions[keep], [self.starts[i] for i in keep.tolist()],
                     self.stops[keep])

    def joined(self, slots: torch.Tensor, joiners: "_Rows") -> "_Rows":
        """These rows with rows `slots` taken over by `joiners` (in that order)."""
        starts = list(self.starts)
        for slot, start in zip(slots.tolist(), joiners.starts):
            starts[slot] = start
        return _Rows(self.index.index_copy(0, slots, joiners.index), self.seeds.index_copy(0, slots, joiners.seeds),
                     self.positions.index_copy(0, slots, joiners.positions), starts,
                     self.stops.index_copy(0, slots, joiners.stops))

    def stopping(self, step: int) -> torch.Tensor:
        """Which rows have drawn, by `step`, as many tokens as their `stop_after` allows."""
        return self.stops <= step

    @cached_property
    def cohorts(self) -> list[tuple[int, torch.Tensor]]:
        """Rows grouped by the step they started at: (start, row indices)."""
        by_start: dict[int, list[int]] = {}
        for row, start in enumerate(self.starts):
            by_start.setdefault(start, []).append(row)
        return [(start, torch.tensor(rows, device=self.seeds.device)) for start, rows in by_start.items()]

    def sample(self, logits: torch.Tensor, step: int, temperature: float) -> torch.Tensor:
        """Each row's next token, its noise keyed by the row's seed and its own token index."""
        if temperature == 0 or len(self.cohorts) == 1:  # greedy draws no noise: one call for all rows
            return sample_tokens(logits, self.seeds, step - self.starts[0], temperature, stream=STREAM_TEXT)
        tokens = torch.empty(len(self.starts), dtype=torch.long, device=logits.device)
        for start, rows in self.cohorts:
            tokens[rows] = sample_tokens(logits[rows], self.seeds[rows], step - start, temperature,
                                         stream=STREAM_TEXT)
        return tokens

    def past_budget(self, step: int, budget: int) -> torch.Tensor:
        """Which rows have drawn `budget` tokens by `step`."""
        return torch.tensor([step - start + 1 >= budget for start in self.starts], device=self.seeds.device)

    def last_step(self, budget: int) -> int:
        return max(self.starts) + budget - 1

    def record(self, written: list[list[int]], drawn: list[torch.Tensor]) -> None:
        if not drawn:
            return
        for prompt, tokens in zip(self.index.tolist(), torch.stack(drawn, dim=1).tolist()):
            written[prompt].extend(tokens)


def _rows_that_fit(bundle, prompts, max_new_tokens: int, arenas: KVArenas | None) -> int:
    """All prompts at once off a GPU or when their cache fits in its free memory; otherwise as many
    rows as fit with a cache that leaves joiners room for their budget."""
    free = free_device_bytes(bundle.device, arenas)
    if free is None:
        return len(prompts)
    own = idle = 0
    if arenas is not None:
        arena = arenas.for_dtype(bundle.dtype)  # the one a text cache borrows from
        own, idle = (0 if arena.lent() else arena.nbytes), arenas.idle_bytes()
    budget = planning_budget(free, own, idle - own)
    lm, width = bundle.language_model, max(len(p.ids) for p in prompts)
    if text_rows_that_fit(lm, budget, width + max_new_tokens, width) >= len(prompts):
        return len(prompts)
    return text_rows_that_fit(lm, budget, width + 2 * max_new_tokens, width)


def _worth_compacting(rows: int, finished: int, steps_left: int) -> bool:
    """Rows that finished keep computing until dropped; dropping costs a copy of the live rows'
    cache (and, on a GPU, fresh graph captures), so do it when at least half the rows are idle and
    enough steps remain to earn it back."""
    return finished * 2 >= rows and steps_left >= COMPACT_MIN_STEPS


def _until_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop)] if stop in tokens else tokens
