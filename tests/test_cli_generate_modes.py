import json

import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from twig_batch.cli import app
from twig_batch.io import layout

runner = CliRunner()


def test_twig_mode_writes_band_images_and_a_full_record(tmp_path):
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"think_first": "Say what the {part} of {prompt} shows."}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red cube", "--model", "tiny", "--out", str(out), "--mode", "twig",
                                 "--bands", "2", "--think-max-tokens", "3", "--templates", str(templates)])
    assert result.exit_code == 0, result.output
    heights = {}
    for position, label in enumerate(("band-1-of-2", "band-2-of-2")):  # in the item folder of a batch run's layout
        with Image.open(out / layout.stage_image_key("cli", 0, position, label)) as im:
            heights[label] = im.size
    assert heights == {"band-1-of-2": (96, 48), "band-2-of-2": (96, 96)}
    (row,) = pq.read_table(out / layout.MANIFEST).to_pylist()
    assert row["mode"] == "twig" and len(row["thoughts"]) == 2 and row["redrawn_bands"] == []
    assert json.loads((out / layout.RUN_INFO).read_text())["settings"]["bands"] == 2
    assert [r["band"] for r in json.loads(row["reflections_json"])] == [0, 1]
    assert row["stage_labels"] == ["band-1-of-2", "band-2-of-2"]
    assert row["stage_image_uris"] == [str(out / layout.stage_image_key("cli", 0, position, label))
                                       for position, label in enumerate(row["stage_labels"])]


def test_bad_templates_file_and_bad_band_count_are_clear_errors(tmp_path):
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"seed_stage": "{prompt} {colour}"}))
    result = runner.invoke(app, ["generate", "x", "--mode", "seed", "--templates", str(templates),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "{colour}" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["generate", "x", "--mode", "twig", "--bands", "5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not divide" in result.output
