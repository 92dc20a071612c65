"""`RunConfig`: everything one batch run needs, validated before anything is read or started."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twig_batch.errors import InputError
from twig_batch.settings import GenerationSettings

GPU_WORK_BATCH = 256
# The mixed loop hands rows back as its images finish, so a call may be long; each call ends on its
# slowest image alone, so the fewer calls the better.
MIXED_WORK_BATCH = 1024
CPU_BATCH = 16

if TYPE_CHECKING:
    from twig_batch.distributed.faults import FaultPlan
    from twig_batch.prompts import Templates


@dataclass(slots=True)
class RunConfig:
    input: str
    output: str
    model: str = "tiny"
    # The mode and every other generation setting; a dict of them (`{"mode": "twig"}`) is read once, here.
    settings: GenerationSettings | dict = field(default_factory=GenerationSettings)
    actors: int | None = None  # default: one per GPU in the cluster (one on a CPU-only cluster)
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    images_per_call: int | None = None  # images per model call; default: what fits the GPU (all of a call on a CPU)
    # Work items per actor call; default: images_per_call when given, else up to 256 on a GPU (1024 in
    # the mixed loop; fewer on a short run, see `work_batch`; 16 on a CPU).
    work_batch_size: int | None = None
    samples_per_prompt: int = 1
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # replace whatever run the output holds (its records and images)
    prompt_column: str = "prompt"
    id_column: str | None = None  # default: `id` when the input has it, else ids derived from prompts
    seed_column: str | None = None  # default: `seed` when the input has it; "" ignores any seed column
    device: str = "auto"
    dtype: str = "auto"
    templates: Templates | str | None = None  # prompt templates, or their JSON file (`prompts.load_templates`)
    progress_interval_s: float = 10.0
    progress_bar: bool = False  # a live bar on a terminal; else a progress line every progress_interval_s
    journal_every_rows: int = 2000  # manifest rows buffered before a journal flush: what a crash can lose
    journal_every_s: float = 10.0  # ... or this many seconds of them, whichever comes first
    # An actor that dies (lost node, OOM, crash) is restarted and its batch retried, within these bounds;
    # past them the run stops with an error rather than looping forever on a batch that kills its actor.
    max_actor_restarts: int = 4  # per actor
    max_task_retries: int = 3  # per batch
    # A write that fails for a passing reason (S3 refusing connections, throttling) is retried with
    # backoff for this long before its image becomes an error row.
    storage_retry_s: float = 300.0
    faults: FaultPlan | dict | str | None = None  # testing only (see distributed/faults.py); default: $TWIG_BATCH_FAULTS

    def __post_init__(self) -> None:
        for name in ("images_per_call", "work_batch_size", "samples_per_prompt", "journal_every_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if not self.storage_retry_s >= 0:
            raise InputError(f"storage retry time must be >= 0 seconds, got {self.storage_retry_s}")
        for name in ("max_actor_restarts", "max_task_retries"):
            if getattr(self, name) < 0:
                raise InputError(f"{name.replace('_', ' ')} must be >= 0, got {getattr(self, name)}")
        from twig_batch.distributed.faults import resolve_plan

        self.faults = resolve_plan(self.faults)
        if self.actors is not None and self.actors < 1:
            raise InputError(f"actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise InputError(f"gpus per actor must be >= 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor <= 0:
            raise InputError(f"cpus per actor must be > 0, got {self.cpus_per_actor}")
        if self.resume and self.overwrite:
            raise InputError("--resume continues the run in the output and --overwrite replaces it: pass one")
        if not self.prompt_column:
            raise InputError("the prompt column name is empty")
        if self.seed_column and self.seed_column in (self.prompt_column, self.id_column or "id"):
            raise InputError(f"the seed column {self.seed_column!r} is also the prompt or id column")
        if isinstance(self.settings, dict):
            self.settings = GenerationSettings.from_dict(self.settings)
        if not isinstance(self.settings, GenerationSettings):
            raise InputError(f"settings must be GenerationSettings or a dict of them, got {type(self.settings).__name__}")
        if isinstance(self.templates, (str, os.PathLike)):
            from twig_batch.prompts import load_templates

            self.templates = load_templates(self.templates)

    def seed_column_name(self) -> str:
        """The column of row seeds to look for ("" for none): the one named, else `seed` if it is free."""
        if self.seed_column is not None:
            return self.seed_column
        return "" if "seed" in (self.prompt_column, self.id_column or "id") else "seed"

    def work_batch(self, gpus_per_actor: float, items: int | None = None, actors: int = 1) -> int:
        """Work items per actor call. Left to the GPU, a call brings enough work for the largest batch
        that fits (the actor draws it in memory-sized parts), at most 256 (in the mixed loop, which streams
        its rows back, 1024), and a run of `items` is cut into equal calls, the same number for each of its
        `actors`; on a CPU a call is one small batch."""
        if self.work_batch_size is not None:
            return self.work_batch_size
        if self.images_per_call is not None:
            return self.images_per_call
        if gpus_per_actor <= 0:
            return CPU_BATCH
        if items is None or items <= 0:
            return GPU_WORK_BATCH
        # Calls of one size, as many for each actor: a short run reaches every GPU, and no actor is
        # left drawing a last call alone while the others wait.
        actors = max(actors, 1)
        most = MIXED_WORK_BATCH if self.settings.runs_mixed(on_gpu=True) else GPU_WORK_BATCH
        calls = actors * -(-items // (actors * most))
        return -(-items // calls)

    def retry_policy(self):
        """How storage calls are retried, on the driver and on every actor."""
        from twig_batch.io.retry import RetryPolicy

        return RetryPolicy(total_s=self.storage_retry_s)
