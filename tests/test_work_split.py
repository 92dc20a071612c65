"""How a run's work is cut into actor calls on GPUs: every actor gets work, and the calls stay big."""
import math

import pytest

from twig_batch.distributed.run_config import RunConfig


@pytest.mark.parametrize("items", [1, 31, 64, 128, 1000, 1024, 4096, 100_000])
@pytest.mark.parametrize("actors", [1, 2, 3, 8])
def test_gpu_calls_reach_every_actor_and_stay_whole_parts(items, actors):
    per_call = RunConfig("in.parquet", "out").work_batch(1.0, items, actors)
    calls = math.ceil(items / per_call)
    assert 32 <= per_call <= 256  # never below one twig part, never above the largest batch
    # Enough calls that every actor draws several (when the run has that many twig parts' worth of work)...
    assert calls >= min(4 * actors, math.ceil(items / 32))
    # ...and no more calls than needed for that: big runs keep the largest calls.
    if items >= 4 * actors * 256:
        assert per_call == 256


def test_an_explicit_size_and_a_cpu_keep_their_calls():
    assert RunConfig("in.parquet", "out", work_batch_size=48).work_batch(1.0, 10_000, 2) == 48
    assert RunConfig("in.parquet", "out", images_per_call=8).work_batch(1.0, 10_000, 2) == 8
    assert RunConfig("in.parquet", "out").work_batch(0, 10_000, 2) == 16
