"""The README's first command: examples/quickstart.sh over the bundled sample prompts."""
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from batch_support import read_manifest

REPO = Path(__file__).resolve().parents[1]


def test_sample_prompts_are_what_the_script_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "examples" / "make_prompts.py"), str(tmp_path / "p.parquet")],
                   check=True, capture_output=True)
    bundled = pq.read_table(REPO / "examples" / "prompts.parquet")
    assert bundled.equals(pq.read_table(tmp_path / "p.parquet"))
    assert bundled.column_names == ["id", "prompt"] and bundled.num_rows == 16
    assert len(set(bundled.column("id").to_pylist())) == 16


def test_quickstart_runs_the_batch_job_on_the_tiny_model(tmp_path):
    dest = tmp_path / "quickstart"
    # A private local cluster: the quick start must not depend on (or join) anything already running.
    env = dict(os.environ, TWIG_OUTPUT=str(dest), RAY_ADDRESS="local", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"Images:   {dest}/images/" in output and f"Manifest: {dest}/manifest.parquet" in output
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 32 and {r["status"] for r in rows} == {"ok"} and {r["model"] for r in rows} == {"tiny"}
    assert all(Path(r["image_uri"]).is_file() for r in rows) and (dest / "_COMPLETE.json").is_file()
