"""The mixed loop: many images' programs at once, every stage of every image in the same steps.

Each image is a program (`pipeline/programs.py`): a generator that asks for stages (texts, bands of
image tokens), gets their results back and asks for the next, reading reflections and building
prompts in between; work beside the model that costs less for many images at once (a band decoded,
a canvas seen by the vision model) it asks for as a `HostCall`, which the loop makes for every
program waiting on it at once, between two steps, once a few are waiting (`HOST_ROUND`, `HOST_WAIT`).
The loop holds the programs not started yet in a queue and, at every step:
1. admits stages: first those asked by programs already running (in the order asked), then the first
   stages of new programs (while fewer than `MAX_PROGRAMS` run), while the page pool can promise what
   each stage may need (`stages.py`) and the step's row limit allows. A stage that cannot be promised
   its pages waits, and the ones asked after it wait behind it, so no image starves;
2. builds one step: every run that is decoding feeds its one token, runs still prefilling share what
   is left of the step's token budget in chunks (a run's two CFG rows always take the same chunk);
3. runs it (`step.mixed_step`; a step where every row feeds one token at fixed shapes, `graphs.py`,
   replayed as a CUDA graph on a GPU) and samples for every run that has fed all it had: text runs from the
   language head, image runs from the generation head with classifier-free guidance, in groups of one
   sampling rule, each row with the noise of its own seed and step (so no image depends on the others);
4. ends the runs that are done (their pages go back at once) and hands each program its results when
   every stage it asked for is done. Nothing a step needs waits for the device: image rows keep their
   tokens there until their band is done, text rows' tokens are read back one step late (a text goes
   on as if it had not drawn its stop token, and what it draws after it is dropped), and so are the
   latent controller's verdicts: a run injected after a token has fed that token in the next step
   already, so that step takes it back, and the run waits, sampling nothing, until it is redone: its
   control tokens and that token fed again, in a pass of its own (at fixed shapes too, where one-token
   steps run so). Injected runs wait for each other (`PARK_ROUND`, `PARK_WAIT`), because every think
   and every redo is a pass over all of the model's weights, whatever rows it carries: images reach
   their injections at steps of their own, and one pass each would double a step's cost.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import torch

from twig_batch.engine.fused import FastModel
from twig_batch.engine.mixed.graphs import DecodeSteps
from twig_batch.engine.mixed.pages import PagePool
from twig_batch.engine.mixed.stages import HostCall, ImageRun, ImageStage, TextRun, TextStage
from twig_batch.engine.mixed.step import Chunk, gather_rows, mixed_step
from twig_batch.engine.transfer import HostCopy, to_device
from twig_batch.engine.sampling import draw_image_step, sample_tokens
from twig_batch.engine.shared_prefix import shared_picture_prefix
from twig_batch.seeds import STREAM_TEXT

MIN_STEP_TOKENS = 8
# Host calls wait for others to join them (each round of them stops the steps while it runs) until
# HOST_ROUND are waiting, the oldest has waited HOST_WAIT steps, or nothing else runs. A round's cost
# is mostly the launches of the VQ decoder and the vision model, whatever it carries: for 256 twig
# images on an H200, 128 at once, rounds of 3.5 calls on average (16, 4) took 9.4 s of host time,
# rounds of 7.7 (48, 12) 6.5 s, and the images drew at 3.13/s against 2.89; 256 at once, 3.13 against
# 3.00 (benchmarks/README.md).
HOST_ROUND, HOST_WAIT = 48, 12
# Injected runs are thought for and redone together once PARK_ROUND are waiting, the oldest has
# waited PARK_WAIT steps, or nothing else is fed.
PARK_ROUND, PARK_WAIT = 32, 8
# Images in the loop at once, at most; a new image starts as one finishes. Each image is a chain of
# about 1,000 steps, one token each, so the rate is the images at once over the chain's time while
# the steps are not full: for twig on an H200 128 at once fed 1,035 tokens a step on average, 256 at
# once 1,553, and drew at 3.36 images/s against 2.89 on one machine (3.00 on another). More do not
# draw faster once the steps are full or the pages are all held, and each image takes longer: 512
# twig images at once finished their first image after 150 s, 128 at once after 57 s
# (benchmarks/README.md).
MAX_PROGRAMS = 256


class _Program:
    """One image's program and the stages it asked for last: their runs and, once done, their results."""

    def __init__(self, index: int, generator: Iterator):
        self.index, self.generator = index, generator
        self.results: list = []
        self.left = 0
        self.outcome = None

    def ask(self, sent) -> list:
        """The stages the program asks for next (empty once it has returned its outcome)."""
        try:
            stages = self.generator.send(sent)
        except StopIteration as stop:
            self.outcome = stop.value
            return []
        if not stages:
            raise ValueError(f"image program {self.index} asked for no stage")
        self.results, self.left = [None] * len(stages), len(stages)
        return list(stages)


