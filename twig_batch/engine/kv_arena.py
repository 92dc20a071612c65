"""One KV-cache buffer per device and dtype, lent to call after call.

A fresh cache per call costs an allocation and a zero fill of tens of GB, and worse, every CUDA graph
captured over it dies with it: a staged batch of 128 images used to capture about thirty graphs per
batch. Caches carved from one persistent buffer keep their addresses from call to call, so a graph
captured over a cache of some row count is replayed by every later call of that row count
(`graphs.py` keeps them).

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
    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
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
        for hook in _RELEASE_HOOKS:
            hook(self)
        self.buffer, self._valid = None, {}

    def _replace(self, elements: int) -> None:
        # Drop the old buffer first, so growing never needs the old and the new at once.
        self.release()
        self.buffer = torch.zeros(elements, dtype=self.dtype, device=self.device)


_RELEASE_HOOKS: list = []


def on_release(hook) -> None:
    """`hook(arena)` runs before an arena drops its buffer (e.g. to forget graphs captured over it)."""
    _RELEASE_HOOKS.append(hook)


_ARENAS: dict[tuple[str, torch.dtype], KVArena] = {}


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one arena
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def arena_for(device: torch.device, dtype: torch.dtype) -> KVArena:
    key = (_device_name(device), dtype)
    if key not in _ARENAS:
        _ARENAS[key] = KVArena(torch.device(device), dtype)
    return _ARENAS[key]


def idle_arena_bytes(device: torch.device) -> int:
    """Memory the arenas of `device` hold but nobody is using: free for the next call's cache."""
    name = _device_name(device)
    return sum(a.nbytes for (d, _), a in _ARENAS.items() if d == name and not a.lent())


def release_arenas() -> None:
    """Free every idle arena (e.g. before sizing a workload from free memory)."""
    for arena in _ARENAS.values():
        if not arena.lent():
            arena.release()
