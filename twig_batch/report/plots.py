"""The report's two plots: images/s over the run, and one image's trigger trace.

matplotlib draws them (its object API with the Agg canvas: no pyplot state, no display, safe in a
headless job) as small PNGs, reduced to a palette. PNG rather than SVG because a trigger trace has
hundreds of points per image: as SVG a 1,000-image report would carry hundreds of thousands of
path vertices, as palette PNGs it carries a few kilobytes per plot.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory
from PIL import Image

DPI = 100
S_COLOUR, U_COLOUR, FIRE_COLOUR, INJECT_COLOUR = "#1f5fa8", "#5b9a3c", "#e08a1e", "#c0392b"


@dataclass(frozen=True, slots=True)
class Throughput:
    bin_s: float  # width of one bin in seconds
    starts: list[float]  # bin starts, seconds since the run started
    rates: list[float]  # images/s finished in each bin
    average_at: list[float]  # finish times, seconds since the run started
    average: list[float]  # images/s averaged from the start up to each finish


def throughput(finished: list[float], started: float | None = None, bins: int = 40) -> Throughput | None:
    """Images/s over time from the rows' finish times (POSIX seconds); bins are at least one second."""
    if not finished:
        return None
    finished = sorted(finished)
    origin = min(started, finished[0]) if started is not None else finished[0]
    span = finished[-1] - origin
    width = max(span / bins, 1.0)
    count = max(1, math.ceil(span / width + 1e-9))
    counts = [0] * count
    for t in finished:
        counts[min(count - 1, int((t - origin) / width))] += 1
    elapsed = [t - origin for t in finished]
    average = [(i + 1) / e if e > 0 else float("nan") for i, e in enumerate(elapsed)]
    return Throughput(width, [i * width for i in range(count)], [c / width for c in counts], elapsed, average)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        small = io.BytesIO()
        image.convert("RGB").quantize(colors=48).save(small, format="PNG", optimize=True)
    return small.getvalue()


def _style(axes, size: int = 7) -> None:
    axes.tick_params(labelsize=size, length=2, pad=1)
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)


def plot_throughput(series: Throughput) -> bytes:
    figure = Figure(figsize=(5.2, 2.0), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    axes.bar(series.starts, series.rates, width=series.bin_s, align="edge", color="#9ec1e6",
             label=f"images/s per {series.bin_s:.3g} s")
    axes.plot(series.average_at, series.average, color=S_COLOUR, linewidth=1.4, label="average since start")
    axes.set_xlabel("seconds since the run started", fontsize=8)
    axes.set_ylabel("images/s", fontsize=8)
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    axes.legend(fontsize=7, frameon=False, loc="upper left")
    _style(axes)
    return _png(figure)


def _segments(records: list[dict]):
    """Consecutive runs of one (band, attempt): a redrawn band repeats its steps as attempt 1."""
    segment: list[dict] = []
    for record in records:
        if segment and (record["band"], record.get("attempt", 0)) != (segment[-1]["band"], segment[-1].get("attempt", 0)):
            yield segment
            segment = []
        segment.append(record)
    if segment:
        yield segment


def plot_trigger_trace(records: list[dict]) -> bytes | None:
    """s_t (left axis) and u_t (right axis) over the decode steps; fires as ticks, injections as lines."""
    if not records:
        return None
    # Fixed margins: a layout engine would cost more than the drawing, a thousand times over.
    figure = Figure(figsize=(3.6, 1.5), dpi=DPI)
    figure.subplots_adjust(left=0.17, right=0.83, bottom=0.24, top=0.95)
    similarity = figure.add_subplot()
    entropy = similarity.twinx()
    for segment in _segments(records):
        steps = [r["step"] for r in segment]
        dash = "--" if segment[0].get("attempt", 0) else "-"
        similarity.plot(steps, [r["s_t"] for r in segment], dash, color=S_COLOUR, linewidth=0.9)
        entropy.plot(steps, [r["u_t"] for r in segment], dash, color=U_COLOUR, linewidth=0.9)
    at_bottom = blended_transform_factory(similarity.transData, similarity.transAxes)
    fired = [r["step"] for r in records if r["fired"]]
    if fired:
        similarity.scatter(fired, [0.02] * len(fired), marker="|", s=14, linewidths=0.6, color=FIRE_COLOUR,
                           transform=at_bottom, clip_on=False, zorder=3)
    # One collection per kind of marker, not one artist per line: a thousand plots add up.
    band_starts = [segment[0]["step"] for segment in _segments(records)]
    similarity.vlines(band_starts, 0, 1, transform=at_bottom, colors="#bbbbbb", linewidths=0.5, linestyles=":")
    injected = [r["step"] for r in records if r["injected"]]
    if injected:
        similarity.vlines(injected, 0, 1, transform=at_bottom, colors=INJECT_COLOUR, linewidths=0.8, alpha=0.8)
    similarity.set_ylabel("s_t", fontsize=7, color=S_COLOUR, labelpad=1)
    entropy.set_ylabel("u_t", fontsize=7, color=U_COLOUR, labelpad=1)
    similarity.set_xlabel("step", fontsize=7, labelpad=1)
    _style(similarity, 6)
    entropy.tick_params(labelsize=6, length=2, pad=1)
    entropy.spines["top"].set_visible(False)
    return _png(figure)
