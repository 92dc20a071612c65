"""An engine's KV-cache buffers, one per dtype, lent to call after call (`KVArenas`).

A fresh cache per call costs an allocation and a zero fill of tens of GB, and worse, every CUDA graph
captured over it dies with it: a staged batch of 128 images used to capture about thirty graphs per
batch. Caches carved from one persistent buffer keep their addresses from call to call, so a graph
captured over a cache of some row count is replayed by every later call of that row count
(the engine's `graphs.KeptGraphs` keeps them). The engine (`runner.py`) owns its arenas; nothing
else holds one.

The buffer is lent to one cache at a time: the engines give it back when their call ends (a weak
reference to the holder covers any cache that is simply dropped); a cache asked for while it is
lent gets memory of its own. A lent cache is as wide as the buffer allows for its row count,
never narrower than asked, so each row count always gets the same shape. Old contents need no
clearing: a lent cache's validity flags start all False, so no query reads a column this call has not
written, and the buffer is zero-filled once when allocated, so stale columns hold finite numbers whose
attention weight is exactly zero.
"""
from __future__ import annotations

import weakref

import torch


class KVArena:
    def __init__(self, device: torch.device, dtype: torch.dtype, on_release=None):
        self.device, self.dtype, self.on_release = device, dtype, on_release
        self.buffer: torch.Tensor | None = None  # flat, zero-filled at allocation
        self._holder: weakref.ref | None = None
        self._valid: dict[tuple[int, int], torch.Tensor] = {}  # (rows, width) -> flags, kept for the graphs

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()

    def lent(self) -> bool:
        return self._holder is not None and self._holder() is not None

    def lend(self, holder, layers: int, rows: int, kv_heads: int, head_dim: int, min_width: int):
        """(k, v, valid) for `holder`, k and v [layers, rows, kv_heads, width, head_dim] with
        width >= min_width, valid [rows, width] all False; None while another holder has them."""
        if self.lent():
            return None
        per_column = layers * rows * kv_heads * head_dim  # elements of k (or v) per cache column
        if self.buffer is None or self.buffer.numel() < 2 * per_column * min_width:
            self._replace(2 * per_column * min_width)
        width = self.buffer.numel() // (2 * per_column)
        size = per_column * width
        shape = (layers, rows, kv_heads, width, head_dim)
        k, v = self.buffer[:size].view(shape), self.buffer[size:2 * size].view(shape)
        valid = self._valid.get((rows, width))
        if valid is None:
            valid = self._valid[(rows, width)] = torch.zeros((rows, width), dtype=torch.bool, device=self.device)
        valid.zero_()
        self._holder = weakref.ref(holder)
        return k, v, valid

    def give_back(self, holder) -> None:
        """`holder` is done with the buffer (a cache that ended, or copied its rows elsewhere)."""
        if self._holder is not None and self._holder() is holder:
            self._holder = None

    def reserve(self, nbytes: int) -> None:
        """Grow the buffer to `nbytes` now (when idle), so that calls up to that size never replace
        it, and never drop the graphs kept over it, later."""
        if not self.lent() and self.nbytes < nbytes:
            self._replace(-(-nbytes // self.dtype.itemsize))

    def release(self) -> None:
        """Give the memory back (nothing may hold a cache from it)."""
        if self.lent():
            raise RuntimeError("the KV arena is still lent to a live cache")
        if self.on_release is not None:
            self.on_release(self)
        self.buffer, self._valid = None, {}

    def _replace(self, elements: int) -> None:
        # Drop the old buffer first, so growing never needs the old and the new at once.
        self.release()
        self.buffer = torch.zeros(elements, dtype=self.dtype, device=self.device)


class KVArenas:
    """One engine's arenas on its device, one per dtype (the model's, and fp8's values and scales).
    `on_release(arena)` runs before any of them drops its buffer (the engine forgets the graphs
    captured over it)."""

    def __init__(self, device: torch.device, on_release=None):
        self.device, self.on_release = torch.device(device), on_release
        self._arenas: dict[torch.dtype, KVArena] = {}

    def for_dtype(self, dtype: torch.dtype) -> KVArena:
        if dtype not in self._arenas:
            self._arenas[dtype] = KVArena(self.device, dtype, self.on_release)
        return self._arenas[dtype]

    def idle_bytes(self) -> int:
        """Memory the arenas hold but nobody is using: free for the next call's cache."""
        return sum(a.nbytes for a in self._arenas.values() if not a.lent())

    def release(self) -> None:
        """Free every idle arena (e.g. after an out-of-memory error, before sizing again)."""
        for arena in self._arenas.values():
            if not arena.lent():
                arena.release()
