"""The batch job driver: check everything, then input -> work items -> model actors -> manifest.

The order matters. Every file-level problem (input, columns, destination, credentials, settings, a
resume that does not match) is found before Ray is joined or a model loaded, and reported as one
`TwigBatchError`. The driver then only streams small manifest rows back from the actors (the images
are written by the actors themselves), journals them, and folds the journal into the manifest at
the end. The completion marker is written last.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re

import pyarrow.compute as pc

from twig_batch.distributed.cluster import STALE_RECORDS, address_to_join, connect, free_gpus, logs_dir, plan_actors
from twig_batch.distributed.image_generator import ImageGenerator
from twig_batch.distributed.progress import Progress
from twig_batch.distributed.run_config import RunConfig
from twig_batch.distributed.run_events import RunEvents
from twig_batch.distributed.input_scan import NO_REPEATS, RepeatedPrompts, scan_input
from twig_batch.distributed.model_actors import ModelActors
from twig_batch.distributed.work_feed import work_calls
from twig_batch.distributed.write_retries import RetryWatch, WriteWatcher, new_board
from twig_batch.distributed.worker_checks import (check_model_before_ray, check_model_on_a_worker,
                                                  check_storage_on_a_worker)
from twig_batch import errors as errors_module
from twig_batch.errors import DestinationFullError, InputError, TwigBatchError
from twig_batch.io import layout
from twig_batch.io.dataset import InputFiles, InputSummary, check_input, resolve_input
from twig_batch.io.earlier_run import clear_run, earlier_run
from twig_batch.io.manifest import ManifestJournal, consolidate, manifest_totals
from twig_batch.io.run_info import new_attempt_id, record_complete, run_identity, software_versions, utc_now, write_run_info
from twig_batch.io.storage import LocalStorage, S3Storage, open_storage
from twig_batch.settings import GenerationSettings


@dataclasses.dataclass
class _Preflight:
    """Everything learnt before Ray is joined: if any of it fails, no model was loaded anywhere."""

    files: InputFiles
    source: InputSummary
    id_column: str | None
    storage: LocalStorage | S3Storage
    identity: dict
    previous: dict | None
    skip: frozenset
    seed_column: str | None = None
    text_lengths: object = None  # pipeline.text_lengths.TextLengths: benchmark-only emulation, or None
    replaced: str | None = None  # an earlier run in the destination is cleared first: why
    repeats: RepeatedPrompts = NO_REPEATS  # prompts without ids that repeat: each drawn once

    def total(self, samples: int) -> int:
        """(id, sample) items the input holds: every row, less the repeats of a prompt without an id."""
        return (self.source.rows - self.repeats.copies) * samples


def preflight(config: RunConfig) -> _Preflight:
    settings, templates = config.settings, config.templates
    _check_mode_available(settings.mode)
    files = resolve_input(config.input)
    id_column = config.id_column or "id"
    seed_column = config.seed_column_name()
    source = check_input(files, config.prompt_column, id_column, id_column_required=config.id_column is not None,
                         seed_column=seed_column, seed_column_required=bool(config.seed_column))
    seed_column = seed_column if source.has_seed_column else None
    repeats = scan_input(files, config.prompt_column, id_column if source.has_id_column else None, seed_column)
    check_model_before_ray(config.model, starts_private_cluster=address_to_join() is None)
    _check_model_reference(config.model, settings)  # before the destination is touched
    storage = open_storage(config.output)
    storage.check_writable()
    identity = run_identity(config.model, settings, config.seed, templates, config.prompt_column,
                            id_column if source.has_id_column else None, seed_column)
    earlier = earlier_run(storage, identity, config.resume, config.overwrite)
    return _Preflight(files, source, id_column if source.has_id_column else None, storage,
                      identity, earlier.info, earlier.skip, seed_column=seed_column, text_lengths=_text_lengths(),
                      replaced=earlier.describe(storage.root_uri), repeats=repeats)


def _text_lengths():
    """The benchmark-only text length emulation asked for in this shell (checked here, not on the actors)."""
    from twig_batch.pipeline.text_lengths import emulated_text_lengths

    try:
        return emulated_text_lengths()
    except ValueError as exc:
        raise InputError(str(exc)) from None


def run_batch(config: RunConfig, echo=print) -> dict:
    """Run (or resume) one batch job and return its summary; raises TwigBatchError on file-level problems."""
    checked = preflight(config)
    storage = checked.storage
    storage.retry_policy = config.retry_policy()
    owns_ray = connect(min_local_cpus=math.ceil((config.actors or 1) * config.cpus_per_actor) + 2)
    progress = events = info = journal = retries = None
    try:
        try:
            plan = plan_actors(config.actors, config.gpus_per_actor, config.cpus_per_actor, config.device)
            check_model_on_a_worker(config.model, plan)  # before anything is written or any model loads
            check_storage_on_a_worker(checked.files, storage, plan)
            attempt = new_attempt_id()
            info = _start_attempt(config, checked, plan, attempt)
            total = checked.total(config.samples_per_prompt)
            progress = Progress(total=total, already_done=min(len(checked.skip), total), echo=echo,
                                interval_s=config.progress_interval_s, live=config.progress_bar)
            echo(f"twig-batch run: {checked.source.rows - checked.repeats.copies} prompts x "
                 f"{config.samples_per_prompt} samples from {checked.files.uri} -> {storage.root_uri}; "
                 f"{plan.actors} actor(s), {plan.gpus_per_actor:g} GPU each; {len(checked.skip)} image(s) already done")
            _say_held_gpus(plan, info["attempts"][-1], echo)
            if checked.replaced:
                echo(checked.replaced)
            if checked.repeats.copies:
                echo(checked.repeats.describe())
            if config.faults is not None and config.faults.active:
                echo(f"fault injection is on (testing only): {json.dumps(config.faults.to_dict())}")
            if checked.text_lengths is not None:
                echo(checked.text_lengths.describe())
            events = RunEvents(storage, info, progress.say)
            progress.steady_rate = events.running_images_per_s
            progress.drawing = events.actors_drawing
            board_name = f"twig-batch-retries-{attempt}"
            board = new_board(board_name)
            storage.retry_watcher = WriteWatcher(board, "driver")
            retries = RetryWatch(board, config.storage_retry_s, progress.say)
            progress.status = retries.status
            journal = ManifestJournal(storage, attempt, flush_rows=config.journal_every_rows,
                                      flush_seconds=config.journal_every_s)
            progress.start_heartbeat()
            _stream_results(config, checked, plan, progress, total, events, journal, board_name)
        finally:
            if progress is not None:
                progress.stop_heartbeat()
                progress.status = None
            if retries is not None:
                _record_retries(info, retries.record())
                storage.retry_watcher = None
            if owns_ray:
                _disconnect()
    except BaseException as exc:
        # Every actor has stopped (or is stopping): what finished is journalled, and the run says it failed.
        if info is not None:
            _record_failure(storage, info, journal, exc, echo)
        raise
    journal.flush()
    return _finish(config, checked, info, progress, total, echo, events)


def _say_held_gpus(plan, attempt: dict, echo) -> None:
    """On a cluster other jobs share, fewer actors may start than planned: the run goes on with those
    that do (an actor is handed work once it has started), the others start as GPUs free up. Said,
    not silent."""
    needed = plan.actors * plan.gpus_per_actor
    try:
        free = free_gpus()
    except Exception:  # noqa: BLE001 (a connection that cannot tell: the note is advice, the run goes on)
        return
    if plan.gpus_per_actor <= 0 or free >= needed:
        return
    starting = int(free // plan.gpus_per_actor)
    echo(f"note: {free:g} of the {needed:g} GPU(s) this run's {plan.actors} actor(s) need are free now (other jobs "
         f"hold the rest): {starting} actor(s) start now and the others as GPUs free up; the run goes on with the "
         "actors that start")
    attempt["gpus_free_at_start"] = free


def _record_retries(info: dict | None, retries: dict | None) -> None:
    if info is not None and retries is not None:
        info["attempts"][-1]["storage_retries"] = retries


def _record_failure(storage, info: dict, journal, exc: BaseException, echo) -> None:
    """Journal the rows that arrived and mark run.json failed with the cause. On a full disk the space
    kept in reserve is given up first, so that these records fit."""
    attempt = info["attempts"][-1]
    if isinstance(exc, DestinationFullError) and storage.release_reserve():
        echo(f"the disk of {storage.root_uri} is full: the space kept in reserve is given up to record what "
             "was drawn")
        attempt["reserve_released"] = True
    cause = str(exc) or type(exc).__name__
    if journal is not None:
        try:
            journal.flush()  # whatever finished stays recorded; --resume redoes only the rest
        except Exception as flush_error:  # noqa: BLE001 (the run's own error is the one to raise)
            attempt["journal_lost_rows"] = journal.pending_rows
            cause += f"; and {journal.pending_rows} finished row(s) could not be recorded ({flush_error})"
    attempt.update(finished_at=utc_now(), failed=cause)
    info["status"] = "failed"
    try:
        write_run_info(storage, info)
    except Exception:  # noqa: BLE001 (the run's own error is the one to raise)
        pass
    finally:
        storage.release_reserve()


def _start_attempt(config: RunConfig, checked: _Preflight, plan, attempt: str) -> dict:
    if checked.replaced:  # only now: every check has passed, and the run is about to start
        clear_run(checked.storage)
    checked.storage.delete(layout.COMPLETE_MARKER)  # a resumed run is unfinished until it says otherwise
    info = checked.previous or {**checked.identity, "created_at": utc_now(), "output": checked.storage.root_uri,
                                "attempts": []}
    info.update(status="running", input=checked.source.fingerprint, samples_per_prompt=config.samples_per_prompt,
                versions=software_versions())
    info["attempts"].append({"attempt": attempt, "started_at": utc_now(), "resumed": checked.previous is not None,
                             "actors": plan.actors, "gpus_per_actor": plan.gpus_per_actor,
                             "images_per_call": config.images_per_call, "device": config.device,
                             "dtype": config.dtype})
    if checked.replaced:
        info["attempts"][-1]["replaced"] = checked.replaced.split(": ", 1)[1]
    if STALE_RECORDS:  # the shared cluster `ray start` recorded had died: this run made its own
        info["attempts"][-1]["dead_ray_start_cluster"] = STALE_RECORDS[-1]
    if checked.repeats.copies:  # rows that are not drawn on their own
        info["attempts"][-1]["repeated_prompts"] = {"rows": checked.repeats.copies, "prompts": len(checked.repeats.ids)}
    if config.faults is not None:  # a run that was made to fail says so in its record
        info["attempts"][-1]["faults"] = config.faults.to_dict()
    if checked.text_lengths is not None:  # so does a run whose texts were cut to emulated lengths
        info["attempts"][-1]["emulated_text_lengths"] = checked.text_lengths.record()
    write_run_info(checked.storage, info)
    return info


def _stream_results(config: RunConfig, checked: _Preflight, plan, progress: Progress, total: int,
                    events: RunEvents, journal: ManifestJournal, retry_board: str):
    """Pull manifest rows as the actors finish each part; only small rows reach the driver, never
    images. The actors' events (startups, part splits and failures) come with them."""
    per_call = config.work_batch(plan.gpus_per_actor, max(total - len(checked.skip), 0), plan.actors)
    events.attempt["work_items_per_call"] = per_call
    calls = work_calls(checked.files, prompt_column=config.prompt_column, id_column=checked.id_column,
                       seed_column=checked.seed_column, samples=config.samples_per_prompt, base_seed=config.seed,
                       skip=checked.skip, per_call=per_call, repeats=checked.repeats)
    first = next(calls, None)
    if first is None:  # a resume whose earlier rows cover the whole input: no model is loaded
        return
    actors = model_actors(config, plan, checked.storage.root_uri, checked.text_lengths, retry_board)
    if not checked.storage.hold_reserve():  # for the records of a run that fills its disk (`_record_failure`)
        events.echo(f"the disk of {checked.storage.root_uri} has no room left for the space kept for the run's "
                    "records: if it fills, the last rows may go unrecorded (a --resume redraws them)")
        events.attempt["reserve_held"] = False
    try:
        for rows, actor_events in actors.draw(itertools.chain([first], calls)):
            events.add(actor_events)
            if rows is None:
                continue
            journal.add(rows)
            errors = int(pc.sum(pc.equal(rows.column("status"), "error")).as_py() or 0)
            progress.update(rows.num_rows - errors, errors)
    except BaseException as exc:
        raise _with_restart_limits(_user_facing(exc), config) from None
    finally:
        actors.close()


