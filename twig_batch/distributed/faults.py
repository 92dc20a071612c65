"""Fault injection for testing a run's recovery: crash actors, fail storage writes, slow actors down.

Switched on by configuration only, never by editing code: `twig-batch run ... --faults PLAN`
(JSON text or a JSON file), `RunConfig(faults=...)`, or the `TWIG_BATCH_FAULTS` environment
variable (JSON) for `ray job submit`. The plan travels to every model actor with its constructor
arguments and is recorded in run.json, so a run that was made to fail says so.

- `kill_worker_after_rows=n`: an actor process hard-exits (`os._exit`, no clean-up, like a kill -9
  or a lost node) after a seeded random number of rows between n/2 and n, counted from its start
  (after exactly n rows with `kill_at_random=false`).
  The check runs after each row's objects are written, so the actor dies mid-batch: some images of
  the batch exist, its rows were never returned. Ray restarts the actor and retries the batch.
- `max_kills`: the kills allowed in the whole run, over all actors and their restarts. A restarted
  actor remembers nothing, so kills are counted as marker files in `state_dir`, each created with
  O_EXCL: two actors dying at once cannot both take the last kill.
- `storage_failure_rate` / `storage_failure_kind`: that fraction of the actors' storage writes fails
  transiently. On S3 the failure is made at the HTTP level (a botocore `before-send` hook answers
  instead of the server), so botocore's own retries and ours both run; locally the write raises a
  transient OSError before touching the disk.
- `actor_delay_s`: each batch sleeps this long first (only in the first `delayed_actors` actors to
  start, when that is set): a straggler.
- `start_delay_s`: every actor but the first to start waits this long at the end of its start: actors
  that join late, as on a busy cluster (needs `state_dir`, where starts are counted).
- `oom_above_images=n`: a model call of more than n images raises an out-of-memory error before
  drawing, as a GPU would with too large a part.
- `part_delay_s`: each model call sleeps this long first: slow parts, to watch rows arrive part by part.
- `fail_prompts_containing=text`: a model call that holds a prompt containing `text` raises an
  error, as a row that breaks the generation would.
- `kernels_fail_to_compile=true`: every helper kernel of the actor's engine fails to compile at its
  first use (on a CPU too, where none is otherwise compiled), as on a platform without a compiler:
  the helpers run as written, and the actor says which.

`state_dir` is a folder on the actors' local filesystem (shared by every actor of a one-machine
cluster); each kill, injected storage failure and delayed batch leaves a small file there, which is
how tests count what actually happened.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from twig_batch.errors import InputError

ENV_VAR = "TWIG_BATCH_FAULTS"
STORAGE_FAILURE_KINDS = ("503", "throttle", "reset")
KILL_EXIT_CODE = 86  # what an injected kill exits with, to tell it apart in worker logs

KILLS_DIR, STARTS_DIR, STORAGE_FAILURES_DIR, DELAYS_DIR = "kills", "actor-starts", "storage-failures", "delays"


@dataclass(slots=True)
class FaultPlan:
    kill_worker_after_rows: int | None = None
    kill_at_random: bool = True  # False: after exactly kill_worker_after_rows rows
    max_kills: int = 1
    storage_failure_rate: float = 0.0
    storage_failure_kind: str = "503"
    actor_delay_s: float = 0.0
    delayed_actors: int | None = None  # None: every actor is delayed
    start_delay_s: float = 0.0
    oom_above_images: int | None = None
    part_delay_s: float = 0.0
    fail_prompts_containing: str | None = None
    kernels_fail_to_compile: bool = False
    seed: int = 0
    state_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kill_worker_after_rows is not None and not _whole(self.kill_worker_after_rows, 1):
            raise InputError(f"faults: kill_worker_after_rows must be a whole number >= 1, got "
                             f"{self.kill_worker_after_rows!r}")
        if not isinstance(self.kill_at_random, bool):
            raise InputError(f"faults: kill_at_random must be true or false, got {self.kill_at_random!r}")
        if not _whole(self.max_kills, 0):
            raise InputError(f"faults: max_kills must be a whole number >= 0, got {self.max_kills!r}")
        if not _number(self.storage_failure_rate) or not 0 <= self.storage_failure_rate <= 1:
            raise InputError(f"faults: storage_failure_rate must lie in [0, 1], got {self.storage_failure_rate!r}")
        if self.storage_failure_kind not in STORAGE_FAILURE_KINDS:
            raise InputError(f"faults: storage_failure_kind must be one of {', '.join(STORAGE_FAILURE_KINDS)}, "
                             f"got {self.storage_failure_kind!r}")
        if not _number(self.actor_delay_s) or self.actor_delay_s < 0:
            raise InputError(f"faults: actor_delay_s must be a number >= 0, got {self.actor_delay_s!r}")
        if self.delayed_actors is not None and not _whole(self.delayed_actors, 1):
            raise InputError(f"faults: delayed_actors must be a whole number >= 1, got {self.delayed_actors!r}")
        if not _number(self.start_delay_s) or self.start_delay_s < 0:
            raise InputError(f"faults: start_delay_s must be a number >= 0, got {self.start_delay_s!r}")
        if not _number(self.part_delay_s) or self.part_delay_s < 0:
            raise InputError(f"faults: part_delay_s must be a number >= 0, got {self.part_delay_s!r}")
        if self.oom_above_images is not None and not _whole(self.oom_above_images, 1):
            raise InputError(f"faults: oom_above_images must be a whole number >= 1, got {self.oom_above_images!r}")
        if self.fail_prompts_containing is not None and (not isinstance(self.fail_prompts_containing, str)
                                                         or not self.fail_prompts_containing):
            raise InputError(f"faults: fail_prompts_containing must be non-empty text, got "
                             f"{self.fail_prompts_containing!r}")
        if not isinstance(self.kernels_fail_to_compile, bool):
            raise InputError(f"faults: kernels_fail_to_compile must be true or false, got "
                             f"{self.kernels_fail_to_compile!r}")
        if not _whole(self.seed, None):
            raise InputError(f"faults: seed must be a whole number, got {self.seed!r}")
        if self.state_dir is not None:
            # Absolute, so that actors (whose working folder is Ray's) find the same folder.
            self.state_dir = str(Path(self.state_dir).expanduser().resolve())
        elif self.kill_worker_after_rows is not None or self.delayed_actors is not None or self.start_delay_s > 0:
            raise InputError("faults: state_dir is required with kill_worker_after_rows, delayed_actors or "
                             "start_delay_s (kills and actor starts are counted there, across restarts)")

    @property
    def active(self) -> bool:
        return (self.kill_worker_after_rows is not None and self.max_kills > 0) or self.storage_failure_rate > 0 \
            or self.actor_delay_s > 0 or self.start_delay_s > 0 or self.part_delay_s > 0 or self.oom_above_images is not None or self.fail_prompts_containing is not None \
            or self.kernels_fail_to_compile

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FaultPlan":
        if not isinstance(values, dict):
            raise InputError(f"faults: a fault plan is a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"faults: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        """JSON text (starting with `{`) or the path of a JSON file."""
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).expanduser().read_text()
            except OSError as exc:
                raise InputError(f"faults: cannot read fault plan file {text}: {exc.strerror or exc}") from None
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise InputError(f"faults: the fault plan is not valid JSON ({exc})") from None
        return cls.from_dict(values)


def resolve_plan(value) -> FaultPlan | None:
    """A plan from RunConfig's `faults` (plan, dict, JSON text or file), else from TWIG_BATCH_FAULTS."""
    if value is None:
        value = os.environ.get(ENV_VAR) or None
    if value is None or isinstance(value, FaultPlan):
        return value
    if isinstance(value, dict):
        return FaultPlan.from_dict(value)
    if isinstance(value, str):
        return FaultPlan.parse(value)
    raise InputError(f"faults: expected a fault plan, a dict or JSON text, got {type(value).__name__}")


