"""KV memory by actual length: a pool of fixed-size pages that sequences take as they grow.

Every layer's keys and values live in one tensor per kind, [layers, pages * page_size, kv_heads,
head_dim]: a sequence's token j sits in slot `table[j // page_size] * page_size + j % page_size`, so
a sequence holds only the pages its tokens fill, whatever the others hold, and gives them back the
moment it ends. What a sequence may still need is reserved (`Reservation`) when its stage is admitted,
so a sequence that started is never cut short for lack of pages: admission is where a stage waits.
Sequences that begin with the same tokens (two questions about one picture) may hold the same full
pages of that beginning: a page is free again once the last sequence holding it lets it go.
"""
from __future__ import annotations

import torch


class PagePool:
    """`pages` pages of `page_size` token slots each, for every layer of `lm`."""

    def __init__(self, lm, pages: int, page_size: int, device=None, dtype=None):
        if pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs at least one page of one slot, got {pages} x {page_size}")
        cfg = lm.config
        weight = lm.embed_tokens.weight
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.pages, self.page_size = pages, page_size
        # One page more, never handed out: rows that only pad a fixed-shape step write there.
        self.scratch_page = pages
        device = weight.device if device is None else device
        shape = (cfg.num_hidden_layers, (pages + 1) * page_size, self.kv_heads, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype or weight.dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self._free = list(range(pages - 1, -1, -1))  # popped from the end: page 0 first
        self.reserved = 0  # pages promised to admitted stages and not yet taken
        self._sharers: dict[int, int] = {}  # page -> sequences holding it beside the one that filled it

    @classmethod
    def bytes_per_page(cls, lm, page_size: int, dtype: torch.dtype) -> int:
        cfg = lm.config
        kv_heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * page_size * kv_heads * head_dim * dtype.itemsize

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def available(self) -> int:
        """Pages neither taken nor promised."""
        return len(self._free) - self.reserved

    def reserve(self, pages: int) -> "Reservation | None":
        """A promise of `pages` pages, or None when fewer are available."""
        if pages > self.available:
            return None
        self.reserved += pages
        return Reservation(self, pages)

    def _take(self) -> int:
        return self._free.pop()

    def _share(self, pages: list[int]) -> None:
        for page in pages:
            self._sharers[page] = self._sharers.get(page, 0) + 1

    def _give_back(self, pages: list[int]) -> None:
        """Pages a sequence lets go of: free once no other sequence holds them."""
        freed = []
        for page in pages:
            sharers = self._sharers.get(page, 0)
            if sharers:
                if sharers == 1:
                    del self._sharers[page]
                else:
                    self._sharers[page] = sharers - 1
            else:
                freed.append(page)
        self._free.extend(reversed(freed))


class Reservation:
    """Pages promised to one stage, taken one at a time by its sequences as they grow."""

    def __init__(self, pool: PagePool, pages: int):
        self.pool, self.left = pool, pages

    def take(self) -> int:
        if self.left < 1:
            raise RuntimeError("a sequence grew past the pages its stage reserved")
        self.left -= 1
        self.pool.reserved -= 1
        return self.pool._take()

    def close(self) -> None:
        """The stage is over: what it did not take is available again."""
        self.pool.reserved -= self.left
        self.left = 0


class PagedSequence:
    """One row of KV: its page table and how many tokens it holds, growing through `reservation`."""

    def __init__(self, pool: PagePool, reservation: Reservation):
        self.pool, self.reservation = pool, reservation
        self.table: list[int] = []
        self.length = 0

    def slots_for(self, count: int) -> list[int]:
        """The slots of the next `count` tokens (pages taken as needed); `length` moves on."""
        size = self.pool.page_size
        slots = []
        for j in range(self.length, self.length + count):
            if j // size == len(self.table):
                self.table.append(self.reservation.take())
            slots.append(self.table[j // size] * size + j % size)
        self.length += count
        return slots

    def share(self, other: "PagedSequence", pages: int) -> None:
        """Begins with the first `pages` full pages of `other` (the same tokens at the same positions,
        written by `other`): it holds them too, and writes its own tokens on pages of its own."""
        if self.table or pages * self.pool.page_size > other.length:
            raise ValueError("a sequence shares pages another has filled, before it holds any of its own")
        self.table = other.table[:pages]
        self.length = pages * self.pool.page_size
        self.pool._share(self.table)

    def rewind(self, count: int) -> None:
        """Forget its last `count` tokens (their pages stay: the tokens fed next overwrite their slots)."""
        self.length -= count

    def slots(self) -> list[int]:
        """Every slot it holds, in token order."""
        size = self.pool.page_size
        return [self.table[j // size] * size + j % size for j in range(self.length)]

    def free(self) -> None:
        self.pool._give_back(self.table)
        self.table, self.length = [], 0
