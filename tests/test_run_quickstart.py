"""The README's first command: examples/quickstart.sh over the bundled sample prompts, a twig run with
the controller and its report, and a successful run prints only its own lines."""
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from batch_support import read_manifest

REPO = Path(__file__).resolve().parents[1]
# Every line a successful quick start prints is one of ours: no Ray warnings, no C++ log lines.
OURS = re.compile(r"^(twig-batch run: |progress: |actor [0-9a-f]{8}@|done: |images: |manifest: |report: |Report: | {10}"
                  r"|Images: |Manifest: |Check it: |$)")


def test_sample_prompts_are_what_the_script_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "examples" / "make_prompts.py"), str(tmp_path / "p.parquet")],
                   check=True, capture_output=True)
    bundled = pq.read_table(REPO / "examples" / "prompts.parquet")
    assert bundled.equals(pq.read_table(tmp_path / "p.parquet"))
    assert bundled.column_names == ["id", "prompt"] and bundled.num_rows == 16
    assert len(set(bundled.column("id").to_pylist())) == 16


def test_quickstart_runs_a_twig_batch_with_the_controller_quietly(tmp_path):
    dest = tmp_path / "quickstart"
    # As on a fresh machine: no Ray variables, a home without a Ray token, a private local cluster
    # (the quick start must not depend on, or join, anything already running).
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, TWIG_OUTPUT=str(dest), RAY_ADDRESS="local", PYTHON=sys.executable, HOME=str(home),
               PYTHONUSERBASE=site.getuserbase())
    env.pop("RAY_AUTH_MODE", None)
    result = subprocess.run(["bash", str(REPO / "examples" / "quickstart.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert [line for line in output.splitlines() if not OURS.match(line)] == [], output
    assert f"Report:   {dest}/report.html: open it in a browser" in output
    assert f"Images:   {dest}/images/" in output and f"Manifest: {dest}/manifest.parquet" in output
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 32 and {r["status"] for r in rows} == {"ok"} and {r["model"] for r in rows} == {"tiny"}
    assert {r["mode"] for r in rows} == {"twig"}
    for r in rows:
        assert len(r["thoughts"]) == 3 and len(r["reflection_scores"]) >= 3 and r["trigger_log_uri"]
    assert all(Path(r["image_uri"]).is_file() for r in rows) and (dest / "_COMPLETE.json").is_file()
    html = (dest / "report.html").read_text()
    assert "thought" in html.lower() and "trigger" in html.lower()