def _whole(value, minimum: int | None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- markers in state_dir: how actors share counts across processes and restarts ----

def _claim(folder: Path, name: str, record: dict) -> bool:
    """Create folder/name exactly once across all processes; True when this call created it."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as out:
        json.dump(record, out)
    return True


def _claim_next(folder: Path, record: dict, limit: int | None = None) -> int | None:
    """The lowest free index below `limit` (unbounded without one), claimed; None when all are taken."""
    index = 0
    while limit is None or index < limit:
        if _claim(folder, f"{index:06d}.json", record):
            return index
        index += 1
    return None


def markers(state_dir: str | os.PathLike, kind: str) -> list[dict]:
    """The records left in `state_dir` by one kind of fault (KILLS_DIR, STORAGE_FAILURES_DIR, ...)."""
    folder = Path(state_dir) / kind
    if not folder.is_dir():
        return []
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


# ---- what one actor does with a plan ----

class ActorFaults:
    """The faults of one actor process, from its start until it exits (or is made to)."""

    def __init__(self, plan: FaultPlan, storage=None):
        self.plan = plan
        self.state = Path(plan.state_dir) if plan.state_dir else None
        # Each start of an actor (a restart too) takes the next start number: it seeds this actor's
        # choices, so runs with the same plan make the same choices in the same order of starts.
        self.start = _claim_next(self.state / STARTS_DIR, {"pid": os.getpid(), "at": time.time()}) \
            if self.state else 0
        self.rng = random.Random(f"{plan.seed}:{self.start}")
        self.rows = 0
        self.rows_in_batch = 0
        self.batch_rows = 0
        self.kill_at = None
        if plan.kill_worker_after_rows is not None and plan.max_kills > 0:
            n = plan.kill_worker_after_rows
            self.kill_at = self.rng.randint(max(1, math.ceil(n / 2)), n) if plan.kill_at_random else n
        self.delayed = plan.actor_delay_s > 0 and (plan.delayed_actors is None or self.start < plan.delayed_actors)
        if storage is not None and plan.storage_failure_rate > 0:
            install_storage_faults(storage, plan, random.Random(f"{plan.seed}:storage:{self.start}"), self.state)
        if plan.start_delay_s > 0 and self.start >= 1:
            time.sleep(plan.start_delay_s)  # a late joiner: the first actor to start is ready well before it

    def on_engine(self, engine) -> None:
        """Called once the actor's engine is built: maybe make its kernels fail to compile."""
        if self.plan.kernels_fail_to_compile:
            engine.model.kernels = _kernels_that_fail_to_compile()

    def before_batch(self, rows: int) -> None:
        self.rows_in_batch, self.batch_rows = 0, rows
        if self.delayed:
            if self.state:
                _claim(self.state / DELAYS_DIR, f"{uuid.uuid4().hex}.json", {"start": self.start})
            time.sleep(self.plan.actor_delay_s)

    def before_part(self, requests: list) -> None:
        """Called before each model call with its requests: maybe fail it as the plan says."""
        plan = self.plan
        time.sleep(plan.part_delay_s)
        if plan.oom_above_images is not None and len(requests) > plan.oom_above_images:
            import torch

            raise torch.OutOfMemoryError(f"injected: a part of {len(requests)} images, more than "
                                         f"{plan.oom_above_images}")
        if plan.fail_prompts_containing is not None:
            for request in requests:
                if plan.fail_prompts_containing in request.prompt:
                    raise RuntimeError(f"injected failure for a prompt containing {plan.fail_prompts_containing!r}")

    def row_stored(self) -> None:
        """Called after each row's objects are written and before the batch returns: maybe die here."""
        self.rows += 1
        self.rows_in_batch += 1
        if self.kill_at is None or self.rows < self.kill_at:
            return
        self.kill_at = None  # one try per process: when the cap is reached, this actor lives on
        record = {"pid": os.getpid(), "start": self.start, "rows": self.rows, "written_in_batch": self.rows_in_batch,
                  "batch_rows": self.batch_rows, "at": time.time()}
        if _claim_next(self.state / KILLS_DIR, record, limit=self.plan.max_kills) is not None:
            os._exit(KILL_EXIT_CODE)  # no clean-up, no flush: as abrupt as a lost machine


def _kernels_that_fail_to_compile():
    from twig_batch.engine.fused import Kernels

    class Uncompilable(Kernels):
        def compiles_on(self, device) -> bool:
            return True

        def _hand_written(self, name):
            return None

        def _compile(self, fn):
            def compiled(*args):
                raise RuntimeError("injected: no compiler on this platform")

            return compiled

    return Uncompilable()


# ---- storage failures ----

def install_storage_faults(storage, plan: FaultPlan, rng: random.Random, state: Path | None = None) -> None:
    """Make `plan.storage_failure_rate` of `storage`'s writes fail with `plan.storage_failure_kind`."""
    def record(key: str) -> None:
        if state is not None:
            _claim(state / STORAGE_FAILURES_DIR, f"{uuid.uuid4().hex}.json",
                   {"kind": plan.storage_failure_kind, "key": key, "pid": os.getpid()})

    if hasattr(storage, "bucket"):  # S3: fail at the HTTP level, under botocore's retries
        def answer_instead(request, **_):
            if rng.random() >= plan.storage_failure_rate:
                return None  # botocore sends the request as usual
            record(request.url)
            return synthetic_s3_failure(plan.storage_failure_kind, request.url)

        storage.client.meta.events.register("before-send.s3.PutObject", answer_instead)
    else:
        def fail_write(key: str) -> None:
            if rng.random() < plan.storage_failure_rate:
                record(key)
                raise local_failure(plan.storage_failure_kind, key)

        storage.inject_write_fault = fail_write


_S3_ANSWERS = {"503": (503, "ServiceUnavailable", "Service is unable to handle request."),
               "throttle": (503, "SlowDown", "Please reduce your request rate.")}


def synthetic_s3_failure(kind: str, url: str):
    """What S3 answers when it is overloaded, or a connection dropped before any answer."""
    from botocore.awsrequest import AWSResponse
    from botocore.exceptions import ConnectionClosedError

    if kind == "reset":
        raise ConnectionClosedError(endpoint_url=url)
    status, code, message = _S3_ANSWERS[kind]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>injected-{uuid.uuid4().hex[:16]}</RequestId></Error>").encode()
    return AWSResponse(url, status, {"Content-Type": "application/xml", "Content-Length": str(len(body))},
                       _Body(body))


class _Body:
    """The least of a urllib3 response that AWSResponse reads a body from."""

    def __init__(self, data: bytes):
        self.data = data

    def stream(self, **_):
        yield self.data


def local_failure(kind: str, key: str) -> OSError:
    import errno

    number = {"503": errno.EIO, "throttle": errno.EAGAIN, "reset": errno.ECONNRESET}[kind]
    return OSError(number, f"{os.strerror(number)} (injected {kind} failure)", key)
