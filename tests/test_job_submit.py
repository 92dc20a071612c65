"""`ray job submit` end to end: a real head (`ray start --head`), the job entrypoint, output checked."""
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from batch_support import free_port, read_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_head():
    """A head node of our own: private ports and temp dir, so it neither joins nor disturbs other clusters."""
    temp_dir = tempfile.mkdtemp(prefix="twig-ray-", dir="/tmp")  # short: Ray's socket paths live below it
    dashboard = free_port()
    # No drain on SIGTERM: nothing is left to hand over when the test stops its own head.
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    command = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--include-dashboard", "true", "--num-cpus", "3", "--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                break
            except OSError:
                assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.5)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def documented_submit_line() -> list[str]:
    text = (REPO / "docs" / "batch-job.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("ray job submit --address"))
    return line.split()


def test_submitted_job_writes_the_output(ray_head, tmp_path):
    address, env = ray_head
    runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"]["TWIG_BATCH_CACHE"] = os.environ["TWIG_BATCH_CACHE"]  # the test run's cache
    runtime_env["env_vars"]["HF_HOME"] = str(tmp_path / "hf")
    (tmp_path / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
    dest = tmp_path / "job-output"

    documented = documented_submit_line()
    entrypoint = documented[documented.index("--") + 1:]
    assert entrypoint[:2] == ["python", "jobs/generate_batch.py"] and (REPO / entrypoint[1]).is_file()
    command = ["ray", "job", "submit", "--address", address, "--working-dir", ".", "--runtime-env",
               str(tmp_path / "runtime_env.yaml"), "--", "python", "jobs/generate_batch.py",
               "examples/prompts.parquet", "--output", str(dest), "--samples-per-prompt", "1", "--batch-size", "8"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output and "manifest: " in output and "(16 ok, 0 error rows)" in output

    rows = read_manifest(dest).to_pylist()
    assert len(rows) == 16 and {r["status"] for r in rows} == {"ok"}
    assert all(Path(r["image_uri"]).is_file() for r in rows)
    assert (dest / "_COMPLETE.json").is_file() and (dest / "run.json").is_file()
