"""transformers' own Janus image `generate` runs on the models this project builds.

It is the speed suite's native anchor (benchmarks/plain_speed.py); this runs the anchor's own inputs
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
def plain_speed(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import each other by bare name
    import plain_speed

    return plain_speed


def test_native_image_generate_draws_every_image_token(plain_speed):
    bundle = load_janus("tiny-micro")  # 36 image tokens a row: the anchor's path in a few seconds
    ids = plain_speed.native_generate_inputs(bundle, 2)
    assert (ids[:, -1] == bundle.tokens.boi).all()
    torch.manual_seed(0)
    with torch.no_grad():
        codes = plain_speed.native_generate(bundle, ids)
    assert codes.shape == (2, bundle.image_tokens)
    assert codes.min() >= 0 and codes.max() < bundle.model.config.vq_config.num_embeddings
