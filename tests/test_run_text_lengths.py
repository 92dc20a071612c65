"""The benchmark-only text length emulation reaches the actors of a cluster started without it,
and a run that used it says so in its output and its run.json."""
import json

import pyarrow.parquet as pq
from typer.testing import CliRunner

from batch_support import write_prompts
from twig_batch.cli import app
from twig_batch.model import load_janus
from twig_batch.pipeline.text_lengths import ENV_VAR


def worker_environment(ray, name):
    """The variable `name` as a task of the cluster sees it (None: unset)."""
    import os

    def read():
        return os.environ.get(name)

    return ray.get(ray.remote(num_cpus=0)(read).remote())


def test_the_driver_forwards_the_emulation_to_the_actors_and_records_it(shared_ray, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.parquet", 3)
    # The shared cluster was started without the variable (conftest.py removes it): its workers lack it.
    assert worker_environment(shared_ray, ENV_VAR) is None
    monkeypatch.setenv(ENV_VAR, "thought=2,reflection=3")
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(tmp_path / "out"), "--model",
                                      "tiny-micro", "--mode", "twig", "--set", "think_max_tokens=24"])
    assert result.exit_code == 0, result.output
    assert f"text lengths emulated ({ENV_VAR}=thought=2,reflection=3): thought 2-2, reflection 3-3 tokens" \
        in result.output
    attempt = json.loads((tmp_path / "out" / "run.json").read_text())["attempts"][-1]
    assert attempt["emulated_text_lengths"]["ranges"] == {"thought": [2, 2], "reflection": [3, 3]}
    bundle = load_janus("tiny-micro")
    thoughts = [t for row in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist() for t in row["thoughts"]]
    assert len(thoughts) == 3 * 3
    assert all(len(bundle.encode(t)) <= 4 for t in thoughts), thoughts  # 2 tokens, give or take re-encoding
