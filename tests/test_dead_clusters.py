"""A Ray cluster that does not answer is found in seconds. Ray itself retries a dead address for
about a quarter of an hour, printing only its own warnings: a run would look hung."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from twig_batch.distributed import cluster

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_a_named_cluster_that_does_not_answer_fails_the_run_in_seconds(tmp_path):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube", "a blue sphere"]}), prompts)
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{_closed_port()}", "RAY_AUTH_MODE": "disabled"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "twig_batch.cli", "run", str(prompts), "--output",
                           str(tmp_path / "out"), "--model", "tiny-micro"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode != 0
    assert "no Ray cluster answers at" in done.stdout + done.stderr, done.stdout + done.stderr
    assert "start it, or unset RAY_ADDRESS" in done.stdout + done.stderr
    assert time.monotonic() - started < 90  # the command's own start, plus a 3 s probe


def test_a_dead_ray_start_record_is_said_once_and_left_for_a_local_cluster(monkeypatch, capsys):
    dead = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(cluster, "address_to_join", lambda: dead)  # as read from /tmp/ray/ray_current_cluster
    monkeypatch.setattr(cluster, "STALE_RECORDS", [])
    assert cluster._join("") is False  # no address named: `connect` goes on to start a local cluster
    err = capsys.readouterr().err
    assert f"recorded on this machine ({dead}) does not answer" in err and "`ray stop` clears the record" in err
    assert cluster.STALE_RECORDS == [dead]  # what the run records in run.json


def test_a_listening_head_answers():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert cluster.answers(f"127.0.0.1:{server.getsockname()[1]}")
    assert not cluster.answers(f"127.0.0.1:{_closed_port()}")
    assert not cluster.answers("no-port-here")
