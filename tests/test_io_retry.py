"""The storage retry policy on a fake clock: which failures retry, how often, how long it waits."""
import errno
import sys

import pytest
from botocore.exceptions import (ClientError, ConnectionClosedError, EndpointConnectionError, NoCredentialsError,
                                 ParamValidationError, ReadTimeoutError)

from twig_batch.io.retry import RetryPolicy, call_with_retries, is_transient
from twig_batch.io.storage import LocalStorage


def s3_error(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


TRANSIENT = [s3_error(503, "SlowDown"), s3_error(503, "ServiceUnavailable"), s3_error(500, "InternalError"),
             s3_error(429, "TooManyRequests"), s3_error(400, "RequestTimeout"), s3_error(400, "Throttling"),
             s3_error(502, "BadGateway"), ConnectionClosedError(endpoint_url="http://s3"),
             ReadTimeoutError(endpoint_url="http://s3"), EndpointConnectionError(endpoint_url="http://s3"),
             ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow"), OSError(errno.EIO, "I/O error"),
             OSError(errno.EAGAIN, "try again"), OSError(errno.ESTALE, "stale NFS handle")]
PERMANENT = [s3_error(403, "AccessDenied"), s3_error(404, "NoSuchBucket"), s3_error(404, "NoSuchKey"),
             s3_error(400, "InvalidArgument"), NoCredentialsError(), ParamValidationError(report="bad"),
             PermissionError(errno.EACCES, "denied"), OSError(errno.ENOSPC, "disk full"), OSError("no errno"),
             FileNotFoundError(errno.ENOENT, "gone"), ValueError("a bug"), KeyError("x")]


@pytest.mark.parametrize("exc", TRANSIENT, ids=repr)
def test_transient_failures_are_retried(exc):
    assert is_transient(exc)


@pytest.mark.parametrize("exc", PERMANENT, ids=repr)
def test_permanent_failures_are_not(exc):
    assert not is_transient(exc)


class FakeTime:
    """A clock that only moves when the code under test sleeps (or a call is said to take time)."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Fails with `failures` in order, then returns "done"; each call may take `takes_s` of fake time."""

    def __init__(self, failures, fake=None, takes_s=0.0):
        self.failures, self.fake, self.takes_s, self.calls = list(failures), fake, takes_s, 0

    def __call__(self):
        self.calls += 1
        if self.fake is not None:
            self.fake.now += self.takes_s
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def run(call, policy, fake, jitter=lambda: 1.0):
    return call_with_retries(call, policy, clock=fake.clock, sleep=fake.sleep, jitter=jitter)


def test_success_after_transient_failures_waits_with_growing_bounds():
    fake = FakeTime()
    call = Flaky([s3_error(503, "SlowDown"), OSError(errno.EIO, "x"), ConnectionResetError()])
    assert run(call, RetryPolicy(attempts=5, base_delay_s=0.5, max_delay_s=10), fake) == "done"
    assert call.calls == 4
    assert fake.sleeps == [0.5, 1.0, 2.0]  # jitter 1.0 shows the bounds themselves: 0.5 * 2**n


def test_gives_up_after_the_attempts_and_raises_the_last_failure():
    fake = FakeTime()
    failures = [s3_error(503, "SlowDown") for _ in range(10)]
    call = Flaky(failures)
    with pytest.raises(ClientError) as raised:
        run(call, RetryPolicy(attempts=4, base_delay_s=0.1, max_delay_s=1), fake)
    assert call.calls == 4 and len(fake.sleeps) == 3
    assert raised.value is failures[3]  # the last failure itself, not a wrapper
    if sys.version_info >= (3, 11):
        assert raised.value.__notes__ == ["(gave up after 4 attempts)"]


def test_permanent_failure_is_raised_at_once():
    fake = FakeTime()
    call = Flaky([s3_error(403, "AccessDenied")])
    with pytest.raises(ClientError, match="AccessDenied"):
        run(call, RetryPolicy(attempts=5), fake)
    assert call.calls == 1 and fake.sleeps == []


def test_each_wait_is_capped_and_jittered():
    fake = FakeTime()
    call = Flaky([TimeoutError() for _ in range(9)])
    draws = iter([0.9, 0.1, 0.5, 0.99, 0.0, 0.7, 0.3, 0.8, 0.6])
    policy = RetryPolicy(attempts=10, base_delay_s=0.25, max_delay_s=3.0, total_s=1e9)
    assert run(call, policy, fake, jitter=lambda: next(draws)) == "done"
    bounds = [min(3.0, 0.25 * 2 ** i) for i in range(9)]
    assert bounds[-1] == 3.0 and max(fake.sleeps) <= 3.0
    assert fake.sleeps == pytest.approx([d * b for d, b in zip([0.9, 0.1, 0.5, 0.99, 0.0, 0.7, 0.3, 0.8, 0.6],
                                                               bounds)])


def test_total_time_bounds_retries_even_with_attempts_left():
    fake = FakeTime()
    call = Flaky([ConnectionResetError() for _ in range(100)], fake, takes_s=7.0)  # each call hangs 7 s first
    policy = RetryPolicy(attempts=100, base_delay_s=1.0, max_delay_s=4.0, total_s=30.0)
    with pytest.raises(ConnectionResetError):
        run(call, policy, fake)
    elapsed = fake.now - 1000.0
    # No retry starts past total_s: at most one call's own time beyond the bound.
    assert elapsed <= policy.total_s + 7.0
    assert 2 <= call.calls < 100


def test_policy_rejects_nonsense():
    for bad in ({"attempts": 0}, {"base_delay_s": -1}, {"base_delay_s": 5, "max_delay_s": 1}, {"total_s": -1}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)


def test_local_put_retries_a_transient_error_and_gives_up_on_a_lasting_one(tmp_path):
    store = LocalStorage(tmp_path)
    store.retry_policy = RetryPolicy(attempts=3, base_delay_s=0, max_delay_s=0)
    store.put("run.json", b"old")
    failures = []

    def flaky_mount(key):
        if len(failures) < 2:
            failures.append(key)
            raise OSError(errno.EIO, "Input/output error", key)

    store.inject_write_fault = flaky_mount
    store.put("run.json", b"new")
    assert failures == ["run.json", "run.json"] and store.get("run.json") == b"new"

    def always(key):
        failures.append(key)
        raise OSError(errno.EIO, "Input/output error", key)

    store.inject_write_fault = always
    with pytest.raises(OSError):
        store.put("run.json", b"newer")
    assert len(failures) == 2 + 3  # three attempts, then the error
    assert store.get("run.json") == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_local_put_does_not_retry_a_full_disk(tmp_path):
    store = LocalStorage(tmp_path)
    calls = []

    def full(key):
        calls.append(key)
        raise OSError(errno.ENOSPC, "No space left on device", key)

    store.inject_write_fault = full
    with pytest.raises(OSError, match="No space"):
        store.put("x.png", b"png")
    assert calls == ["x.png"]
