"""The report's small parts: throughput binning, plots, thumbnails, URI -> key, control characters."""
import io
import math

import pytest
from PIL import Image

from twig_batch.io.storage import LocalStorage
from twig_batch.report import plots, thumbnails
from twig_batch.report.render import _bands, visible_text
from twig_batch.report.run_data import object_key


def png(width, height, colour=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_throughput_bins_finish_times_from_the_attempt_start():
    series = plots.throughput([110.0, 110.5, 111.0, 120.0], started=100.0)
    assert series.bin_s == 1.0 and len(series.starts) == 21 and series.starts[10] == 10.0
    assert series.rates[10] == 2 and series.rates[11] == 1 and series.rates[20] == 1 and sum(series.rates) == 4
    assert series.average_at == [10.0, 10.5, 11.0, 20.0] and series.average[-1] == pytest.approx(4 / 20)
    long = plots.throughput([float(t) for t in range(0, 4001, 10)], bins=40)
    assert long.bin_s == 100.0 and len(long.rates) == 41 and long.rates[3] == pytest.approx(0.1)
    assert plots.throughput([]) is None
    assert math.isnan(plots.throughput([5.0]).average[0])  # one image at the very start has no rate yet


def test_plots_are_small_pngs():
    records = [{"band": b, "attempt": a, "step": s, "s_t": math.sin(s / 9), "delta_s": 0.0, "var_s": 0.0,
                "u_t": 3 + math.cos(s / 7), "fired": s % 5 == 0, "forced": False, "injected": s % 40 == 0}
               for b, a, steps in ((0, 0, range(8, 64)), (1, 0, range(64, 128)), (1, 1, range(64, 128)))
               for s in steps]
    trace = plots.plot_trigger_trace(records)
    with Image.open(io.BytesIO(trace)) as image:
        assert image.format == "PNG" and image.size == (360, 150) and image.mode == "P"
    assert len(trace) < 12_000 and plots.plot_trigger_trace([]) is None
    chart = plots.plot_throughput(plots.throughput([float(t) for t in range(100)]))
    with Image.open(io.BytesIO(chart)) as image:
        assert image.size == (520, 200)


def test_thumbnails_shrink_to_their_box_and_never_enlarge():
    grid = thumbnails.grid_thumbnail(png(384, 384))
    band = thumbnails.band_thumbnail(png(384, 128))
    tiny = thumbnails.grid_thumbnail(png(96, 96))
    assert (grid.width, grid.height) == (160, 160) and (band.width, band.height) == (128, 43)
    assert (tiny.width, tiny.height) == (96, 96)
    for thumb in (grid, band, tiny):
        assert thumb.src.startswith("data:image/jpeg;base64,") and thumb.size_bytes < 8_000


def test_manifest_uris_map_back_to_keys(tmp_path):
    storage = LocalStorage(tmp_path / "run")
    key = "images/ab/cube-ab12/sample-0000.png"
    assert object_key(storage, storage.uri(key)) == key
    assert object_key(storage, f"/old/place/run/{key}") == key  # a run copied elsewhere
    assert object_key(storage, f"s3://bucket/prefix/{key}") == key  # synced down from S3
    assert object_key(storage, "/somewhere/else.png") is None and object_key(storage, None) is None


def test_bands_pair_a_redraw_with_the_drawing_it_replaced():
    row = {"thoughts": ["first", "second, improved", "third"], "reflections_json":
           '[{"band": 0, "score": 95.0, "accepted": true}, {"band": 1, "score": 20.0, "accepted": false,'
           ' "improved": "second, improved"}, {"band": 2, "score": null, "accepted": true, "problem": "unparseable"}]'}
    stages = [("band-1-of-3", png(8, 3)), ("band-2-of-3", png(8, 6)), ("band-2-of-3-redrawn", png(8, 6)),
              ("band-3-of-3", None), ("sketch", png(8, 8))]
    bands = _bands(row, stages)
    assert [b.title for b in bands] == ["band 1 of 3", "band 2 of 3", "band 3 of 3", "sketch"]
    assert [[d["caption"] for d in b.drawings] for b in bands] == [
        ["drawn"], ["before redraw", "after redraw"], ["drawn"], ["sketch"]]
    assert bands[2].drawings[0]["thumb"] is None  # missing object: a placeholder, not a broken image
    assert [b.thought for b in bands] == ["first", "second, improved", "third", None]
    assert [b.reflection and b.reflection["score"] for b in bands] == [95.0, 20.0, None, None]
    assert bands[0].reflection == {"score": 95.0, "accepted": True, "problem": None, "improved": None, "answer": None}


def test_control_characters_become_visible():
    assert visible_text("a\x0fb\nc\td\x7f") == "a\ufffdb\nc\td\ufffd" and visible_text(None) is None
