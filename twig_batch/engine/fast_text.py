"""Text generation (thoughts, reflections, stage plans) over the static KV cache: the runner.

Same contract as `reference.texts.generate_text_batch` and token-exact to its one-row
reference, but with fixed shapes: rows that finished keep a slot (their further tokens are thrown
away) so that on a GPU every step replays one captured CUDA graph. Tokens stay on the device.
What runs where and when (checks, prompts joining freed rows, compaction, rounds) is decided by
`text_scheduler.TextScheduler` on plain data; this module prefills, decodes, samples and moves
rows as it says, and tells it which rows drew the stop token. A prompt's `stop_after` ends its row
exactly as a stop token would (the row is done at that step), never by planning around it: the
emulated lengths of `pipeline/text_lengths.py` must cost what real short texts would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from twig_batch.engine.fused import FastModel
from twig_batch.engine.graphs import GraphedDecodeStep, KeptGraphs
from twig_batch.engine.inputs import text_prefill_inputs
from twig_batch.engine.kv_arena import KVArenas
from twig_batch.engine.memory import free_device_bytes, planning_budget, text_rows_that_fit
from twig_batch.engine.sampling import sample_tokens
from twig_batch.engine.shared_prefix import prefill_shared, sharing_plan
from twig_batch.engine.static_decoder import PREFILL_CHUNK_TOKENS, StaticKVCache, forward_static
from twig_batch.engine.text_scheduler import RoundPlan, TextScheduler
from twig_batch.engine.text_slots import place_rows
from twig_batch.seeds import STREAM_TEXT


@torch.no_grad()
def generate_text_fast(bundle, prompts, max_new_tokens: int, temperature: float = 0.0, stop_id: int | None = None,
                       use_graphs: bool | None = None, max_rows: int | None = None, arenas: KVArenas | None = None,
                       kept: KeptGraphs | None = None, model: FastModel | None = None) -> list[list[int]]:
    """New token ids per prompt (`TextPrompt`s); the stop token is not included.

    At most `max_rows` prompts are written at once (None: all of them, or on a GPU as many as fit in
    its free memory); the others wait in order and take the rows of prompts that finish. An engine
    (`runner.py`) passes its `model`, KV `arenas` and `kept` graph sets; without them the model's own
    modules run, nothing compiled, and the caches are the call's own.
    """
    if not prompts:
        return []
    if use_graphs is None:
        use_graphs = bundle.device.type == "cuda"
    if max_rows is None:
        max_rows = _rows_that_fit(bundle, prompts, max_new_tokens, arenas)
    scheduler = TextScheduler([len(p.ids) for p in prompts], [p.budget(max_new_tokens) for p in prompts],
                              max_new_tokens, max_rows, prefill_tokens=PREFILL_CHUNK_TOKENS)
    call = _Call(bundle, prompts, temperature, bundle.tokens.eos if stop_id is None else stop_id,
                 use_graphs, arenas, kept, model or FastModel.plain(bundle.language_model), scheduler,
                 written=[[] for _ in prompts])
    while (plan := scheduler.next_round()) is not None:
        _Round(call, plan).run()
    # A row keeps computing after its budget or stop until a check notices (or its round ends).
    return [_until_stop(row[:prompt.budget(max_new_tokens)], call.stop)
            for prompt, row in zip(prompts, call.written)]


@dataclass
class _Call:
    bundle: object
    prompts: list
    temperature: float
    stop: int
    use_graphs: bool
    arenas: KVArenas | None  # the engine's, which the round's cache borrows from
    kept: KeptGraphs | None  # the engine's graph sets kept over arena caches
    model: FastModel  # the engine's (joined projections, compiled kernels), else the model as written
    scheduler: TextScheduler
    written: list[list[int]]  # tokens drawn so far per prompt, stop token and beyond included


class _Round:
    """One cache, as the scheduler plans it: prompts prefilled together, then decoded a token per
    step; at its checks, finished rows are handed to waiting prompts or dropped. The device state
    per row (next position, noise seed, stop token drawn) follows the scheduler's rows."""

    def __init__(self, call: _Call, plan: RoundPlan):
        self.call, self.scheduler = call, call.scheduler
        self.cache, self.hidden, self.positions, first = _prefill(call, plan.prompts, plan.width, plan.columns,
                                                                  share=True)
        self.scheduler.started(first)
        self._follow_rows()
        self.graphed = self._graphed()
        self.stopped = torch.zeros(len(first), dtype=torch.bool, device=call.bundle.device)
        self.drawn: list[torch.Tensor] = []

    def run(self) -> None:
        call, step = self.call, 0
        while True:
            self.tokens = self._sample(call.bundle.text_logits(self.hidden), step)
            self.drawn.append(self.tokens)
            self.stopped |= self.tokens == call.stop
            if self.scheduler.checks_at(step) and not self._check(step):
                break
            self._decode()
            step += 1
        self._flush()
        self.cache.close()  # the next call may have the KV arena now

    def _check(self, step: int) -> bool:
        """Does what the scheduler decides at this check; False when the round is over."""
        scheduler = self.scheduler
        scheduler.note_stopped(self.stopped.tolist())  # waits for the device
        while True:
            rows, prompts = scheduler.joiners(step, self.cache.used)
            if not rows:
                break
            self._join(rows, prompts, step)
        if scheduler.round_over(step):
            return False
        keep = scheduler.rows_to_keep(step, self.cache.used)
        if keep is not None:
            self._compact(keep)
        return True

    def _join(self, rows: list[int], prompts: list[int], step: int) -> None:
        """`prompts` take cache rows `rows`: prefilled on their own (a cache small beside the round's),
        their K/V copied into those rows and their first token drawn (with their own token index 0)
        in place of the finished rows' tokens of this step."""
        call = self.call
        self._flush()
        width = max(len(call.prompts[i].ids) for i in prompts)
        scratch, hidden, positions, prompts = _prefill(call, prompts, width, width)
        first = sample_tokens(call.bundle.text_logits(hidden), self._seeds(prompts), 0, call.temperature,
                              stream=STREAM_TEXT, kernels=call.model.kernels)
        slots = torch.tensor(rows, device=call.bundle.device)
        place_rows(self.cache, slots, scratch)
        scratch.close()
        self.positions = self.positions.index_copy(0, slots, positions)
        self.tokens[slots] = first
        self.stopped[slots] = first == call.stop
        tokens = first.tolist()
        self.scheduler.joined(rows, prompts, step, [token == call.stop for token in tokens])
        self._follow_rows()
        for prompt, token in zip(prompts, tokens):
            call.written[prompt].append(token)

    def _compact(self, keep: list[int]) -> None:
        self._flush()
        self.scheduler.kept(keep)
        rows = torch.tensor(keep, device=self.call.bundle.device)
        self.cache.keep_rows(rows)
        self.positions, self.tokens, self.stopped = self.positions[rows], self.tokens[rows], self.stopped[rows]
        self._follow_rows()
        self.graphed = self._graphed()

    def _follow_rows(self) -> None:
        """The rows' seeds and cohorts on the device, after the scheduler's rows changed."""
        self.seeds = self._seeds(self.scheduler.prompts_by_row())
        self.cohorts = None  # built when first sampled with noise

    def _seeds(self, prompts: list[int]) -> torch.Tensor:
        return torch.tensor([self.call.prompts[i].seed for i in prompts], dtype=torch.int64,
                            device=self.call.bundle.device)

    def _sample(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Each row's next token, its noise keyed by the row's seed and its own token index."""
        if self.cohorts is None:
            self.cohorts = [(start, torch.tensor(rows, device=self.seeds.device))
                            for start, rows in self.scheduler.cohorts()]
        temperature = self.call.temperature
        if temperature == 0 or len(self.cohorts) == 1:  # greedy draws no noise: one call for all rows
            return sample_tokens(logits, self.seeds, step - self.cohorts[0][0], temperature, stream=STREAM_TEXT,
                                 kernels=self.call.model.kernels)
        tokens = torch.empty(len(self.seeds), dtype=torch.long, device=logits.device)
        for start, rows in self.cohorts:
            tokens[rows] = sample_tokens(logits[rows], self.seeds[rows], step - start, temperature,
                                         stream=STREAM_TEXT, kernels=self.call.model.kernels)
        return tokens

    def _decode(self) -> None:
        if self.graphed is not None:
            self.hidden = self.graphed(self.tokens, self.positions)
        else:
            bundle = self.call.bundle
            step_embeds = bundle.embed_text(self.tokens).unsqueeze(1)
            valid = torch.ones((len(self.tokens), 1), dtype=torch.bool, device=bundle.device)
            self.hidden = forward_static(self.call.model, self.cache, step_embeds, self.positions, valid)[:, -1]
        self.positions = self.positions + 1

    def _graphed(self) -> GraphedDecodeStep | None:
        if not self.call.use_graphs:
            return None
        return GraphedDecodeStep(self.call.model, self.cache, self.call.bundle.embed_text, "text", self.call.kept)

    def _flush(self) -> None:
        """The tokens drawn since the last flush, to the prompts of the rows that drew them."""
        if not self.drawn:
            return
        for prompt, tokens in zip(self.scheduler.prompts_by_row(), torch.stack(self.drawn, dim=1).tolist()):
            self.call.written[prompt].extend(tokens)
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
        return (*prefill_shared(call.bundle, plan, embeds, mask, width, columns, call.arenas, call.model),
                indices)
    extra = width - embeds.shape[1]  # masked columns with zero embeddings: nobody attends to them
    embeds, mask, positions = F.pad(embeds, (0, 0, extra, 0)), F.pad(mask, (extra, 0)), F.pad(positions, (extra, 0))
    lm = call.bundle.language_model
    cache = StaticKVCache(lm, len(indices), columns, arenas=call.arenas)
    hidden = forward_static(call.model, cache, embeds, positions, mask.bool())[:, -1]
    return cache, hidden, positions[:, -1:] + 1, indices


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


def _until_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop)] if stop in tokens else tokens
