"""Shared fixtures: tiny checkpoints in both layouts, built once per test session."""
from __future__ import annotations

import os

import pytest
import torch

# Keep model caches and Ray's files inside the test run, never in the user's home.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Texts run as the model writes them unless a test asks for the benchmark-only length emulation.
os.environ.pop("TWIG_BATCH_EMULATE_TEXT_LENGTHS", None)


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
