"""Fault plans: validation, where they come from, the shared kill cap, and injected storage failures."""
import json
import multiprocessing
import os
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from batch_support import s3_client, s3_server, write_prompts
from twig_batch.distributed import faults
from twig_batch.cli import app
from twig_batch.distributed.run_config import RunConfig
from twig_batch.errors import InputError
from twig_batch.distributed.faults import ActorFaults, FaultPlan
from twig_batch.io.retry import RetryPolicy
from twig_batch.io.storage import open_storage

FAST = RetryPolicy(attempts=2, base_delay_s=0, max_delay_s=0)


def test_plan_round_trips_and_is_off_by_default(tmp_path):
    assert not FaultPlan().active
    plan = FaultPlan(kill_worker_after_rows=50, max_kills=3, storage_failure_rate=0.1, storage_failure_kind="reset",
                     actor_delay_s=0.5, delayed_actors=1, seed=7, state_dir=str(tmp_path / "state"))
    assert plan.active and FaultPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert FaultPlan(state_dir="relative/dir").state_dir == os.path.abspath("relative/dir")


@pytest.mark.parametrize("values, fragment", [
    ({"kill_worker_after_rows": 0, "state_dir": "/tmp/x"}, "kill_worker_after_rows"),
    ({"kill_worker_after_rows": 5}, "state_dir is required"),
    ({"delayed_actors": 1, "actor_delay_s": 1}, "state_dir is required"),
    ({"max_kills": -1}, "max_kills"),
    ({"storage_failure_rate": 1.5}, "storage_failure_rate"),
    ({"storage_failure_rate": float("nan")}, "storage_failure_rate"),
    ({"storage_failure_kind": "404"}, "storage_failure_kind must be one of 503, throttle, reset"),
    ({"actor_delay_s": -0.1}, "actor_delay_s"),
    ({"start_delay_s": -1, "state_dir": "/tmp/x"}, "start_delay_s"),
    ({"start_delay_s": 2}, "state_dir is required"),
    ({"seed": True}, "seed"),
    ({"kill_after": 3}, "unknown setting(s) kill_after"),
])
def test_bad_plans_are_refused_with_the_field_named(values, fragment):
    with pytest.raises(InputError, match="faults: ") as raised:
        FaultPlan.from_dict(values)
    assert fragment in str(raised.value)


