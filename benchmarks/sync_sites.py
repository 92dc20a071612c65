"""Where a run makes the host wait for the device: every synchronizing CUDA call, counted by the
place in twig_batch that made it (torch's sync debug mode, which warns at each one).

A wait inside a loop that should keep the device fed costs the device's idle time until the host has
queued the next work; this finds them. It slows the host (a stack per wait): time nothing under it.
"""
from __future__ import annotations

import traceback
import warnings
from collections import Counter
from contextlib import contextmanager

import torch


@contextmanager
def counted_syncs():
    """Yields a Counter of "file:line function" (the innermost twig_batch frame, else the innermost
    frame of the caller's code) -> synchronizing calls made there while the block runs."""
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        if frames and frames[-1].name == "set_sync_debug_mode":  # leaving the debug mode, not the run
            return
        ours = [f for f in frames if "twig_batch" in f.filename] or frames
        frame = ours[-1]
        sites[f"{frame.filename.split('twig_batch/')[-1]}:{frame.lineno} {frame.name}"] += 1

    shown = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
