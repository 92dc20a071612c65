"""The command line as typer and Ray Data users expect it: help in words, choices, --version, the
generation flags on `run`, suggestions for a mistyped setting, --dry-run, a live bar on a terminal,
and `report` writing beside the run."""
import re

import pytest
from typer.testing import CliRunner

from batch_support import write_prompts
from twig_batch.cli import app

runner = CliRunner()


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was joined or started")

    monkeypatch.setattr("twig_batch.distributed.batch_job.connect", refuse)
    monkeypatch.setenv("RAY_ADDRESS", "local")


@pytest.mark.parametrize("command", ["", "run", "generate", "report", "verify", "make-tiny-model"])
def test_help_names_values_in_words(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert result.exit_code == 0, result.output
    text = result.output
    assert not re.search(r"<(str|int|float|bool|path|Path|list\[str\])>", text), text
    assert not re.search(r"\w \.", text), text  # no help text left with a hole (markup eaten)
    if command == "run":
        assert "<plain|twig|seed>" in text and "KEY=VALUE" in text
        assert "[default: (one per GPU in the cluster, 1 on CPU)]" in text
        for flag in ("--bands", "--theta", "--cfg-weight", "--think-max-tokens", "--reflect", "--top-k", "--dry-run",
                     "--overwrite"):
            assert flag in text


def test_version():
    from twig_batch import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"twig-batch {__version__}"


def test_mode_is_a_choice(tmp_path):
    result = runner.invoke(app, ["run", "p.parquet", "-o", str(tmp_path / "o"), "--mode", "sketch"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "'sketch' is not one of" in result.output and "twig" in result.output


def test_a_mistyped_setting_names_the_nearest_and_lists_them(tmp_path, no_ray):
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    result = runner.invoke(app, ["run", str(prompts), "-o", str(tmp_path / "o"), "--set", "cfg_weigth=4.5"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "error: unknown generation setting 'cfg_weigth' (did you mean cfg_weight?); the generation settings are: "
        "bands, cfg_weight, controller, deterministic, guidance_max_tokens, guidance_temperature, kv_cache, loop, "
        "reflect, temperature, theta, think_max_tokens, top_k, top_p"]


def test_a_loop_that_cannot_run_the_settings_is_refused_before_anything_starts(tmp_path, no_ray):
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    for extra in (["--set", "kv_cache=fp8"], ["--deterministic"]):
        result = runner.invoke(app, ["run", str(prompts), "-o", str(tmp_path / "o"), "--mode", "twig",
                                     "--set", "loop=mixed", *extra])
        assert result.exit_code == 2, result.output
        assert "loop=mixed runs the KV cache in the model's dtype and without --deterministic" in result.output
    unknown = runner.invoke(app, ["run", str(prompts), "-o", str(tmp_path / "o"), "--set", "loop=fast"])
    assert unknown.exit_code == 2 and "loop must be one of auto, lockstep, mixed, got 'fast'" in unknown.output
    assert not (tmp_path / "o").exists()


def test_run_takes_the_generation_flags_of_generate(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("twig_batch.distributed.run_batch", lambda config, echo: seen.setdefault("config", config))
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    result = runner.invoke(app, ["run", str(prompts), "-o", str(tmp_path / "o"), "--mode", "twig", "--bands", "2",
                                 "--theta", "70", "--cfg-weight", "4.5", "--think-max-tokens", "16", "--no-reflect",
                                 "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--set", "kv_cache=fp8"])
    settings = seen["config"].settings
    assert (settings.mode, settings.bands, settings.theta, settings.cfg_weight, settings.think_max_tokens,
            settings.reflect, settings.temperature, settings.top_k, settings.top_p, settings.kv_cache) == \
        ("twig", 2, 70.0, 4.5, 16, False, 0.8, 50, 0.9, "fp8"), result.output
    twice = runner.invoke(app, ["run", str(prompts), "-o", str(tmp_path / "o"), "--bands", "2", "--set", "bands=3"])
    assert twice.exit_code == 2 and "--bands and --set bands=... both set bands: give one" in twice.output


def test_dry_run_checks_and_says_what_the_run_would_do(tmp_path, no_ray):
    prompts = write_prompts(tmp_path / "p.parquet", 5)
    dest = tmp_path / "never-written"
    result = runner.invoke(app, ["run", str(prompts), "-o", str(dest), "--samples-per-prompt", "3", "--mode", "twig",
                                 "--bands", "2", "--model", "deepseek-community/Janus-Pro-7B", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "dry run: every check passed; no model loaded, nothing drawn or written"
    assert "  images:   5 x 3 sample(s) = 15; 0 already recorded ok; 15 to draw" in lines
    assert f"  output:   {dest} (writable; a new run)" in lines
    assert "  settings: mode twig, bands 2" in lines and "  cluster:  starts a private local Ray cluster" in lines
    assert any(line.startswith("  model:    Hugging Face id deepseek-community/Janus-Pro-7B: ") for line in lines)
    assert "  estimate: 15 image(s) take about 0m04s of one H200 for a 7B model in twig mode" in result.output
    assert not dest.exists()
    tiny = runner.invoke(app, ["run", str(prompts), "-o", str(dest), "--model", "tiny-micro", "--dry-run"])
    assert "  model:    tiny-micro: a random tiny Janus built offline on first use (6x6 image tokens)" in \
        tiny.output.splitlines()
    refused = runner.invoke(app, ["run", str(prompts), "-o", str(dest), "--model", "./no/such/folder", "--dry-run"])
    assert refused.exit_code == 2 and refused.output.startswith("error: model folder ./no/such/folder does not exist")


def test_a_live_bar_on_a_terminal_with_the_run_lines_above_it(capsys):
    from twig_batch.distributed.progress import Progress

    progress = Progress(total=4, live=True, interval_s=10)
    progress.update(0, 0)
    progress.say("actor abc ready after 1.0s on cpu")
    progress.update(2, 0)
    progress.update(1, 1)
    progress.stop_heartbeat()
    out = capsys.readouterr().out
    frames = out.split("\r\x1b[K")
    assert any(frame.startswith("actor abc ready after 1.0s on cpu\n[....") for frame in frames)  # the bar redrawn
    assert frames[-1].startswith("[########################] 4/4 images (100.0%) |") and frames[-1].endswith("\n")
    assert "images/s | ETA" in frames[-1] and "errors 1" in frames[-1]
    assert any(frame.startswith("[############............] 2/4 images (50.0%)") for frame in frames)
    assert out.count("\n") == 2  # the said line and the bar's last state: no line per update


def test_report_is_written_beside_the_run(tmp_path):
    from twig_batch.io.manifest import ManifestJournal, error_row, rows_to_table
    from twig_batch.io.run_info import write_run_info
    from twig_batch.io.storage import LocalStorage

    dest = tmp_path / "run"
    storage = LocalStorage(dest)
    write_run_info(storage, {"model": "tiny", "mode": "plain", "settings": {}, "base_seed": 0, "status": "running",
                             "attempts": [{"attempt": "a1", "started_at": "2026-01-01T00:00:00+00:00"}]})
    journal = ManifestJournal(storage, "a1")
    journal.add(rows_to_table([error_row("e", "", 0, 5, "plain", "tiny", "prompt is empty")]))
    journal.flush()
    result = runner.invoke(app, ["report", str(dest)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"report: {(dest / 'report.html').resolve()} (")
    assert (dest / "report.html").is_file()


def test_images_per_call_and_work_batch_size_are_two_flags_and_batch_size_is_the_old_name(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("twig_batch.distributed.run_batch", lambda config, echo: seen.append(config))
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    common = ["run", str(prompts), "-o", str(tmp_path / "o")]
    runner.invoke(app, [*common, "--images-per-call", "8", "--work-batch-size", "64"])
    old = runner.invoke(app, [*common, "--batch-size", "8"])
    assert (seen[0].images_per_call, seen[0].work_batch(1)) == (8, 64)
    assert (seen[1].images_per_call, seen[1].work_batch(1)) == (8, 8)  # as --batch-size 8 always did
    assert "warning: --batch-size is deprecated: it is --images-per-call now" in old.output
    both = runner.invoke(app, [*common, "--batch-size", "8", "--images-per-call", "4"])
    assert both.exit_code == 2 and "--batch-size is the old name of --images-per-call: give one" in both.output
