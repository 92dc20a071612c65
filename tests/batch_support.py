"""Helpers shared by the batch-job tests: prompt files, a local Ray cluster, an S3 server, manifests."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Distinctive dummy credentials, so a test can prove they never land in an output.
ACCESS_KEY = "AKIATWIGBATCHTESTKEY"
SECRET_KEY = "twig-batch-test-secret-0123456789"
# Ids an input may hold that must never become paths: traversal, absolute and home paths, both slashes
# (and the name each would slug to), dot names, names Windows reserves, case twins, control
# characters, text outside ASCII, a name longer than any filesystem allows. None is blank, so a run
# records each as given.
HOSTILE_IDS = ["../../etc/passwd", "/abs/path", "a/b", "a\\b", "a_b", "a/b\\c", "a/../../b", "..", ".", ".hidden",
               "~/x", "CON", "con", "line\nbreak", "nul\x00byte", "日本語の猫 🐱", "Ünïcödé", "x" * 300]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_prompts(path: Path, count: int, *, with_ids: bool = True, prefix: str = "p") -> Path:
    columns = {"prompt": [f"a {['red', 'green', 'blue'][i % 3]} cube number {i}" for i in range(count)]}
    if with_ids:
        columns = {"id": [f"{prefix}{i:04d}" for i in range(count)], **columns}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def read_manifest(dest: Path) -> pa.Table:
    return pq.read_table(dest / "manifest.parquet")


def _start_local_ray(num_cpus: int):
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


@contextlib.contextmanager
def local_ray(num_cpus: int = 4):
    """A fresh local Ray cluster in this process (3-4 logical CPUs keep read tasks from starving), for
    a module that needs one of its own; the others share `SHARED_CLUSTER`."""
    ray = _start_local_ray(num_cpus)
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1 with the standard AWS variables pointing at it."""
    with restartable_s3_server() as server:
        yield server.url


class RestartableS3:
    """A moto S3 server that can refuse connections for a while: stopped, then started again on the
    same port (moto keeps its buckets and objects in this process, so nothing is lost)."""

    def __init__(self, port: int):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def refuse_connections_for(self, seconds: float):
        """Stop now and start again after `seconds`, in the background; returns the restarting thread."""
        import threading
        import time

        self.stop()

        def restart():
            time.sleep(seconds)
            self.start()

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        return thread


@contextlib.contextmanager
def restartable_s3_server():
    """`s3_server`, yielding the server itself (a `RestartableS3`)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = RestartableS3(free_port())
    server.start()
    try:
        with aws_settings(server.url):
            yield server
    finally:
        server.stop()


@contextlib.contextmanager
def aws_settings(url: str):
    """The standard AWS variables pointing at the S3 server at `url`, with the test credentials and
    nothing of this machine's own AWS configuration."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", url)
        patch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        patch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/twig-batch-test-aws-config")
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/twig-batch-test-aws-credentials")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            patch.delenv(name, raising=False)
        yield


class SharedCluster:
    """The local Ray cluster (4 logical CPUs) and moto S3 server that the batch-job test modules share,
    started on first use: starting a cluster and its first workers costs tens of seconds on a two-core
    machine, once per session instead of once per module. The cluster starts with the S3 server's
    variables set, so its workers inherit them as a cluster started inside `s3_server()` does; the
    driver gets them only in the modules that ask for S3 (`aws_settings`). conftest.py keeps it
    running only where a module's own cluster would run, and stops it before any other test."""

    NUM_CPUS = 4

    def __init__(self):
        self.s3: RestartableS3 | None = None
        self._ray = None

    @property
    def running(self) -> bool:
        return self._ray is not None and self._ray.is_initialized()

    def s3_url(self) -> str:
        if self.s3 is None:
            logging.getLogger("werkzeug").setLevel(logging.ERROR)
            self.s3 = RestartableS3(free_port())
            self.s3.start()
        return self.s3.url

    def start(self):
        if not self.running:
            url = self.s3_url()
            with aws_settings(url):
                self._ray = _start_local_ray(self.NUM_CPUS)
        return self._ray

    def stop_ray(self) -> None:
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    def close(self) -> None:
        self.stop_ray()
        if self.s3 is not None:
            self.s3.stop()
            self.s3 = None


SHARED_CLUSTER = SharedCluster()


def s3_client():
    import boto3

    return boto3.client("s3")


def upload_parquet(bucket: str, key: str, table: pa.Table) -> str:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    s3_client().put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    return f"s3://{bucket}/{key}"


@contextlib.contextmanager
def strict_s3_server():
    """A second moto server that checks credentials (authentication on from the first request)."""
    import subprocess
    import sys
    import time

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextlib.contextmanager
def ray_head(*, auth_mode: str | None, home: Path, num_cpus: int = 3, num_gpus: int = 0):
    """A `ray start --head` of our own, as the docs start one: private ports, temp dir and home (where
    Ray keeps `~/.ray/auth_token`), so it neither joins nor disturbs other clusters. `auth_mode`
    None leaves RAY_AUTH_MODE unset, Ray's default. Yields (dashboard URL, GCS address, env): env
    is this process's environment with the head's home and temp dir, and RAY_ADDRESS, RAY_AUTH_MODE
    removed. The temp dir is `$RAY_TMPDIR/ray`, so a driver with that env finds the head by itself."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import time
    import urllib.request

    base = tempfile.mkdtemp(prefix="twig-ray-", dir="/tmp")  # short: Ray's socket paths live below it
    env = dict(os.environ, HOME=str(home), RAY_TMPDIR=base)
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    # No drain: nothing to hand over. The workers get no AWS settings of this shell's: a workstation
    # cluster started in another shell has none.
    head_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    head_env.update(RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", AWS_EC2_METADATA_DISABLED="true")
    if auth_mode is not None:
        head_env["RAY_AUTH_MODE"] = auth_mode
    dashboard, gcs_port = free_port(), free_port()
    ports = {"--port": gcs_port, "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    command = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
               "--include-dashboard", "true", "--num-cpus", str(num_cpus), "--temp-dir", f"{base}/ray",
               "--disable-usage-stats"] + (["--num-gpus", str(num_gpus)] if num_gpus else [])  # GPUs in name only
    for flag, port in ports.items():
        command += [flag, str(port)]
    log_path = Path(base) / "head.log"
    log = open(log_path, "w")
    head = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=2).read()
                break
            except OSError:
                assert head.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(0.5)
        yield address, f"127.0.0.1:{gcs_port}", env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def cluster_auth_mode(dashboard: str) -> str:
    """What a head says of its token authentication: "token" or "disabled"."""
    import json
    import urllib.request

    return json.loads(urllib.request.urlopen(f"{dashboard}/api/authentication_mode", timeout=5).read())[
        "authentication_mode"]
