"""A failure reaches the user as one line (and, for a worker's, a pointer to the full log), not
Ray's tracebacks: a model folder missing here, a model that fails on the actors."""
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from batch_support import write_prompts
from twig_batch.cli import app

REPO = Path(__file__).resolve().parents[1]


def test_a_missing_model_folder_is_refused_before_ray_starts(tmp_path, monkeypatch):
    """On a private local cluster the actors see this machine's disk: no need to start one to know."""
    monkeypatch.setenv("RAY_ADDRESS", "local")
    monkeypatch.setattr("twig_batch.distributed.batch_job.connect",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was started")))
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    for ref in ("./models/janus-pro-7b", str(tmp_path / "absent"), "~/no-such-model", "a/b/c"):
        result = CliRunner().invoke(app, ["run", str(prompts), "-o", str(tmp_path / "out"), "--model", ref])
        assert result.exit_code == 2, result.output
        assert result.output.splitlines() == [f"error: model folder {ref} does not exist"]
        assert not (tmp_path / "out").exists()


def test_a_model_failing_on_the_actors_is_one_line_and_a_log(tmp_path):
    """A Hugging Face id the actors cannot fetch (offline): the actor dies in its constructor."""
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    env = dict(os.environ, RAY_ADDRESS="local", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "twig_batch.cli", "run", str(prompts), "-o", str(tmp_path / "out"),
                             "--model", "no-such-org/no-such-model", "--progress-every", "600"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    ours = [line for line in lines if not line.startswith("progress: ")]  # heartbeats while the actor starts
    assert ours[0].startswith("twig-batch run: 2 prompts x 1 samples"), lines
    assert ours[-2].startswith("error: on a Ray worker: model 'no-such-org/no-such-model' is neither a local folder "
                               "nor reachable on the Hugging Face Hub"), lines
    assert ours[-1].startswith("full log: /") and len(ours) == 3, lines
    assert not any("Traceback" in line or "(MapWorker" in line or "(raylet)" in line for line in lines), lines
    logs = Path(ours[-1].split()[2])
    assert any("no-such-org/no-such-model" in f.read_text(errors="replace") for f in logs.glob("worker-*.err"))
    assert time.monotonic() - started < 300
