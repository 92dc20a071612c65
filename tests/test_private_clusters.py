"""Two runs on one machine without `ray start`: each starts a private cluster of its own. A run never
joins another driver's private cluster (it would end with that driver, and take the run with it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HOLD_A_PRIVATE_CLUSTER = """
import sys
from twig_batch.distributed.cluster import connect, disconnect
connect()
print("up", flush=True)
sys.stdin.read()
disconnect()
"""

WHERE_WOULD_A_RUN_GO = """
from twig_batch.distributed.cluster import address_to_join
print("join:", address_to_join())
"""


def test_a_second_driver_starts_its_own_cluster_instead_of_joining_a_private_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    if Path("/tmp/ray/ray_current_cluster").exists():  # a `ray start` cluster is what a run should join
        pytest.skip("a cluster `ray start` left is running on this machine")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_A_PRIVATE_CLUSTER], cwd=REPO, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(tmp_path / "holder.log", "w"))
    try:
        assert holder.stdout.readline().strip() == "up", (tmp_path / "holder.log").read_text()[-2000:]
        found = subprocess.run([sys.executable, "-c", WHERE_WOULD_A_RUN_GO], cwd=REPO, env=env, text=True,
                               capture_output=True, timeout=120)
        assert found.returncode == 0, found.stderr
        assert found.stdout.strip() == "join: None"  # None: it starts a private cluster of its own
        # The head is there to be found: asked for explicitly, Ray's "auto" does find it.
        found = subprocess.run([sys.executable, "-c", WHERE_WOULD_A_RUN_GO], cwd=REPO,
                               env={**env, "RAY_ADDRESS": "auto"}, text=True, capture_output=True, timeout=120)
        assert found.stdout.strip().startswith("join: ") and found.stdout.strip() != "join: None", found.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=120)
