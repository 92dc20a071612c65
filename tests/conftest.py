"""Shared fixtures: tiny checkpoints in both layouts, built once per test session."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Keep model caches and Ray's files inside the test run, never in the user's home.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Texts run as the model writes them unless a test asks for the benchmark-only length emulation.
os.environ.pop("TWIG_BATCH_EMULATE_TEXT_LENGTHS", None)
# Without a GPU, the engine's Triton kernels run in Triton's interpreter (test_triton_kernels.py,
# test_fp8_kv.py); Triton reads this once, when it is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_takes_loaded_loop_bounds() -> None:
    """A kernel's loop may run to a bound it loaded from memory (the paged-attention kernel's). Triton
    3.5's interpreter turns that scalar into a Python int with int() of a one-element array, which
    NumPy 2.4 refuses; read its one element instead."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None:
        return

    def patched(tensor):
        patch_tensor(tensor)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(-1)[0])

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_takes_loaded_loop_bounds()
# One math thread per process, as Ray gives each actor of one CPU. The tiny models' operations are far
# too small to gain from a second thread, and on a small machine shared with Ray's workers (and other
# jobs) the threads of a process spin waiting for each other: the docs snippets' in-process drawing
# took more than twice as long with two, and the engine tests twice the CPU time. The variable
# reaches the processes the tests start (CLI drivers, quickstart.sh, Ray heads and their workers).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["TWIG_BATCH_CACHE"] = str(tmp_path_factory.mktemp("twig-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    from twig_batch.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-hf"), layout="hf", seed=0)


@pytest.fixture(scope="session")
def tiny_deepseek_dir(tmp_path_factory):
    from twig_batch.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-deepseek"), layout="deepseek", seed=0)


@pytest.fixture(scope="session")
def tiny64(tiny_hf_dir):
    """The tiny model in float64 on CPU: the setting in which paths must agree token for token."""
    from twig_batch.model import load_janus

    return load_janus(str(tiny_hf_dir), "cpu", torch.float64)


# ---- the local Ray cluster the batch-job modules share (batch_support.SharedCluster) -------------

@pytest.fixture(scope="module")
def shared_ray():
    """A local Ray cluster of 4 logical CPUs, started with the S3 server's variables; yields `ray`."""
    from batch_support import SHARED_CLUSTER

    return SHARED_CLUSTER.start()


@pytest.fixture(scope="module")
def shared_ray_s3(shared_ray):
    """`shared_ray`, with the standard AWS variables pointing at its S3 server for this module; yields
    the server's URL."""
    from batch_support import SHARED_CLUSTER, aws_settings

    url = SHARED_CLUSTER.s3_url()
    with aws_settings(url):
        yield url


def _uses_shared_ray(item) -> bool:
    return "shared_ray" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The modules on the shared cluster run one after another (where the first of them would), so that
    it starts once; every other module keeps its place, and each module its own order."""
    sharing = {getattr(item, "module", None) for item in items if _uses_shared_ray(item)}
    if len(sharing) < 2:
        return
    first = next(index for index, item in enumerate(items) if getattr(item, "module", None) in sharing)
    together = [item for item in items if getattr(item, "module", None) in sharing]
    rest = [item for item in items if getattr(item, "module", None) not in sharing]
    items[:] = rest[:first] + together + rest[first:]


_MODULES_ON_THE_SHARED_CLUSTER: set = set()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Ray runs in this process exactly where a module's own cluster would: from the first test of a
    module that asks for the cluster to the end of that module. Before any other test it is stopped,
    so a test that expects no Ray here, or starts a cluster of its own, gets just that."""
    if _uses_shared_ray(item):
        _MODULES_ON_THE_SHARED_CLUSTER.add(item.module)
    elif getattr(item, "module", None) not in _MODULES_ON_THE_SHARED_CLUSTER and "batch_support" in sys.modules:
        sys.modules["batch_support"].SHARED_CLUSTER.stop_ray()


def pytest_sessionfinish(session, exitstatus):
    if "batch_support" in sys.modules:
        sys.modules["batch_support"].SHARED_CLUSTER.close()
