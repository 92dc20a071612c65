"""`twig-batch run` as its own process, owning a private local Ray cluster: killed outright, it leaves
no Ray process behind; on a disk that fills up, it stops with one line, its rows journalled."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch_support import write_prompts
from twig_batch.distributed.reaper import cluster_processes

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads processes from /proc (Linux)")
REPO = Path(__file__).resolve().parents[1]


def driver_env(ray_tmp: str) -> dict:
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, RAY_ADDRESS="local", RAY_AUTH_MODE="disabled",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def wait_for_line(path: Path, text: str, process, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, path.read_text()
        time.sleep(0.3)


def test_a_killed_driver_leaves_no_ray_process(tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", 3000)
    ray_tmp = tempfile.mkdtemp(prefix="twig-kill-", dir="/tmp")  # short: Ray's socket paths live below it
    log = tmp_path / "driver.log"
    try:
        with open(log, "w") as out:
            driver = subprocess.Popen([sys.executable, "-m", "twig_batch.cli", "run", str(prompts), "-o",
                                       str(tmp_path / "out"), "--model", "tiny-micro", "--images-per-call", "8",
                                       "--progress-every", "1"], env=driver_env(ray_tmp), stdout=out,
                                      stderr=subprocess.STDOUT)
        wait_for_line(log, "progress: ", driver)  # the cluster and an actor are up, drawing
        assert cluster_processes(ray_tmp)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 20
        while cluster_processes(ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in cluster_processes(ray_tmp)}
        assert not left, f"left running after the driver was killed: {left}"
    finally:
        for pid in cluster_processes(ray_tmp):  # never leak a cluster into the rest of the suite
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _mount_namespace() -> list[str] | None:
    """A command prefix that runs in a mount namespace of its own (root: plain; else as a mapped root)."""
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        if os.geteuid() != 0 and prefix == ["unshare", "-m"]:
            continue
        probe = subprocess.run(prefix + ["sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt || exit 1"],
                               capture_output=True)
        if shutil.which("unshare") and probe.returncode == 0:
            return prefix
    return None


def test_a_full_disk_ends_in_one_line_with_what_was_drawn_recorded(tmp_path):
    namespace = _mount_namespace()
    if namespace is None:
        pytest.skip("no mount namespace here to hold a small filesystem (unshare -m / -rm refused)")
    prompts = write_prompts(tmp_path / "p.parquet", 400)
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="twig-full-", dir="/tmp")
    # A 2 MB filesystem holds about 120 tiny-micro images with their band images; it exists only inside
    # the namespace, so the output is copied out before the namespace ends.
    script = (f"mount -t tmpfs -o size=2m tmpfs {disk} && "
              f"{sys.executable} -m twig_batch.cli run {prompts} -o {disk}/out --model tiny-micro --actors 1 "
              f"--images-per-call 8 > {tmp_path}/driver.log 2>&1; echo $? > {tmp_path}/rc; cp -a {disk}/out {kept}")
    try:
        subprocess.run(namespace + ["sh", "-c", script], env=driver_env(ray_tmp), timeout=300, check=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = (tmp_path / "driver.log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2", output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], output
    assert "Traceback" not in output
    assert "the space kept in reserve is given up to record what was drawn" in output

    info = json.loads((kept / "run.json").read_text())
    assert info["status"] == "failed" and "No space left on device" in info["attempts"][0]["failed"]
    journal = [pq.read_table(part) for part in sorted((kept / "manifest-journal").glob("*.parquet"))]
    recorded = {row["image_uri"].replace(f"{disk}/out", str(kept)) for table in journal
                for row in table.to_pylist() if row["status"] == "ok"}
    on_disk = {str(path) for path in (kept / "images").rglob("sample-????.png")}
    assert recorded and recorded <= on_disk  # a recorded image is there
    assert len(on_disk - recorded) <= 16, len(on_disk - recorded)  # at most the parts in flight are redrawn
    assert not (kept / ".twig-batch-reserve").exists()


def test_the_watcher_stops_its_own_cluster_only_not_one_whose_folder_name_it_begins(tmp_path):
    """Two clusters' session folders may differ only at their end (`..._45` and `..._456`)."""
    ours, theirs = tmp_path / "session_2026-11-30_07-00-00_123456_45", tmp_path / "session_2026-11-30_07-00-00_123456_456"
    sleeper = "import sys, time; time.sleep(60)"
    processes = [subprocess.Popen([sys.executable, "-c", sleeper, "ray", f"--session-dir={folder}"])
                 for folder in (ours, theirs)]
    try:
        found = cluster_processes(str(ours))
        assert processes[0].pid in found and processes[1].pid not in found
    finally:
        for process in processes:
            process.kill()
            process.wait()