def model_actors(config: RunConfig, plan, output_uri: str, text_lengths, retry_board: str) -> ModelActors:
    """One actor per planned GPU, each holding a model and writing its images to `output_uri`."""
    from twig_batch.pipeline.text_lengths import ENV_VAR

    options = {"num_gpus": plan.gpus_per_actor, "num_cpus": plan.cpus_per_actor,
               "max_restarts": config.max_actor_restarts}
    if text_lengths is not None:  # the emulation is read where texts are written: the actors get the driver's
        options["runtime_env"] = {"env_vars": {ENV_VAR: os.environ[ENV_VAR]}}
    kwargs = {"model": config.model, "output": output_uri, "settings": config.settings, "device": config.device,
              "dtype": config.dtype, "base_seed": None,  # items carry their seeds
              "templates": config.templates, "images_per_call": config.images_per_call,
              "faults": config.faults.to_dict() if config.faults is not None else None,
              "report_events": True, "storage_retry_s": config.storage_retry_s, "retry_board": retry_board}
    return ModelActors(ImageGenerator, plan.actors, kwargs, options, call_retries=config.max_task_retries)


def _finish(config: RunConfig, checked: _Preflight, info: dict, progress: Progress, total: int,
            echo, events: RunEvents) -> dict:
    storage = checked.storage
    storage.release_reserve()  # the manifest may need it more
    if isinstance(storage, LocalStorage):  # every writer has stopped: a killed one's staging files go
        storage.remove_staging_leftovers()
    totals = manifest_totals(consolidate(storage))
    summary = {**progress.summary(), **{k: totals[k] for k in ("manifest_rows", "manifest_ok", "manifest_errors")},
               "images": storage.uri(layout.IMAGES_DIR), "manifest": storage.uri(layout.MANIFEST)}
    summary["skipped_already_ok"] = max(0, total - progress.ok - progress.errors) if config.resume else 0
    steady = events.steady_images_per_s()
    summary["steady_images_per_s"] = round(steady, 4) if steady is not None else None
    summary["actor_stats"] = events.attempt["actor_stats"]
    summary["error_causes"] = totals["error_causes"]
    info["attempts"][-1].update(finished_at=utc_now(), ok=progress.ok, errors=progress.errors,
                                skipped=summary["skipped_already_ok"])
    record_complete(storage, info, summary)  # last: the run is done and final
    echo(f"done: {progress.ok} image(s) drawn, {progress.errors} error(s), {summary['skipped_already_ok']} skipped "
         f"(already ok) in {summary['elapsed_s']:.1f}s ({summary['images_per_s']:.2f} images/s"
         + (f"; {steady:.2f} once the actors were running)" if steady is not None else ")"))
    return summary


