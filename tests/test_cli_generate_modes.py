import json

from PIL import Image
from typer.testing import CliRunner

from twig_batch.cli import app

runner = CliRunner()


def test_twig_mode_writes_band_images_and_a_full_record(tmp_path):
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"think_first": "Say what the {part} of {prompt} shows."}))
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red cube", "--model", "tiny", "--out", str(out), "--mode", "twig",
                                 "--bands", "2", "--think-max-tokens", "3", "--templates", str(templates)])
    assert result.exit_code == 0, result.output
    heights = {}
    for position, label in enumerate(("band-1-of-2", "band-2-of-2")):  # named as in a batch run's item folder
        with Image.open(out / f"sample-0000.stage-{position:02d}-{label}.png") as im:
            heights[label] = im.size
    assert heights == {"band-1-of-2": (96, 48), "band-2-of-2": (96, 96)}
    record = json.loads((out / "sample-0000.json").read_text())
    assert record["mode"] == "twig" and record["settings"]["bands"] == 2 and len(record["thoughts"]) == 2
    assert [r["band"] for r in record["reflections"]] == [0, 1] and record["redrawn_bands"] == []
    assert record["bands"] == 2 and record["band_images"] == ["band-1-of-2", "band-2-of-2"]
    assert record["stage_images"] == ["sample-0000.stage-00-band-1-of-2.png", "sample-0000.stage-01-band-2-of-2.png"]
    assert record["timings"]["thinking_s"] > 0 and record["timings"]["reflection_s"] > 0


def test_bad_templates_file_and_bad_band_count_are_clear_errors(tmp_path):
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps({"seed_stage": "{prompt} {colour}"}))
    result = runner.invoke(app, ["generate", "x", "--mode", "seed", "--templates", str(templates),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "{colour}" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["generate", "x", "--mode", "twig", "--bands", "5", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not divide" in result.output