def test_plan_from_json_text_file_or_environment(tmp_path, monkeypatch):
    text = '{"storage_failure_rate": 0.25, "seed": 3}'
    (tmp_path / "faults.json").write_text(text)
    assert FaultPlan.parse(text) == FaultPlan.parse(str(tmp_path / "faults.json")) == \
        FaultPlan(storage_failure_rate=0.25, seed=3)
    with pytest.raises(InputError, match="not valid JSON"):
        FaultPlan.parse("{nope")
    with pytest.raises(InputError, match="cannot read fault plan file"):
        FaultPlan.parse(str(tmp_path / "missing.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(InputError, match="JSON object"):
        FaultPlan.parse(str(tmp_path / "list.json"))

    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    assert RunConfig("in.parquet", "out").faults is None
    monkeypatch.setenv(faults.ENV_VAR, '{"actor_delay_s": 0.5}')
    assert RunConfig("in.parquet", "out").faults == FaultPlan(actor_delay_s=0.5)
    assert RunConfig("in.parquet", "out", faults=text).faults == FaultPlan(storage_failure_rate=0.25, seed=3)


def test_cli_refuses_a_bad_plan_before_any_work(tmp_path):
    prompts = write_prompts(tmp_path / "p.parquet", 2)
    result = CliRunner().invoke(app, ["run", str(prompts), "--output", str(tmp_path / "out"),
                                      "--faults", '{"max_kils": 3}'])
    assert result.exit_code == 2 and "unknown setting(s) max_kils" in result.output
    assert not (tmp_path / "out").exists()


class Killed(Exception):
    pass


def _pretend_exit(code):
    raise Killed(code)


def test_kills_land_between_half_and_n_rows_and_stop_at_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "_exit", _pretend_exit)
    plan = FaultPlan(kill_worker_after_rows=10, max_kills=2, seed=5, state_dir=str(tmp_path / "state"))

    def rows_until_killed(actor, batch=4, limit=100):
        for row in range(1, limit + 1):
            if row % batch == 1:
                actor.before_batch(batch)
            try:
                actor.row_stored()
            except Killed as killed:
                assert killed.args == (faults.KILL_EXIT_CODE,)
                return row
        return None

    first = [rows_until_killed(ActorFaults(plan)) for _ in range(4)]
    assert all(5 <= rows <= 10 for rows in first[:2]) and first[2:] == [None, None]  # the cap: 2 kills in all
    kills = faults.markers(plan.state_dir, faults.KILLS_DIR)
    assert [k["rows"] for k in kills] == first[:2] and [k["start"] for k in kills] == [0, 1]
    assert all(1 <= k["written_in_batch"] <= k["batch_rows"] == 4 for k in kills)
    assert len(faults.markers(plan.state_dir, faults.STARTS_DIR)) == 4

    # The same plan in a fresh state folder makes the same choices: kills are seeded, not timed.
    again = FaultPlan(kill_worker_after_rows=10, max_kills=2, seed=5, state_dir=str(tmp_path / "state-2"))
    assert [rows_until_killed(ActorFaults(again)) for _ in range(2)] == first[:2]

    exact = FaultPlan(kill_worker_after_rows=7, kill_at_random=False, max_kills=3, state_dir=str(tmp_path / "s3"))
    assert [rows_until_killed(ActorFaults(exact)) for _ in range(3)] == [7, 7, 7]


def _try_to_kill(state_dir):
    return faults._claim_next(Path(state_dir) / faults.KILLS_DIR, {"pid": os.getpid()}, limit=3)


def test_the_kill_cap_holds_across_racing_processes(tmp_path):
    with multiprocessing.get_context("fork").Pool(8) as pool:
        claimed = pool.map(_try_to_kill, [str(tmp_path)] * 24)
    assert sorted(c for c in claimed if c is not None) == [0, 1, 2]
    assert len(faults.markers(tmp_path, faults.KILLS_DIR)) == 3


def test_delays_only_the_first_actors_to_start(tmp_path, monkeypatch):
    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    plan = FaultPlan(actor_delay_s=0.2, delayed_actors=1, state_dir=str(tmp_path))
    slow, fast = ActorFaults(plan), ActorFaults(plan)
    for _ in range(3):
        slow.before_batch(3)
        fast.before_batch(3)
    assert slept == [0.2] * 3
    assert [d["start"] for d in faults.markers(tmp_path, faults.DELAYS_DIR)] == [0] * 3


def _generator(tmp_path, plan):
    from twig_batch.distributed.image_generator import ImageGenerator

    return ImageGenerator(model="tiny-micro", output=str(tmp_path / "out"), faults=plan.to_dict())


def _work(count):
    return pa.table({"id": [f"w{i}" for i in range(count)], "prompt": [f"a cube {i}" for i in range(count)],
                     "sample_index": [0] * count, "seed": list(range(count))})


def test_a_write_that_keeps_failing_becomes_that_rows_error(tmp_path):
    plan = FaultPlan(storage_failure_rate=1.0, storage_failure_kind="throttle", state_dir=str(tmp_path / "state"))
    generator = _generator(tmp_path, plan)
    generator.storage.retry_policy = FAST
    rows = generator.draw_all(_work(3)).to_pylist()
    assert [r["status"] for r in rows] == ["error"] * 3
    assert all(r["error"].startswith("writing the outputs failed: BlockingIOError") and "injected throttle" in r["error"]
               for r in rows)
    failures = faults.markers(plan.state_dir, faults.STORAGE_FAILURES_DIR)
    assert len(failures) == 3 * FAST.attempts  # each row: its first write, tried twice, then given up
    assert not list((tmp_path / "out").rglob("*.png"))


def test_writes_that_fail_now_and_then_are_retried_to_success(tmp_path):
    plan = FaultPlan(storage_failure_rate=0.4, storage_failure_kind="503", seed=11, state_dir=str(tmp_path / "state"))
    generator = _generator(tmp_path, plan)
    generator.storage.retry_policy = RetryPolicy(attempts=10, base_delay_s=0, max_delay_s=0)
    rows = generator.draw_all(_work(6)).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 6
    injected = faults.markers(plan.state_dir, faults.STORAGE_FAILURES_DIR)
    writes = len(list((tmp_path / "out").rglob("*.png")))  # 6 final images and their band images
    assert writes == 6 * 4 and 0 < len(injected) < writes
    assert {f["kind"] for f in injected} == {"503"}


# ---- S3: failures made at the HTTP level, under botocore's own retries ----

@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        s3_client().create_bucket(Bucket="faults")
        yield endpoint


def count_sends(store, operation="PutObject"):
    sends = []
    store.client.meta.events.register(f"before-send.s3.{operation}", lambda request, **_: sends.append(1))
    return sends


def fail_first(store, count, answer):
    left = [count]

    def hook(request, **_):
        if left[0] > 0:
            left[0] -= 1
            return answer(request.url)
        return None

    store.client.meta.events.register("before-send.s3.PutObject", hook)


@pytest.mark.parametrize("kind", faults.STORAGE_FAILURE_KINDS)
def test_botocore_retries_each_injected_s3_failure(s3, kind):
    store = open_storage(f"s3://faults/{kind}")
    store.retry_policy = FAST
    sends = count_sends(store)
    fail_first(store, 1, lambda url: faults.synthetic_s3_failure(kind, url))
    store.put("a.png", b"png")
    assert len(sends) == 2 and store.get("a.png") == b"png"


def test_our_retries_take_over_when_botocores_run_out(s3):
    store = open_storage("s3://faults/layered")
    store.retry_policy = RetryPolicy(attempts=3, base_delay_s=0, max_delay_s=0)
    sends = count_sends(store)
    fail_first(store, 4, lambda url: faults.synthetic_s3_failure("throttle", url))  # botocore tries 3 times
    store.put("b.png", b"png")
    assert len(sends) == 5 and store.get("b.png") == b"png"


def test_access_denied_is_not_retried(s3):
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ClientError

    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    store = open_storage("s3://faults/denied")
    sends = count_sends(store)
    fail_first(store, 99, lambda url: AWSResponse(url, 403, {}, faults._Body(body)))
    with pytest.raises(ClientError, match="AccessDenied"):
        store.put("c.png", b"png")
    assert len(sends) == 1


def test_s3_fault_plan_fails_a_fraction_of_puts_and_every_one_is_retried(s3, tmp_path):
    store = open_storage("s3://faults/plan")
    store.retry_policy = FAST
    sends = count_sends(store)
    plan = FaultPlan(storage_failure_rate=0.3, storage_failure_kind="503", seed=2, state_dir=str(tmp_path))
    ActorFaults(plan, store)
    for i in range(12):
        store.put(f"k{i}.png", b"png")
    injected = faults.markers(tmp_path, faults.STORAGE_FAILURES_DIR)
    assert 0 < len(injected) and len(sends) == 12 + len(injected)
    listed = s3_client().list_objects_v2(Bucket="faults", Prefix="plan/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"plan/k{i}.png" for i in range(12))
