import json

from PIL import Image
from typer.testing import CliRunner

from twig_batch.cli import app

runner = CliRunner()


def test_generate_writes_png_and_record(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red cube", "--model", "tiny", "--out", str(out), "--num-images", "2",
                                 "--seed", "5"])
    assert result.exit_code == 0, result.output
    for i in range(2):
        with Image.open(out / f"sample-{i:04d}.png") as im:
            im.verify()
        record = json.loads((out / f"sample-{i:04d}.json").read_text())
        assert record["prompt"] == "a red cube" and record["base_seed"] == 5 and record["model"] == "tiny"
        assert record["settings"]["cfg_weight"] == 5.0 and record["timings"]["image_tokens_s"] > 0
    assert (out / "sample-0000.png").read_bytes() != (out / "sample-0001.png").read_bytes()


def test_generate_names_its_files_as_a_batch_run_does(tmp_path):
    from twig_batch.io import layout

    out = tmp_path / "out"
    result = runner.invoke(app, ["generate", "a red cube", "--model", "tiny-micro", "--out", str(out), "--mode", "twig",
                                 "--bands", "2", "--think-max-tokens", "2", "--controller"])
    assert result.exit_code == 0, result.output
    in_a_run = [layout.image_key("x", 0), layout.trigger_log_key("x", 0)] + [
        layout.stage_image_key("x", 0, position, label) for position, label in
        enumerate(json.loads((out / "sample-0000.json").read_text())["band_images"])]
    names = sorted(key.rsplit("/", 1)[1] for key in in_a_run)
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == names


def test_generate_deterministic_is_recorded_and_draws_the_same_image_on_a_cpu(tmp_path):
    for flag, out in (([], tmp_path / "usual"), (["--deterministic"], tmp_path / "repeatable")):
        result = runner.invoke(app, ["generate", "a red cube", "--out", str(out), "--seed", "5", *flag])
        assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "repeatable" / "sample-0000.json").read_text())
    assert record["settings"]["deterministic"] is True
    assert json.loads((tmp_path / "usual" / "sample-0000.json").read_text())["settings"]["deterministic"] is False
    assert (tmp_path / "usual" / "sample-0000.png").read_bytes() == (tmp_path / "repeatable" / "sample-0000.png").read_bytes()


def test_generate_bad_model_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output


def test_generate_bad_setting(tmp_path):
    result = runner.invoke(app, ["generate", "x", "--cfg-weight", "nan", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "cfg weight" in result.output


def test_make_tiny_model_both_layouts(tmp_path):
    for layout in ("hf", "deepseek"):
        result = runner.invoke(app, ["make-tiny-model", str(tmp_path / layout), "--layout", layout])
        assert result.exit_code == 0, result.output
        assert (tmp_path / layout / "config.json").is_file()
