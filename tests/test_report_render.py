"""The report of a run written through the io writers from real staged results with a redraw:
before/after band images, scores, thoughts, a trace with a redrawn band, an unfinished run, a moved
run, a missing object, and --limit."""
import base64
import io
import json
import re
import shutil

import pytest
import torch
from PIL import Image

from twig_batch.controller import ControllerConfig, LatentController
from twig_batch.controller.weights import shared_controller_net
from twig_batch.io import layout
from twig_batch.io.artifacts import write_result
from twig_batch.io.manifest import ManifestJournal, consolidate, error_row, rows_to_table
from twig_batch.io.run_info import write_complete_marker, write_run_info
from twig_batch.io.storage import LocalStorage
from twig_batch.model import load_janus
from twig_batch.pipeline import ImageRequest
from twig_batch.pipeline.staged import generate_staged
from twig_batch.report import build_report
from twig_batch.settings import GenerationSettings

IMPROVED = "a brighter red cube, centred"
TREE = "tree &amp; &lt;moon&gt;"  # as the page must show it


class RejectSecondBandOfFirstPrompt:
    def reflect(self, bundle, requests, settings):
        return [f"Score: 30\nBetter: {IMPROVED}" if (r.prompt, r.band) == ("a red cube", 1) else
                "Score: 95\nBetter: keep it" for r in requests]


@pytest.fixture(scope="module")
def written_run(tiny_hf_dir, tmp_path_factory):
    """An unfinished run: run.json says running, the rows sit in a journal part, no completion marker."""
    bundle = load_janus(str(tiny_hf_dir), "cpu", torch.float32)
    bundle.model.config.vq_config.num_patches = 6  # a 6 x 6 token grid (24 px): 3 bands of 2 rows, quick
    controller = ControllerConfig(force_every=3, min_gap=3, min_history=4)
    settings = GenerationSettings(mode="twig", bands=3, think_max_tokens=3, controller=controller)
    requests = [ImageRequest("cube", "a red cube", 0, 11), ImageRequest("a/b <x>", "tree & <moon>", 0, 12)]
    observer = LatentController(bundle, [r.prompt for r in requests], settings.controller,
                                weights=shared_controller_net(bundle, settings.controller))
    results = generate_staged(bundle, requests, settings, observer, scorer=RejectSecondBandOfFirstPrompt())
    dest = tmp_path_factory.mktemp("written") / "run"
    storage = LocalStorage(dest)
    write_run_info(storage, {"model": "tiny", "mode": "twig", "settings": settings.to_dict(), "base_seed": 0,
                             "status": "running", "attempts": [{"attempt": "a1", "started_at": "2026-01-01T00:00:00+00:00"}]})
    rows = [write_result(storage, result, "tiny", 1.5, controller_ran=True) for result in results]
    rows.append(error_row("empty", "", 0, 5, "twig", "tiny", "prompt is empty"))
    journal = ManifestJournal(storage, "a1")
    journal.add(rows_to_table(rows))
    journal.flush()
    return dest, results


