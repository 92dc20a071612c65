"""transformers' own Janus image `generate` runs on the models this project builds.

It is the benchmarks' native anchor (benchmarks/bench_common.py); this runs the anchor's own inputs
and call on the tiny model, so a generation config or a call that transformers rejects fails here
on a CPU instead of in the GPU run.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from twig_batch.model import load_janus

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their shared module by bare name
    import bench_common

    return bench_common


def test_native_image_generate_draws_every_image_token(bench_common):
    bundle = load_janus("tiny-micro")  # 36 image tokens a row: the anchor's path in a few seconds
    ids = bench_common.native_generate_inputs(bundle, 2)
    assert (ids[:, -1] == bundle.tokens.boi).all()
    torch.manual_seed(0)
    with torch.no_grad():
        codes = bench_common.native_generate(bundle, ids)
    assert codes.shape == (2, bundle.image_tokens)
    assert codes.min() >= 0 and codes.max() < bundle.model.config.vq_config.num_embeddings