class MixedLoop:
    """Runs image programs over one page pool. `step_tokens`: tokens one step feeds at most (decoding
    rows first, then prefill chunks); `max_rows`: sequences in one step at most; `max_programs`:
    programs running at once at most (the others wait their turn)."""

    def __init__(self, bundle, pool: PagePool, model: FastModel | None = None, step_tokens: int = 2048,
                 max_rows: int = 512, profile: bool = False, fixed_steps: bool | None = None,
                 max_programs: int = MAX_PROGRAMS):
        """With `profile`, each step waits for its forward pass, so that `seconds["forward"]` is the
        device's time for it (without, the time to queue it) and `seconds["sample"]` the rest.
        `fixed_steps`: steps where every row feeds one token run at fixed shapes (`graphs.DecodeSteps`,
        CUDA graphs on a GPU; None: on a GPU only)."""
        if step_tokens < MIN_STEP_TOKENS or max_rows < 2:
            raise ValueError(f"a step needs at least {MIN_STEP_TOKENS} tokens (a CFG pair's prefill chunk, when a "
                             f"quarter goes to prefills) and 2 rows, got {step_tokens} tokens, {max_rows} rows")
        self.bundle, self.pool = bundle, pool
        self.model = model or FastModel.plain(bundle.language_model)
        on_gpu = pool.k.is_cuda
        self.decode_steps = DecodeSteps(self.model, pool, capture=on_gpu) if (
            on_gpu if fixed_steps is None else fixed_steps) else None
        self.step_tokens, self.max_rows, self.profile = step_tokens, max_rows, profile
        self.max_programs = max_programs
        self.steps = self.fed_tokens = self.fed_rows = 0  # steps run, tokens and sequences fed over them
        self._unread: list[_ReadBack] = []  # text tokens of the last step, on their way to the host
        self._verdicts: list[_Verdicts] = []  # the controller's verdicts on the last step's image tokens
        self._parked: list[_Parked] = []  # runs injected, waiting to be redone behind their control tokens
        # Where the time goes: admission and the programs' own work (decodes, canvases, prompts),
        # building each step, its forward pass, the controller (the wait for its verdicts, the thinks
        # and redos of the injected runs), sampling (with the wait for the device) and handing the
        # tokens on.
        self.seconds = dict.fromkeys(("programs", "build", "forward", "controller", "sample"), 0.0)
        self.redo_passes = 0  # passes that redid injected runs behind their control tokens

    def _clock(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - since
        return now

    @torch.no_grad()
    def run(self, programs: Iterable[Iterator], on_outcome: Callable[[int, object], None] | None = None) -> list:
        """Every program's return value, in the programs' order; `on_outcome(index, value)` hears of
        each as soon as its program returns it."""
        waiting = deque(enumerate(programs))
        asked: deque = deque()  # (program, stage index, stage): asked by a running program, not admitted
        host: list = []  # (program, stage index, HostCall): waiting for the next round of host calls
        runs: list = []  # (program, stage index, run)
        outcomes: dict[int, object] = {}

        def start(program: _Program, sent) -> None:
            stages = program.ask(sent)
            if not stages:
                outcomes[program.index] = program.outcome
                if on_outcome is not None:
                    on_outcome(program.index, program.outcome)
            for i, stage in enumerate(stages):
                (host if isinstance(stage, HostCall) else asked).append((program, i, stage))

        def finish(program: _Program, i: int, result) -> None:
            program.results[i] = result
            program.left -= 1
            if program.left == 0:
                start(program, program.results)

        host_since = 0  # the step at which the oldest host call waiting was asked for
        started = 0  # programs started (those running: started, less those with an outcome)
        while waiting or asked or host or runs:
            since = time.perf_counter()
            if host and (not runs or len(host) >= HOST_ROUND or self.steps - host_since >= HOST_WAIT):
                while host:  # what the host calls hand back may ask for more host calls
                    calls, host[:] = list(host), []
                    for (program, i, _), result in zip(calls, _call_together([call for _, _, call in calls])):
                        finish(program, i, result)
            self._admit(asked, runs)
            while (not asked and waiting and self._rows(runs) + 2 <= self.max_rows
                   and started - len(outcomes) < self.max_programs):
                started += 1
                index, generator = waiting.popleft()
                start(_Program(index, generator), None)
                self._admit(asked, runs)
            if not host:
                host_since = self.steps
            self._clock("programs", since)
            if not runs:
                if host:
                    continue
                if asked:
                    _, _, stage = asked[0]
                    raise RuntimeError(f"a stage needs more KV pages than the pool holds: {self._describe(stage)}")
                continue
            done = self._step(runs)
            since = time.perf_counter()
            for program, i, run in done:
                run.close()
                finish(program, i, run.result())
            self._clock("programs", since)
        self._verdicts = []  # on the last runs' last tokens: nothing reads control tokens after them
        return [outcomes[i] for i in sorted(outcomes)]

    def _rows(self, runs) -> int:
        return sum(len(run.rows) for _, _, run in runs)

    def _admit(self, asked: deque, runs: list) -> None:
        while asked:
            program, i, stage = asked[0]
            run = self._run_for(stage, program, runs)
            if not run.admitted or self._rows(runs) + len(run.rows) > self.max_rows:
                if run.admitted:
                    run.reservation.close()
                return
            asked.popleft()
            runs.append((program, i, run))

    def _run_for(self, stage, program: _Program, runs: list):
        if isinstance(stage, TextStage):
            leader, pages = self._leader_for(stage, program, runs)
            return TextRun(stage, self.bundle, self.pool, self.bundle.tokens.eos, leader, pages)
        if isinstance(stage, ImageStage):
            return ImageRun(stage, self.bundle, self.pool)
        raise TypeError(f"an image program asked for {stage!r}, not a TextStage, an ImageStage or a HostCall")

    def _leader_for(self, stage: TextStage, program: _Program, runs: list) -> tuple[TextRun | None, int]:
        """A running text of the same program whose prompt begins as `stage`'s does, picture and all
        (a reflection and the next thought look at one canvas), and the full pages of that beginning."""
        for owner, _, run in runs:
            if owner is program and isinstance(run, TextRun) and not run.done:
                shared = shared_picture_prefix(self.bundle, run.stage.prompt, stage.prompt) // self.pool.page_size
                if shared:
                    return run, shared
        return None, 0

    def _describe(self, stage) -> str:
        run_pages = self.pool.pages_for
        if isinstance(stage, TextStage):
            need = run_pages(len(stage.prompt.ids) + stage.prompt.budget(stage.max_new_tokens))
            return f"a text of {len(stage.prompt.ids)} prompt tokens needs {need} pages of {self.pool.pages}"
        prefix = 0 if stage.prefix_codes is None else stage.prefix_codes.numel()
        need = 2 * run_pages(len(stage.cond_ids) + prefix + stage.n_tokens)
        return f"a band of {stage.n_tokens} image tokens needs {need} pages of {self.pool.pages}"

    def _step(self, runs: list) -> list:
        """One step over `runs`; returns (and removes from `runs`) those that are done."""
        since = time.perf_counter()
        chunks, sampled = [], []
        first_row: dict[int, int] = {}  # run -> the index of its first row's chunk
        budget = self.step_tokens
        for _, _, run in runs:
            if run.pending == 1:  # decoding: every decoding row goes into every step
                budget -= len(run.rows)
        budget = max(budget, self.step_tokens // 4)  # prefills never starve behind many decoding rows
        for entry in runs:
            run = entry[2]
            if not run.may_feed():
                continue
            count = run.pending if run.pending == 1 else min(run.pending, budget // len(run.rows))
            if count < 1:
                continue
            if run.pending > 1:
                budget -= count * len(run.rows)
            first_row[id(run)] = len(chunks)
            for row in run.rows:
                chunks.append(row.take(count))
            sampled.append((entry, run.pending == 0))
        since = self._clock("build", since)
        earlier, self._unread = self._unread, []
        verdicts, self._verdicts = self._verdicts, []
        if not chunks:  # every run waits: for its last text token to be read back, or to be redone
            # (the verdicts are on runs that are done: nothing reads their control tokens)
            if not earlier and not self._parked:
                raise RuntimeError("the mixed loop has runs but nothing to feed and no token to read back")
            if self._parked:
                self._redo_parked()
                self._clock("controller", since)
            return self._ended(runs, earlier)
        hidden = self._feed(chunks, all(c.count == 1 for c in chunks))
        if self.profile and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        since = self._clock("forward", since)
        if verdicts:  # the step is queued: the device works while the verdicts are read
            parked = [entry for pending in verdicts for entry in pending.park(chunks, first_row, self.steps)]
            if parked:
                waits = {id(entry.run) for entry in parked}
                sampled = [(entry, complete and id(entry[2]) not in waits) for entry, complete in sampled]
                self._parked += parked
            since = self._clock("controller", since)
        self.steps += 1
        self.fed_rows += len(chunks)
        self.fed_tokens += sum(c.count for c in chunks)
        ready, first = [], 0  # (run, the index of its first row in `hidden`) of each run that samples
        for entry, complete in sampled:
            if complete:
                ready.append((entry[2], first))
            first += len(entry[2].rows)
        self._sample(ready, hidden)
        since = self._clock("sample", since)
        if self._parked and (len(self._parked) >= PARK_ROUND or self.steps - self._parked[0].since >= PARK_WAIT):
            self._redo_parked()
            since = self._clock("controller", since)
        done = self._ended(runs, earlier)
        self._clock("sample", since)
        return done

    def _redo_parked(self) -> None:
        """The injected runs waiting: their thinks as one batch, then their control tokens and the token
        each took back in one pass, and each samples from there."""
        parked, self._parked = self._parked, []
        controls = type(parked[0].pick.verdicts).control_tokens([entry.pick for entry in parked])
        redo, ready = [], []
        for entry, control in zip(parked, controls):
            ready.append((entry.run, len(redo)))
            for row, token in zip(entry.run.rows, entry.tokens):
                redo.append(Chunk(row.sequence, torch.cat([control.to(token.dtype), token]), 0, control.shape[0] + 1))
        hidden = self._feed(redo, True)  # every redo chunk: the control tokens and one token
        self.redo_passes += 1
        if self.profile and hidden.is_cuda:
            torch.cuda.synchronize(hidden.device)
        self._sample(ready, hidden)

    def _feed(self, chunks: list[Chunk], fixed: bool) -> torch.Tensor:
        """One pass over `chunks`: the hidden state after each one's last token. `fixed`: the chunks
        are of one length (one-token steps, redos), so they run at fixed shapes (`graphs.DecodeSteps`)
        where the loop runs those; a step's prefill chunks vary too much in length for a graph each."""
        if fixed and self.decode_steps is not None:
            return self.decode_steps(chunks)
        return mixed_step(self.model, self.pool, chunks)

    def _ended(self, runs: list, earlier: list["_ReadBack"]) -> list:
        """The runs done (removed from `runs`) once the text tokens of the step before are read back:
        by then this step is queued, so the device does not wait for the host while it reads."""
        for read_back in earlier:
            read_back.deliver()
        done = [entry for entry in runs if entry[2].done]
        for entry in done:
            runs.remove(entry)
        return done

    def _sample(self, ready: list, hidden: torch.Tensor) -> None:
        """Samples a token for every run in `ready` ((run, its first row in `hidden`)), a group per
        rule, each group's rows gathered at once."""
        groups: dict[tuple, list] = {}
        for run, first in ready:
            rule = ("text", run.stage.temperature) if isinstance(run, TextRun) else ("image", id(run.stage.settings))
            groups.setdefault(rule, []).append((run, first))
        device = self.bundle.device
        for rule, members in groups.items():
            runs = [run for run, _ in members]
            group_hidden = gather_rows([(hidden, first, len(run.rows)) for run, first in members])
            steps = to_device([run.step for run in runs], torch.long, device)
            if rule[0] == "text":
                seeds = to_device([run.stage.prompt.seed for run in runs], torch.long, device)
                tokens = sample_tokens(self.bundle.text_logits(group_hidden), seeds, steps, rule[1],
                                       stream=STREAM_TEXT, kernels=self.model.kernels)
                embeds = self.bundle.embed_text(tokens)  # the group's tokens embedded at once
                for i, run in enumerate(runs):
                    run.accept(embeds, i)
                self._unread.append(_ReadBack(runs, tokens))
            else:
                seeds = to_device([run.stage.seed for run in runs], torch.long, device)
                settings = runs[0].stage.settings  # the group's: one settings object
                logits, tokens = draw_image_step(self.bundle, group_hidden, seeds, steps, settings,
                                                 self.model.kernels)
                verdicts = _take_image_tokens(runs, group_hidden[0::2], logits, tokens,
                                              self.bundle.embed_image_codes(tokens))
                if verdicts is not None:
                    self._verdicts.append(verdicts)


def _take_image_tokens(runs: list[ImageRun], hidden: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor,
                       embeds: torch.Tensor) -> "_Verdicts | None":
    """Each image run takes its token (left on the device). The watched runs' triggers are evaluated
    together (`observe_together` of their watches' kind); their verdicts are read a step later."""
    for i, run in enumerate(runs):
        run.accept(tokens, embeds, i)
    watched = [run for run in runs if run.stage.watch is not None]
    if not watched:
        return None
    watches = [run.stage.watch for run in watched]
    index = to_device([i for i, run in enumerate(runs) if run.stage.watch is not None], torch.long, hidden.device)
    verdicts = type(watches[0]).observe_together(watches, [run.step - 1 for run in watched], hidden[index],
                                                 logits[index])
    return _Verdicts(watched, verdicts)


class _Verdicts:
    """The controller's verdicts on one step's image tokens, read once the next step is queued. A run
    injected there has fed its token in that next step already: `park` takes the token back."""

    def __init__(self, runs: list[ImageRun], verdicts):
        self.runs, self.verdicts = runs, verdicts

    def park(self, chunks: list[Chunk], first_row: dict[int, int], step: int) -> list["_Parked"]:
        """The runs injected, each row's token of this step (`chunks`, a run's rows from `first_row`)
        taken back, to wait for their redo. A run whose band is over gets no control tokens (nothing
        would read them)."""
        parked = []
        for pick in self.verdicts.injected([not run.done for run in self.runs]):
            run = self.runs[pick.index]
            first, tokens = first_row[id(run)], []
            for r, row in enumerate(run.rows):
                chunk = chunks[first + r]
                row.sequence.rewind(1)
                tokens.append(chunk.source[chunk.first:chunk.first + 1])
            parked.append(_Parked(run, pick, tokens, step))
        return parked


class _Parked:
    """An injected run waiting for its redo: its verdict (`pick`), the input embedding [1, D] each of
    its rows took back, and the step it began to wait at."""

    def __init__(self, run: ImageRun, pick, tokens: list[torch.Tensor], since: int):
        self.run, self.pick, self.tokens, self.since = run, pick, tokens, since


class _ReadBack:
    """One step's text tokens on their way to the host; `deliver` waits for that copy alone and hands
    each run its token."""

    def __init__(self, runs: list[TextRun], tokens: torch.Tensor):
        self.runs, self.tokens = runs, HostCopy(tokens)

    def deliver(self) -> None:
        for run, token in zip(self.runs, self.tokens.values().tolist()):
            run.read(token)


def _call_together(calls: list[HostCall]) -> list:
    """Each call's result, every call of one `batch` made as one."""
    by_batch: dict = {}
    for index, call in enumerate(calls):
        by_batch.setdefault(call.batch, []).append(index)
    results: list = [None] * len(calls)
    for batch, members in by_batch.items():
        for index, result in zip(members, batch([calls[i].item for i in members])):
            results[index] = result
    return results