def decoded(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def band_row(html: str, prompt: str, band: int) -> str:
    [section] = [a for a in html.split('<article class="image"')[1:] if f"<h3>{prompt}</h3>" in a]
    return section.split("<tr>")[band + 2].split("</tr>")[0]


def test_a_redrawn_band_shows_before_and_after_with_its_score_and_new_thought(written_run):
    dest, results = written_run
    assert results[0].redrawn_bands == [1] and results[1].redrawn_bands == []
    html, count = build_report(str(dest))
    assert count == html.count("<img ") == 1 + (1 + 4 + 1) + (1 + 3 + 1)
    redrawn = band_row(html, "a red cube", 1)
    assert ">band 2 of 3<" in redrawn and redrawn.count("<img ") == 2
    assert redrawn.index("before redraw") < redrawn.index("after redraw")
    assert 'class="score low">30' in redrawn and "redrawn" in redrawn and f"better: {IMPROVED}" in redrawn
    assert f'<td class="thought">{IMPROVED}</td>' in redrawn
    for prompt, band in (("a red cube", 0), ("a red cube", 2), *((TREE, b) for b in range(3))):
        kept = band_row(html, prompt, band)
        assert kept.count("<img ") == 1 and 'class="score ">95' in kept and "accepted" in kept
    # User text is escaped, never markup.
    assert "tree &amp; &lt;moon&gt;" in html and "a/b &lt;x&gt;" in html and "<moon>" not in html
    # The unfinished run: status from run.json, rows from the journal, the error listed.
    assert 'class="badge running"' in html and "prompt is empty" in html and "Errors (1)" in html


def test_trace_plot_and_band_thumbnails_are_small_images(written_run):
    dest, results = written_run
    html, _ = build_report(str(dest))
    traces = re.findall(r'<img src="(data:image/png;base64,[^"]+)"[^>]*alt="trigger trace', html)
    assert len(traces) == 2 and all(decoded(src).size == (360, 150) for src in traces)
    attempts = {r["attempt"] for r in results[0].trigger_log}
    assert attempts == {0, 1}  # the redrawn band's evaluations are in the trace, drawn dashed
    bands = re.findall(r'<img src="(data:image/jpeg;base64,[^"]+)" width="(\d+)" height="(\d+)"\s+alt="band', html)
    # Manifest order ("a/b <x>" before "cube"); the redrawn band 2 comes twice, before and after.
    assert [(int(w), int(h)) for _, w, h in bands] == [(24, 8), (24, 16), (24, 24), (24, 8), (24, 16), (24, 16),
                                                       (24, 24)]
    assert all(decoded(src).size == (int(w), int(h)) for src, w, h in bands)


def test_finished_moved_run_limit_and_a_missing_object(written_run, tmp_path):
    dest, _ = written_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(dest, moved)  # the manifest's URIs still name the old folder
    storage = LocalStorage(moved)
    consolidate(storage)
    write_complete_marker(storage, {"elapsed_s": 12.5, "images_per_s": 0.16})
    info = json.loads(storage.get(layout.RUN_INFO))
    write_run_info(storage, info | {"status": "complete"})
    html, count = build_report(str(moved))
    assert count == 12 and "not found" not in html and 'class="badge complete"' in html and "0.16" in html

    html, count = build_report(str(moved), limit=1)
    assert count == 1 + 5 and "Showing the first 1 of 2 images" in html and "prompt is empty" in html

    band = next(moved.rglob("sample-0000.stage-01-band-2-of-3.png"))
    band.unlink()
    html, count = build_report(str(moved))
    assert count == 11 and "Named in the manifest but not found" in html and band.name in html
    assert '<div class="missing">missing</div>' in html


def settings_table(html: str) -> str:
    return html.split("<caption>Generation settings</caption>")[1].split("</table>")[0]


def test_throughput_and_model_time_are_labelled_and_a_twig_run_shows_its_texts(written_run):
    html, _ = build_report(str(written_run[0]))
    assert "images/s, wall clock</span>" in html and "s of model time per image</span>" in html
    assert "the two are not reciprocals" in html
    table = settings_table(html)
    assert "<th>think_max_tokens</th>" in table and "<th>theta</th>" in table and "guidance" not in table
    assert "<th>thought</th>" in html and "<th>reflection</th>" in html
    assert "redrawn bands</span>" in html and "trigger fires</span>" in html


def test_a_plain_run_hides_what_plain_mode_does_not_have(tmp_path):
    from twig_batch.pipeline import generate_images

    bundle = load_janus("tiny-micro", "cpu", torch.float32)
    settings = GenerationSettings(mode="plain", bands=2)
    [result] = generate_images(bundle, [ImageRequest("cube", "a red cube", 0, 11)], settings)
    storage = LocalStorage(tmp_path / "plain")
    write_run_info(storage, {"model": "tiny-micro", "mode": "plain", "settings": settings.to_dict(), "base_seed": 0,
                             "status": "running", "attempts": []})
    journal = ManifestJournal(storage, "a1")
    journal.add(rows_to_table([write_result(storage, result, "tiny-micro", 0.5, controller_ran=False)]))
    journal.flush()
    html, _ = build_report(str(tmp_path / "plain"))
    table = settings_table(html)
    assert "<th>bands</th>" in table and "<th>cfg_weight</th>" in table
    for unused in ("think_max_tokens", "theta", "reflect", "guidance_max_tokens", "controller"):
        assert f"<th>{unused}" not in table
    assert "<th>thought</th>" not in html and "<th>reflection</th>" not in html and 'class="thought"' not in html
    assert "redrawn bands" not in html and "trigger fires" not in html and "injections</span>" not in html
    assert html.count('alt="band') == 2  # the band images are still shown