def _check_mode_available(mode: str) -> None:
    if mode == "plain":
        return
    from importlib.util import find_spec

    if find_spec("twig_batch.pipeline.staged") is None:  # looked up, not imported: the driver never loads torch
        raise InputError(f"mode {mode!r} is not available in this installation of twig-batch")


def _check_model_reference(ref: str, settings: GenerationSettings) -> None:
    """Catch a checkpoint with missing files, bands that do not divide its image grid, or controller
    weights that do not fit it here, from its config alone, rather than once per actor."""
    from twig_batch.model.checkpoint import model_geometry
    from twig_batch.pipeline.bands import BandSchedule

    geometry = model_geometry(ref)
    if geometry is None:  # a Hugging Face id (or random-*): the actors check it once they have it
        return
    grid, hidden_size = geometry
    BandSchedule(grid, settings.bands)  # bands that do not divide its rows fail here
    if settings.controller is not None and settings.controller.weights is not None:  # torch, for the file's shapes
        from twig_batch.controller.weights import check_weights_file

        check_weights_file(settings.controller.weights, hidden_size, settings.controller)


_OUR_ERROR_LINE = re.compile(r"^twig_batch\.errors\.(ModelLoadError|InputError|OutputError|DestinationFullError|"
                             r"TwigBatchError): (.+)$", re.MULTILINE)


