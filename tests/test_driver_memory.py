"""The driver streams: its memory stays flat over a 10,000-image run (only small rows reach it)."""
import os
import re
import threading
from pathlib import Path

import pytest

from batch_support import write_prompts
from twig_batch.distributed import RunConfig, run_batch
from twig_batch.distributed.verify_run import verify_run

PROMPTS = 10_000
MB = 1024 * 1024
STATM = Path("/proc/self/statm")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not STATM.exists(), reason="reads resident memory from /proc (Linux)")]


def resident_bytes() -> int:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
GROWTH_LIMIT_MB = 150  # generous: a driver that kept rows or images would grow far more over 10,000


class RssSampler(threading.Thread):
    """This process's resident memory every `every_s` seconds, with the run's progress at that moment."""

    def __init__(self, every_s=0.5):
        super().__init__(daemon=True)
        self.every_s, self.samples, self.done_images = every_s, [], 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.samples.append((self.done_images, resident_bytes()))
            self.stopped.wait(self.every_s)

    def echo(self, line):
        found = re.match(r"progress: (\d+)/", line)
        if found:
            self.done_images = int(found.group(1))


@pytest.fixture(scope="module")
def sampled_run(shared_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    prompts = write_prompts(root / "prompts.parquet", PROMPTS)
    dest = root / "out"
    sampler = RssSampler()
    sampler.start()
    # Each row as cheap as a row can be: the micro model in one band (a final and one band image), in
    # parts of 256 (a part's fixed cost spread over many rows). The driver's share does not change.
    summary = run_batch(RunConfig(input=str(prompts), output=str(dest), model="tiny-micro", actors=2,
                                  settings={"bands": 1}, images_per_call=256, progress_interval_s=0.5),
                        echo=sampler.echo)
    sampler.stopped.set()
    sampler.join()
    return prompts, dest, summary, sampler.samples


def test_driver_memory_stays_flat(sampled_run):
    _, _, summary, samples = sampled_run
    assert summary["ok"] == PROMPTS and summary["manifest_ok"] == PROMPTS
    after_fifth = [rss for done, rss in samples if done >= PROMPTS // 5]
    assert len(after_fifth) >= 20, "too few samples after 20% of the run to judge"
    baseline, peak, last = after_fifth[0], max(after_fifth), after_fifth[-1]
    growth = (peak - baseline) / MB
    print(f"driver RSS over {PROMPTS} images: {baseline / MB:.0f} MB at 20%, peak {peak / MB:.0f} MB, "
          f"end {last / MB:.0f} MB, growth {growth:.1f} MB ({len(samples)} samples, "
          f"{summary['images_per_s']:.0f} images/s)")
    assert growth < GROWTH_LIMIT_MB


def test_the_streamed_run_is_complete(sampled_run):
    prompts, dest, _, _ = sampled_run
    report = verify_run(str(dest), str(prompts))
    assert report.ok, report.problems
    assert report.ok_rows == PROMPTS and report.duplicate_rows == 0
