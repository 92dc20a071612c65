"""How a run's work is cut into actor calls on GPUs: every actor gets work, the same amount, in calls
as big as they may be."""
import math

import pytest

from twig_batch.distributed.run_config import RunConfig


@pytest.mark.parametrize("items", [1, 7, 64, 100, 128, 600, 1000, 1024, 4096, 100_001])
@pytest.mark.parametrize("actors", [1, 2, 3, 8])
def test_gpu_calls_share_the_run_evenly_and_stay_big(items, actors):
    per_call = RunConfig("in.parquet", "out").work_batch(1.0, items, actors)
    calls = math.ceil(items / per_call)
    assert 1 <= per_call <= 256  # never above the largest batch
    # Handed out in turn, every actor gets the same number of calls, give or take the last one's rest...
    if items >= actors:
        shares = [0] * actors
        for call in range(calls):
            shares[call % actors] += min(per_call, items - call * per_call)
        assert max(shares) - min(shares) <= per_call
        assert min(shares) > 0  # ...and no actor is left out
    # No more calls than the largest batch needs: one actor with a short run draws it in one call.
    assert calls <= actors * math.ceil(items / (actors * 256))
    if actors == 1 and items <= 256:
        assert per_call == items


def test_an_explicit_size_and_a_cpu_keep_their_calls():
    assert RunConfig("in.parquet", "out", work_batch_size=48).work_batch(1.0, 10_000, 2) == 48
    assert RunConfig("in.parquet", "out", images_per_call=8).work_batch(1.0, 10_000, 2) == 8
    # On a CPU a call is one small batch, whatever the run: smaller than a GPU's calls, never the run's size.
    on_cpu = RunConfig("in.parquet", "out").work_batch(0, 10_000, 2)
    assert on_cpu == RunConfig("in.parquet", "out").work_batch(0, 300, 1)
    assert 1 <= on_cpu < RunConfig("in.parquet", "out").work_batch(1.0, 10_000, 2)
