"""The report of a real batch run (tiny model, twig mode, controller on, local Ray), local and on S3,
opened in headless Chromium: no console messages, every image decodes, a screenshot comes out."""
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from markupsafe import escape
from PIL import Image
from typer.testing import CliRunner

from batch_support import read_manifest, s3_client
from browser_support import load, screenshot
from twig_batch.cli import app
from twig_batch.distributed import RunConfig, run_batch

runner = CliRunner()
PROMPTS = {"p0": "a red cube on a table", "p1": "a green <sphere> & \"friends\"", "p2": "a blue bird",
           "broken": None}


@pytest.fixture(scope="module")
def runs(shared_ray_s3, tmp_path_factory):
    """One twig run written locally and one to S3 (moto), by the batch job on a 4-CPU local Ray."""
    root = tmp_path_factory.mktemp("report-runs")
    prompts = root / "prompts.parquet"
    pq.write_table(pa.table({"id": list(PROMPTS), "prompt": pa.array(list(PROMPTS.values()), pa.string())}), prompts)
    config = dict(input=str(prompts), model="tiny", samples_per_prompt=2, images_per_call=4, progress_interval_s=1e9,
                  settings={"mode": "twig", "think_max_tokens": 4, "controller": {"force_every": 40}})
    s3_client().create_bucket(Bucket="runs")
    run_batch(RunConfig(output=str(root / "out"), **config), echo=lambda *_: None)
    run_batch(RunConfig(output="s3://runs/nightly/twig", **config), echo=lambda *_: None)
    return root / "out", "s3://runs/nightly/twig"


def expected_images(rows) -> int:
    """What the page must show: the throughput plot, then per ok image its thumbnail, bands and trace."""
    ok = [r for r in rows if r["status"] == "ok"]
    return 1 + sum(1 + len(r["stage_image_uris"]) + (r["trigger_log_uri"] is not None) for r in ok)


def report(dest, out, *extra):
    result = runner.invoke(app, ["report", str(dest), "--out", str(out), *map(str, extra)])
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8"), result.output


def test_local_report_renders_every_image_in_chromium(runs, tmp_path):
    dest, _ = runs
    rows = read_manifest(dest).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and all(len(r["stage_image_uris"]) == 3 and r["n_injections"] > 0 for r in ok)
    html, said = report(dest, tmp_path / "report.html")
    expected = expected_images(rows)
    assert f"({expected} images" in said and html.count("<img ") == expected

    # Self-contained: every image is inline, every link stays in the page, nothing is fetched.
    assert set(re.findall(r'src="([a-z]+):', html)) == {"data"} and html.count('src="') == expected
    assert all(link.startswith("#") for link in re.findall(r'href="([^"]*)"', html) if link != "data:,")
    assert "http://" not in html and "https://" not in html and "<script" not in html

    # The summary, the errors, and per image its prompt, thoughts and reflections (escaped).
    assert "complete" in html and ">tiny<" in html and ">twig<" in html
    assert html.count("prompt is missing (null)") == 2
    assert str(escape(PROMPTS["p1"])) in html and PROMPTS["p1"] not in html
    for row in ok:
        assert f"seed {row['seed']}" in html
        for thought in row["thoughts"]:
            assert str(escape(re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", "\ufffd", thought))) in html
    assert html.count(">band 3 of 3<") == 6 and html.count("unparseable") == 18

    probe, console = load(tmp_path / "report.html", tmp_path)
    assert probe == {"images": expected, "broken": []}
    assert console == []
    shot = screenshot(tmp_path / "report.html", tmp_path / "report.png")
    with Image.open(shot) as image:
        assert image.size == (1280, 1600) and len(image.convert("L").getcolors(1 << 16) or []) > 20


def test_s3_report_with_a_limit(runs, tmp_path):
    local, s3_dest = runs
    rows = read_manifest(local).to_pylist()
    html, said = report(s3_dest, tmp_path / "s3.html", "--limit", 2)
    shown = [r for r in rows if r["status"] == "ok"][:2]
    expected = 1 + sum(1 + len(r["stage_image_uris"]) + 1 for r in shown)
    assert f"({expected} images" in said and html.count("<img ") == expected
    assert "s3://runs/nightly/twig" in html and "Showing the first 2 of 6 images" in html
    assert html.count("prompt is missing (null)") == 2  # errors are always all listed
    probe, console = load(tmp_path / "s3.html", tmp_path)
    assert probe == {"images": expected, "broken": []} and console == []


def test_not_a_run_is_one_clear_error(runs, tmp_path):
    for dest in (tmp_path / "empty", "s3://runs/no-such-prefix", "s3://no-such-bucket/x"):
        result = runner.invoke(app, ["report", str(dest), "--out", str(tmp_path / "r.html")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "no twig-batch run" in result.output or "bucket does not exist" in result.output
    assert not (tmp_path / "r.html").exists()


def test_the_browser_check_catches_console_errors_and_broken_images(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img alt="fine" src="data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==">'
                    '<img alt="broken" src="data:image/png;base64,AAAA">'
                    '<script>console.error("something went wrong")</script></body></html>')
    probe, console = load(page, tmp_path)
    assert probe == {"images": 2, "broken": ["broken"]}
    assert len(console) == 1 and "something went wrong" in console[0]
