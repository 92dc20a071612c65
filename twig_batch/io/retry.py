"""Retrying storage calls that failed for a passing reason: throttling, 5xx, a dropped connection.

Object stores fail now and then by design (S3 answers 503 SlowDown while it scales a prefix) and
network mounts drop connections. Such a failure is worth a few more tries, spread out with
exponential backoff and full jitter so that many actors do not retry in lockstep; a failure that
will not go away (access denied, no such bucket, a full disk) is raised at once. The policy is
bounded twice, by attempts and by total time, so a dead endpoint ends in an error, not a hang.

botocore retries each request a few times on its own (see `s3.new_client`); this layer sits above
it and also covers local storage, which has no retries of its own.
"""
from __future__ import annotations

import errno
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")

# S3 error codes that mean "later, please" whatever the HTTP status says.
_TRANSIENT_S3_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "InternalError",
    "ServiceUnavailable", "OperationAborted",
})
# OS errors a network filesystem (NFS, FUSE mounts of object stores, Lustre) raises and later recovers from.
_TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.ECONNREFUSED, errno.EPIPE, errno.ESTALE, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN,
})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    # An object store's outage (a restarted endpoint, a network blip, minutes of throttling) is ridden
    # out, as the S3 clients of Ray Data and img2dataset do: minutes, not seconds. Bounded by time, so
    # that an endpoint that stays down ends in error rows and an exit status, never a hang.
    attempts: int = 100  # calls in all, the first included
    base_delay_s: float = 0.5  # the first backoff is drawn from [0, base]; each later one doubles the bound
    max_delay_s: float = 15.0  # no single wait is longer than this
    total_s: float = 300.0  # no retry starts after this much time since the first call (--storage-retry-s)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("delays must satisfy 0 <= base_delay_s <= max_delay_s")
        if self.total_s < 0:
            raise ValueError(f"total_s must be >= 0, got {self.total_s}")

    def backoff_bound(self, retry: int) -> float:
        """The longest wait before retry number `retry` (1 for the first retry)."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (retry - 1))


DEFAULT_POLICY = RetryPolicy()


def is_transient(exc: BaseException) -> bool:
    """True for failures that a later identical call may not meet; False for everything else."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotocoreConnectionError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if str(error.get("Code", "")) in _TRANSIENT_S3_CODES:
            return True
        return isinstance(status, int) and (status >= 500 or status == 429)
    if isinstance(exc, (HTTPClientError, BotocoreConnectionError, IncompleteReadError)):
        return True  # connection reset or refused, read/connect timeout, proxy hiccup, a body cut short
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


def call_with_retries(call: Callable[[], T], policy: RetryPolicy = DEFAULT_POLICY, *,
                      transient: Callable[[BaseException], bool] = is_transient,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                      jitter: Callable[[], float] = random.random, watcher=None) -> T:
    """`call()`, called again after a transient failure while the policy allows; the last failure is raised.

    `watcher` (optional) hears of each retry (`retrying(exc, seconds_since_first_call)`) and of a call
    that went through after retries (`recovered(seconds)`), so a run can say that it is waiting.
    `clock`, `sleep` and `jitter` (a number in [0, 1)) are there so tests can run the policy on a fake clock.
    """
    started = clock()
    retry = 0
    while True:
        try:
            result = call()
        except Exception as exc:
            retry += 1
            if not transient(exc) or retry >= policy.attempts:
                _note(exc, retry, transient(exc))
                raise
            delay = jitter() * policy.backoff_bound(retry)
            if clock() - started + delay > policy.total_s:
                _note(exc, retry, True)
                raise
            if watcher is not None:
                watcher.retrying(exc, clock() - started)
            sleep(delay)
            continue
        if retry and watcher is not None:
            watcher.recovered(clock() - started)
        return result


def _note(exc: BaseException, calls: int, transient: bool) -> None:
    if transient and calls > 1 and hasattr(exc, "add_note"):  # notes: Python 3.11+
        exc.add_note(f"(gave up after {calls} attempts)")
