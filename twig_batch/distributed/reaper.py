"""Nothing of a private local Ray cluster outlives the driver that started it.

A driver killed with SIGKILL cannot stop its cluster, and Ray's own processes do not always notice:
its dashboard and runtime-env agents have been seen to stay alive, adopted by init. So a driver that
starts a private cluster also starts this watcher (`watch_cluster`), a process of its own in a
session of its own, so that a Ctrl-C in the driver's terminal does not reach it first. The watcher
holds the reading end of a pipe whose writing end only the driver has; the pipe closes however the
driver ends. Then the watcher stops every Ray process that still holds a file in the cluster's
session folder, and notes what it stopped in that folder's `logs/twig-batch-reaper.log`.

It is run as a script (`python reaper.py SESSION_DIR`), with the standard library alone: it must
start fast and hold no model or Ray state of its own.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 3.0  # between SIGTERM and SIGKILL
LOG_NAME = "twig-batch-reaper.log"


def watch_cluster(session_dir: str) -> subprocess.Popen | None:
    """Start the watcher of the cluster whose session folder is `session_dir` (Linux; None elsewhere).
    Keep the returned process: closing its stdin (`release`) tells it that the driver is done."""
    if not Path("/proc/self/fd").is_dir():
        return None
    return subprocess.Popen([sys.executable, "-S", __file__, session_dir, str(os.getpid())], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            close_fds=True)


def release(watcher: subprocess.Popen | None) -> None:
    """The driver stopped its cluster itself: the watcher sweeps whatever is left and exits."""
    if watcher is not None and watcher.stdin is not None:
        watcher.stdin.close()


def cluster_processes(session_dir: str, spared: tuple[int, ...] = ()) -> list[int]:
    """Pids of Ray's processes (not this one, nor `spared`) with a file or their command line in `session_dir`."""
    found = []
    # The folder's own name, whole: another cluster's session folder may start with the same text.
    names_it = re.compile(re.escape(session_dir.rstrip("/")) + r"(?![^/\s\"'])")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), *spared):
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "ray" not in command:  # a person's `tail -f` of a Ray log is not Ray's
                continue
            holds = bool(names_it.search(command)) or any(
                names_it.match(os.readlink(fd)) for fd in (entry / "fd").iterdir())
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        if holds:
            found.append(int(entry.name))
    return found


def sweep(session_dir: str, spared: tuple[int, ...] = ()) -> list[int]:
    """SIGTERM every process of the cluster, then SIGKILL what is left after GRACE_S; returns the pids."""
    pids = cluster_processes(session_dir, spared)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal(pid, signal.SIGKILL)
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's wait is missing


def main(session_dir: str, driver: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe says when the driver is gone
    sys.stdin.buffer.read()  # returns when the driver closes its end or dies
    stopped = sweep(session_dir, spared=(driver,))  # a driver that released us lives on
    if stopped:
        log = Path(session_dir) / "logs" / LOG_NAME
        try:
            with open(log, "a") as handle:
                handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} the driver ended; stopped the cluster's "
                             f"processes it left running: {' '.join(map(str, stopped))}\n")
        except OSError:
            pass


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