class RunFailedError(TwigBatchError):
    """The Ray part of a run failed as a whole (actors could not start, the cluster went away)."""


def _user_facing(exc: BaseException) -> BaseException:
    """Ray wraps a worker's exception in its own types; surface ours, or one line about Ray's."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return exc
    seen = set()
    current = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TwigBatchError) and type(current).__module__.startswith("twig_batch"):
            return type(current)(f"{current} (rows finished before this are recorded; fix it and rerun "
                                 "with --resume)")
        for candidate in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(candidate, BaseException):
                current = candidate
                break
        else:
            current = None
    # An actor whose __init__ raised reaches us only as text (Ray keeps the traceback, not the object).
    ours = _OUR_ERROR_LINE.findall(str(current or exc) + "\n" + str(exc))
    if ours:
        kind, message = ours[-1]
        return _with_log(getattr(errors_module, kind)(f"on a Ray worker: {message}"))
    first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "no detail")
    return _with_log(RunFailedError(f"the Ray job failed: {type(exc).__name__}: {first_line} (rows finished before "
                                    "this are recorded; rerun with --resume to continue)"))


def _with_log(error: TwigBatchError) -> TwigBatchError:
    """A worker's failure is one line; its traceback stays in the Ray session's logs, named here."""
    error.log = logs_dir()
    return error


def _with_restart_limits(error: BaseException, config: RunConfig) -> BaseException:
    """An actor that died past its restarts, or a call sent again too often: say which limits ran out."""
    if not isinstance(error, RunFailedError) or "ActorDiedError" not in str(error):
        return error
    limited = RunFailedError(f"{error}; model actors kept dying: each is restarted at most "
                             f"{config.max_actor_restarts} time(s), and the items of a call whose actor died are "
                             f"sent again at most {config.max_task_retries} time(s) (--max-actor-restarts, "
                             "--max-task-retries)")
    limited.log = getattr(error, "log", None)
    return limited


def _disconnect() -> None:
    from twig_batch.distributed.cluster import disconnect

    disconnect()
