import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from twig_batch.cli import app
from twig_batch.io import layout

runner = CliRunner()


def manifest_rows(out) -> list[dict]:
    return pq.read_table(out / layout.MANIFEST).to_pylist()


def test_generate_writes_a_run_that_verify_and_report_read(tmp_path):
    from twig_batch.seeds import derive_seed

    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red cube", "--model", "tiny", "--out", str(out), "--num-images", "2",
                                 "--seed", "5"])
    assert result.exit_code == 0, result.output
    rows = manifest_rows(out)
    assert [(r["id"], r["sample_index"], r["seed"], r["status"]) for r in rows] == \
        [("cli", i, derive_seed(5, "a red cube", i), "ok") for i in range(2)]  # the ids and seeds generate always had
    for i, row in enumerate(rows):
        assert row["image_uri"] == str(out / layout.image_key("cli", i)) and row["prompt"] == "a red cube"
        with Image.open(row["image_uri"]) as im:
            im.verify()
    assert rows[0]["duration_s"] > 0
    assert Path(rows[0]["image_uri"]).read_bytes() != Path(rows[1]["image_uri"]).read_bytes()
    info = json.loads((out / layout.RUN_INFO).read_text())
    assert (info["command"], info["model"], info["base_seed"], info["status"]) == ("generate", "tiny", 5, "complete")
    assert info["settings"]["cfg_weight"] == 5.0 and info["input"] == {"prompt": "a red cube"}
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0 and "ok: no problems found" in verified.output, verified.output
    assert "objects: 8 images and 0 trigger logs checked" in verified.output  # each with its 3 band images
    reported = runner.invoke(app, ["report", str(out)])
    assert reported.exit_code == 0 and (out / "report.html").is_file(), reported.output
    assert "a red cube" in (out / "report.html").read_text()


def test_generate_again_replaces_its_run_and_never_a_batch_run(tmp_path):
    out = tmp_path / "out"
    for _ in range(2):
        result = runner.invoke(app, ["generate", "a red cube", "--model", "tiny-micro", "--out", str(out)])
        assert result.exit_code == 0, result.output
    assert "replacing the earlier generate run in" in result.output and len(manifest_rows(out)) == 1
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / layout.RUN_INFO).write_text(json.dumps({"model": "tiny", "attempts": []}))
    refused = runner.invoke(app, ["generate", "a red cube", "--model", "tiny-micro", "--out", str(batch)])
    assert refused.exit_code == 2 and "holds a batch run" in refused.output
    assert sorted(p.name for p in batch.iterdir()) == [layout.RUN_INFO]


def test_generate_lays_out_bands_and_trigger_logs_as_a_batch_run_does(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red cube", "--model", "tiny-micro", "--out", str(out), "--mode", "twig",
                                 "--bands", "2", "--think-max-tokens", "2", "--controller"])
    assert result.exit_code == 0, result.output
    (row,) = manifest_rows(out)
    in_a_run = [layout.image_key("cli", 0), layout.trigger_log_key("cli", 0)] + [
        layout.stage_image_key("cli", 0, position, label) for position, label in enumerate(row["stage_labels"])]
    assert sorted(str(p.relative_to(out)) for p in (out / layout.IMAGES_DIR).rglob("*") if p.is_file()) == \
        sorted(in_a_run)
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0 and "objects: 3 images and 1 trigger logs checked" in verified.output, \
        verified.output


def test_generate_deterministic_is_recorded_and_draws_the_same_image_on_a_cpu(tmp_path):
    for flag, out in (([], tmp_path / "usual"), (["--deterministic"], tmp_path / "repeatable")):
        result = runner.invoke(app, ["generate", "a red cube", "--out", str(out), "--seed", "5", *flag])
        assert result.exit_code == 0, result.output
    settings = {name: json.loads((tmp_path / name / layout.RUN_INFO).read_text())["settings"]
                for name in ("usual", "repeatable")}
    assert settings["repeatable"]["deterministic"] is True and settings["usual"]["deterministic"] is False
    image = layout.image_key("cli", 0)
    assert (tmp_path / "usual" / image).read_bytes() == (tmp_path / "repeatable" / image).read_bytes()


def test_generate_bad_model_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_generate_bad_setting(tmp_path):
    result = runner.invoke(app, ["generate", "x", "--cfg-weight", "nan", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cfg weight" in result.output


def test_make_tiny_model_both_layouts(tmp_path):
    for layout_name in ("hf", "deepseek"):
        result = runner.invoke(app, ["make-tiny-model", str(tmp_path / layout_name), "--layout", layout_name])
        assert result.exit_code == 0, result.output
        assert (tmp_path / layout_name / "config.json").is_file()
