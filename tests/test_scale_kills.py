"""2,000 prompts while model actors are killed mid-batch at random points: every image exactly once."""
import json
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from batch_support import read_manifest, write_prompts
from twig_batch.cli import app
from twig_batch.distributed import faults
from twig_batch.distributed.verify_run import verify_run

pytestmark = pytest.mark.slow
PROMPTS = 2000
KILLS = 4
BATCH = 100  # images per call: a kill at 150..300 rows lands inside the second or third batch of an actor


@pytest.fixture(scope="module")
def killed_run(shared_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    prompts = write_prompts(root / "prompts.parquet", PROMPTS)
    dest, state = root / "out", root / "fault-state"
    # Each actor start dies after a seeded 150..300 rows until the run's four kills are used up.
    plan = {"kill_worker_after_rows": 300, "max_kills": KILLS, "seed": 1, "state_dir": str(state)}
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(dest), "--model", "tiny-micro",
                                      "--actors", "2", "--images-per-call", str(BATCH), "--journal-every", "500",
                                      "--faults", json.dumps(plan)])
    return prompts, dest, state, result


def test_every_kill_happened_mid_batch_and_each_was_followed_by_a_restart(killed_run):
    _, _, state, result = killed_run
    assert result.exit_code == 0, result.output
    kills = faults.markers(state, faults.KILLS_DIR)
    assert len(kills) == KILLS  # all of them happened, and not one more
    for kill in kills:
        # Images of the batch were already written, its rows not yet returned.
        assert 1 <= kill["written_in_batch"] <= kill["batch_rows"] == BATCH
        assert 150 <= kill["rows"] <= 300
    assert len({kill["pid"] for kill in kills}) == KILLS
    assert len(faults.markers(state, faults.STARTS_DIR)) >= 2 + KILLS


def test_all_rows_recorded_once_and_ok(killed_run):
    prompts, dest, _, result = killed_run
    # The driver counts rows as they stream back: a retried batch's rows arrive once.
    assert f"done: {PROMPTS} image(s) drawn, 0 error(s)" in result.output
    rows = read_manifest(dest).to_pylist()
    assert len(rows) == PROMPTS and {r["status"] for r in rows} == {"ok"}
    assert len({(r["id"], r["sample_index"]) for r in rows}) == PROMPTS
    finals = list((dest / "images").rglob("sample-????.png"))
    assert len(finals) == PROMPTS
    with Image.open(finals[0]) as image:  # the micro model: a 6 x 6 token grid at 4 px per token
        assert image.size == (24, 24)
    assert not list(dest.rglob("*.tmp"))
    report = verify_run(str(dest), str(prompts))
    assert report.ok, report.problems
    assert report.ok_rows == PROMPTS and report.duplicate_rows == 0 and report.missing_items == 0


def test_the_faulty_run_says_so(killed_run):
    _, dest, _, result = killed_run
    assert re.search(r"fault injection is on \(testing only\): .*\"max_kills\": 4", result.output)
    info = json.loads((dest / "run.json").read_text())
    assert info["attempts"][0]["faults"]["kill_worker_after_rows"] == 300 and info["status"] == "complete"
