"""What an image's program asks the mixed loop for, and how each ask runs there.

A program (`pipeline/programs.py`) asks for stages: a text (`TextStage`, one sequence, language
head), a band of image tokens (`ImageStage`, a CFG pair of sequences, generation head), or work beside
the model (`HostCall`, made by the loop for many programs at once). Each model stage
runs as a `TextRun` or an `ImageRun`: its sequences' prompt waits to be prefilled (in chunks, by the
loop), then each sampled token is fed back until the stage ends. A run knows what it still has to
feed (`pending`), what it needs of the page pool, and when it is done; the loop decides when it runs
and samples for it, many runs at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from twig_batch.engine.inputs import TextPrompt, embed_prompts
from twig_batch.engine.transfer import to_device
from twig_batch.engine.mixed.pages import PagedSequence, PagePool
from twig_batch.engine.mixed.step import Chunk, gather_rows
from twig_batch.prompts import unconditional_ids
from twig_batch.settings import GenerationSettings


@dataclass(frozen=True)
class TextStage:
    """Up to `max_new_tokens` tokens after `prompt` (fewer by its `stop_after`), until the stop token."""
    prompt: TextPrompt
    max_new_tokens: int
    temperature: float = 0.0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"a text stage writes at least one token, got max_new_tokens={self.max_new_tokens}")


@dataclass(frozen=True)
class ImageStage:
    """`n_tokens` image tokens of one image whose conditional row is `cond_ids` followed by the image's
    `prefix_codes` [n0] drawn so far; noise steps count from `first_step`. `watch` (the latent
    controller's `BandWatch`) hears every token and may inject control tokens after any of them."""
    cond_ids: list[int]
    seed: int
    settings: GenerationSettings
    n_tokens: int
    prefix_codes: torch.Tensor | None = None
    first_step: int = 0
    watch: object | None = None


@dataclass(frozen=True)
class HostCall:
    """Work a program needs beside the model's steps (a band decoded, a canvas seen by the vision
    model) that costs less for many images at once: the loop makes one call of `batch` over the
    `item`s of every program waiting on the same `batch`, which returns one result per item."""
    batch: object
    item: object


class _Row:
    """One sequence of a run and the input it still has to feed: rows `first` .. `first + left` of
    `source` [n, D] (its prompt's embeddings, or the embeddings a step drew for many rows)."""

    def __init__(self, sequence: PagedSequence, source: torch.Tensor):
        self.sequence = sequence
        self.feed(source, 0, source.shape[0])

    def take(self, count: int) -> Chunk:
        chunk = Chunk(self.sequence, self.source, self.first, count)
        self.first += count
        self.left -= count
        return chunk

    def feed(self, source: torch.Tensor, first: int, count: int) -> None:
        """Rows `first` .. `first + count` of `source` to feed next, right after everything fed so far."""
        self.source, self.first, self.left = source, first, count


class _Run:
    rows: list[_Row]

    def __init__(self, pool: PagePool, tokens_per_row: int, row_count: int, shared_pages: int = 0):
        self.reservation = pool.reserve(row_count * pool.pages_for(tokens_per_row) - shared_pages)
        self.pool = pool

    @property
    def admitted(self) -> bool:
        return self.reservation is not None

    @property
    def pending(self) -> int:
        """Tokens each row still has to feed before the run samples again."""
        return self.rows[0].left

    def may_feed(self) -> bool:
        """Whether its rows may feed in the step being built."""
        return True

    def close(self) -> None:
        for row in self.rows:
            row.sequence.free()
        self.reservation.close()
        watch = getattr(self.stage, "watch", None)
        if watch is not None:
            watch.close()


class TextRun(_Run):
    def __init__(self, stage: TextStage, bundle, pool: PagePool, stop: int, leader: "TextRun | None" = None,
                 shared_pages: int = 0):
        """`leader`: a text run admitted before it whose prompt begins with the same tokens for
        `shared_pages` full pages (the same picture): this run holds those pages of the leader's
        instead of writing its own, and feeds from there once the leader has written them."""
        self.stage, self.bundle, self.stop = stage, bundle, stop
        self.budget = stage.prompt.budget(stage.max_new_tokens)
        ids = stage.prompt.ids
        self.leader = leader if shared_pages else None
        self.shared_pages = shared_pages if self.leader else 0
        # the last token is never fed back
        super().__init__(pool, len(ids) + self.budget - 1, 1, self.shared_pages)
        self.written: list[int] = []
        self.drawn = 0  # tokens drawn so far, read back or not
        self.done = False
        if self.admitted:
            ids_tensor = to_device([ids], torch.long, bundle.device)
            embeds = embed_prompts(bundle, ids_tensor, [stage.prompt])[0]
            self.rows = [_Row(PagedSequence(pool, self.reservation), embeds)]
            shared = self.shared_pages * pool.page_size
            self.rows[0].feed(embeds, shared, len(ids) - shared)

    def may_feed(self) -> bool:
        """A run sharing its leader's pages feeds once the leader has written them (in an earlier
        step), and takes them then."""
        if self.leader is None:
            return True
        leading = self.leader.rows[0].sequence
        if leading.length < self.shared_pages * self.pool.page_size:
            return False
        self.rows[0].sequence.share(leading, self.shared_pages)
        self.leader = None
        return True

    @property
    def step(self) -> int:
        """The index of the token it samples next (its noise step)."""
        return self.drawn

    def accept(self, embeds: torch.Tensor, row: int) -> None:
        """A token was drawn (its value is read back later, `read`); row `row` of `embeds` [n, D] is
        its input embedding, fed next unless the budget is drawn: a text goes on as if the token were
        not the stop token, and what it draws after a stop token is dropped when the stop is read."""
        self.drawn += 1
        if self.drawn < self.budget:
            self.rows[0].feed(embeds, row, 1)

    def read(self, token: int) -> None:
        """The value of its next drawn token, read back from the device."""
        if self.done:
            return  # drawn after its stop token
        if token == self.stop:
            self.done = True
            return
        self.written.append(token)
        self.done = len(self.written) == self.budget

    def result(self) -> list[int]:
        return self.written


class ImageRun(_Run):
    def __init__(self, stage: ImageStage, bundle, pool: PagePool):
        self.stage, self.bundle = stage, bundle
        prefix = 0 if stage.prefix_codes is None else stage.prefix_codes.numel()
        control = 0 if stage.watch is None else stage.watch.max_control_slots
        super().__init__(pool, len(stage.cond_ids) + prefix + control + stage.n_tokens - 1, 2)
        # Each token as the device drew it (row i of its step's tokens): an image's codes are read
        # back once, when its band is done, so a step never waits for the device to know them.
        self.codes: list[tuple[torch.Tensor, int]] = []
        self.done = False
        if self.admitted:
            pair = to_device([stage.cond_ids, unconditional_ids(stage.cond_ids, bundle.tokens.pad)], torch.long,
                             bundle.device)
            embeds = bundle.embed_text(pair)
            if prefix:
                image = bundle.embed_image_codes(to_device(stage.prefix_codes, torch.long, bundle.device).view(1, -1))
                embeds = torch.cat([embeds, image.expand(2, -1, -1)], dim=1)
            self.rows = [_Row(PagedSequence(pool, self.reservation), e) for e in embeds]

    @property
    def step(self) -> int:
        return self.stage.first_step + len(self.codes)

    def accept(self, tokens: torch.Tensor, embeds: torch.Tensor, row: int) -> None:
        """Row `row` of a step's `tokens` [n] was drawn for it, row `row` of `embeds` [n, D] is its
        input embedding (fed next, unless it was the last; the loop puts the controller's control
        tokens before it when they come)."""
        self.codes.append((tokens, row))
        if len(self.codes) == self.stage.n_tokens:
            self.done = True
            return
        for sequence_row in self.rows:
            sequence_row.feed(embeds, row, 1)

    def result(self) -> torch.Tensor:
        """The band's codes [n_tokens], left on the device (reading them would wait for every step
        queued): a program that needs their values reads them when it is done."""
        return gather_rows([(tokens, row, 1) for tokens, row in self.codes]).long()
