"""`ImageGenerator`: the class each GPU actor holds, in the batch job (`model_actors.py`) or as the
callable class of a Ray Data `map_batches` in a pipeline of the user's own.

`__init__` loads the model once per actor, `__call__(batch)` turns a batch of work items (id,
prompt, sample_index, seed) into manifest rows. It is a generator: the batch is
drawn in parts that fit the device, and each part's rows are handed back as soon as they are
written, so the driver sees progress part by part. In the mixed loop (`GenerationSettings.runs_mixed`)
the batch is one part, and rows come back as its images finish, a few at a time. With `output` set,
the images are written there and the rows carry their URIs; without it, the PNG bytes travel in the
returned batches, for pipelines that want to handle images themselves.

The batch job hands every actor its one `GenerationSettings` and work items that carry their final
ids and seeds: nothing is derived again here. A pipeline of the user's own may pass a dict of
settings and rows without ids or seeds; they are completed once, at the door, by the batch job's
own rules (`work_items.as_work_item`).

A row that cannot be drawn (null, empty, too long or control characters in its prompt, a bad row
seed, a generation error) comes back with status `error` and the reason; the rest of its batch
still goes through. How failing parts are split and isolated is `parts.py`'s; with
`report_events=True` (the batch driver) every batch also carries the actor's startup and part
events, and the kernels it runs uncompiled, for the driver to show and record (`actor_report.py`).

The actor owns one `Engine` (`engine/runner.py`), built in `__init__` (kernels compiled there). Its
sizing step (`Engine.reserve`: the KV arena, and the CUDA graphs of the image decode step) runs on
a GPU as soon as the call size is known: in `__init__` when `images_per_call` is given, else at the
first part of the first batch (the size then comes from the free memory and the batch's prompts).
Each batch's first part sizes again for its own part size (equal parts may be smaller than the
most that fit): only what is missing is captured, before that part is drawn. In the mixed loop the
sizing step is the loop's page pool, built once over the free memory (`Engine.mixed_loop`).
"""
from __future__ import annotations

import gc
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow as pa

from twig_batch.distributed.actor_report import attach_events, describe_event
from twig_batch.distributed.parts import Drawn, PartDrawer, breaks_the_device, describe
from twig_batch.io.manifest import SCHEMA, error_row
from twig_batch.settings import GenerationSettings

if TYPE_CHECKING:  # the actor imports the pipeline (and torch) when it starts, the driver never does
    from twig_batch.pipeline import ImageRequest

WRITER_THREADS = 8  # images encoded and written at once per actor
ENCODED_COLUMNS = [("image_png", pa.binary()), ("stage_pngs", pa.list_(pa.binary())),
                   ("trigger_log_json", pa.string())]
DEVICE_BROKEN_EXIT_CODE = 87  # the actor ends itself after a CUDA error: Ray restarts it
# In the mixed loop a call is one part (the loop takes memory as its images need it, and every part
# would end on its slowest image alone): its rows come back as images finish, once STREAM_ROWS are
# written or STREAM_EVERY_S after the first of them, whichever comes first.
STREAM_ROWS, STREAM_EVERY_S = 32, 10.0


class ImageGenerator:
    def __init__(self, model: str = "tiny", output: str | None = None, settings: GenerationSettings | dict | None = None,
                 device: str = "auto", dtype: str = "auto", model_name: str | None = None, base_seed: int | None = 0,
                 templates=None, faults: dict | None = None, images_per_call: int | None = None,
                 report_events: bool = False, storage_retry_s: float | None = None, retry_board: str | None = None):
        started = time.perf_counter()
        from twig_batch.devices import resolve_device, resolve_dtype
        from twig_batch.io.storage import open_storage
        from twig_batch.model import load_janus
        from twig_batch.pipeline.bands import BandSchedule

        if isinstance(settings, GenerationSettings):
            self.settings = settings
        else:
            self.settings = GenerationSettings.from_dict(settings or {})
        torch_device = resolve_device(device)
        loading = time.perf_counter()
        self.bundle = load_janus(model, torch_device, resolve_dtype(dtype, torch_device))
        model_s = time.perf_counter() - loading
        from twig_batch.engine.runner import Engine

        warming = time.perf_counter()
        self.engine = Engine.for_settings(self.bundle, self.settings)  # kernels compile now, not in the first part
        warm_up_s = time.perf_counter() - warming
        BandSchedule(self.bundle.grid, self.settings.bands)  # bands that do not fit fail the actor, not every row
        self.model_name = model_name or model
        self.storage = open_storage(output) if output else None
        self.base_seed = base_seed  # for rows without a seed; None: every row must carry one (the batch job's do)
        self.templates = templates  # a `prompts.Templates`, or None for the defaults
        self.images_per_call = images_per_call  # None: as many as fit in the GPU's free memory
        if images_per_call is not None:  # the call size is known: size the engine now, not in the first part
            self._reserve(images_per_call)
        self.report_events = report_events
        self._writers = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="twig-writer")
        # The model runs on a thread of its own, so that a part's images are written and handed back
        # while the next part is drawn.
        self._drawing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twig-draw")
        self._parts = PartDrawer(self._draw, free_memory=self._free_memory)
        self._finished: queue.Queue | None = None  # the mixed loop's finished images, on their way to the writers
        self._delivered: set[int] = set()  # of the batch streamed now, the requests handed to the writers
        self.name = _actor_name()
        if self.storage is not None:  # the batch driver's retry time, and its board to say that writes wait
            from twig_batch.io.retry import RetryPolicy

            if storage_retry_s is not None:
                self.storage.retry_policy = RetryPolicy(total_s=storage_retry_s)
            if retry_board is not None:  # the name of the batch driver's board
                from twig_batch.distributed.write_retries import WriteWatcher, board_by_name

                self.storage.retry_watcher = WriteWatcher(board_by_name(retry_board), self.name)
        self._events_lock = threading.Lock()  # events come from the drawing thread, leave with the rows
        self._events: list[dict] = [{"kind": "startup", "actor": self.name, "device": str(self.bundle.device),
                                     "startup_s": round(time.perf_counter() - started, 2),
                                     "model_load_s": round(model_s, 2), "warm_up_s": round(warm_up_s, 2)}]
        self.faults = None  # testing only: see twig_batch.distributed.faults
        if faults:
            from twig_batch.distributed.faults import ActorFaults, FaultPlan

            self.faults = ActorFaults(FaultPlan.from_dict(faults), self.storage)
            self.faults.on_engine(self.engine)
        self._uncompiled_said = 0
        self._say_uncompiled()

    def __call__(self, batch):
        """Manifest rows for the work items of `batch`, one table per part as it is finished."""
        items = _as_rows(batch)
        if self.faults is not None:
            self.faults.before_batch(len(items))
        refused: list[dict] = []
        requests: list[ImageRequest] = []
        for item in items:
            request, problem = self._request(item)
            if problem:
                refused.append(error_row(request.prompt_id, item.get("prompt"), request.sample_index, request.seed,
                                         self.settings.mode, self.model_name, problem))
            else:
                requests.append(request)
        if refused or not requests:
            yield self._table(refused)
        for rows in self._generate(requests):
            yield self._table(rows)

    def rows_by_part(self, batch):
        """`self(batch)` as an actor method: the batch job's actors are called this way, part by part
        (a Ray streaming generator call)."""
        yield from self(batch)

    def draw_all(self, batch) -> pa.Table:
        """Every row of `batch` in one table (for callers outside Ray Data)."""
        return pa.concat_tables(list(self(batch)))

    def _request(self, item: dict) -> tuple[ImageRequest, str | None]:
        from twig_batch.distributed.work_items import as_work_item
        from twig_batch.io.prompt_checks import text_problem
        from twig_batch.pipeline import ImageRequest

        item = as_work_item(item, self.base_seed)
        prompt = item.get("prompt")
        request = ImageRequest(item["id"], prompt if isinstance(prompt, str) else "", item["sample_index"], item["seed"])
        problem = item.get("problem")  # found while the input was read (a bad row seed)
        return request, problem or text_problem(prompt) or self._prompt_budget().problem(prompt)

    def _prompt_budget(self):
        """Built on first use: it needs the loaded model's tokenizer and context length."""
        from twig_batch.pipeline.sequences import PromptBudget

        if getattr(self, "_budget", None) is None:
            self._budget = PromptBudget(self.bundle, self.settings, self.templates)
        return self._budget

    def _generate(self, requests: list[ImageRequest]):
        """Rows part by part. While the model draws a part, the previous part's images are encoded
        and written on a few threads (PNG encoding and uploads release the GIL). Images never depend
        on how a batch is split (per-row seeds and positions)."""
        if not requests:
            return
        if self._runs_mixed():
            yield from self._generate_streamed(requests)
            return
        waiting = list(requests)
        drawing = self._drawing.submit(self._next_part, waiting, first=True)
        while drawing is not None:
            drawn = self._drawn(drawing)
            drawing = self._drawing.submit(self._next_part, waiting) if waiting else None
            writes = [self._writers.submit(self._store, d.request, d.result, d.seconds) if d.error is None
                      else _done(self._error(d.request, d.error)) for d in drawn]
            yield self._written(writes)

    def _generate_streamed(self, requests: list[ImageRequest]):
        """Rows as the mixed loop finishes images: the batch is one part, each image written as soon as
        it is done, its row handed back with the others written by then (`STREAM_ROWS`,
        `STREAM_EVERY_S`), each group with a "part" event of its own (the driver's rates and ETA); the
        rows that failed come last. A part split after a failure draws only the images not handed back.
        For the batch driver, an empty table first brings the actor's start and part size."""
        self._finished, self._delivered = queue.Queue(), set()
        drawing = self._drawing.submit(self._every_part, list(requests))
        writes, since = [], time.perf_counter()
        announced = not self.report_events  # a pipeline of the user's own gets no events
        while True:
            if not announced and self._part_size_said():
                # The first rows are a whole chain of stages away: the driver hears of the start now.
                announced = True
                yield []
            try:
                request, result, seconds = self._finished.get(timeout=0.2)
                if not writes:  # a group waits STREAM_EVERY_S from its first image: the first image
                    first = time.perf_counter()  # alone would give the driver's ETA a rate of one image
                writes.append(self._writers.submit(self._store, request, result, seconds))
            except queue.Empty:
                pass
            over = drawing.done() and self._finished.empty()  # every image is put before the part ends
            now = time.perf_counter()
            if writes and (over or len(writes) >= STREAM_ROWS or now - first >= STREAM_EVERY_S):
                self._event({"kind": "part", "actor": self.name, "images": len(writes),
                             "draw_s": round(now - since, 3)})
                yield self._written(writes)
                writes, since = [], now
            if over:
                break
        rows = [self._error(d.request, d.error) for d in self._drawn(drawing) if d.error is not None]
        if rows:
            yield rows

    def _every_part(self, waiting: list[ImageRequest]) -> list[Drawn]:
        """Every request of `waiting` drawn: in one part, or in parts as an earlier out-of-memory error caps them."""
        drawn = self._next_part(waiting, first=True)
        while waiting:
            drawn += self._next_part(waiting)
        return drawn

    def _part_size_said(self) -> bool:
        with self._events_lock:
            return any(event["kind"] == "part_size" for event in self._events)

    def _drawn(self, drawing: Future) -> list[Drawn]:
        """What the drawing thread drew; after an error that leaves the device unusable, the process ends."""
        try:
            return drawing.result()
        except Exception as exc:
            if breaks_the_device(exc):
                self._end_process(exc)
            raise

    def _written(self, writes: list[Future]) -> list[dict]:
        rows = []
        for write in writes:
            rows.append(write.result())
            if self.faults is not None:
                self.faults.row_stored()  # an injected kill lands here: objects written, rows not yet returned
        return rows

    def _next_part(self, waiting: list[ImageRequest], first: bool = False) -> list[Drawn]:
        """Draws the next part of `waiting` (and takes it off); the first part of a batch sizes them."""
        if first:
            most = self._part_size(waiting)
            self._size = even_parts(len(waiting), most)
            self._reserve(most, self._size)  # the graphs of this batch's calls, before its first part
            if getattr(self, "_reported", None) != (self._size, most):
                self._reported = (self._size, most)
                mixed = self._runs_mixed()
                self._event({"kind": "part_size", "actor": self.name, "images": self._size, "most": most,
                             "loop": "mixed" if mixed else "lockstep", "from_free_memory":
                             self.images_per_call is None and self.bundle.device.type == "cuda" and not mixed})
        size = min(self._size, self._parts.cap or self._size)
        part = waiting[:size]
        del waiting[:size]
        known = len(self._parts.events)
        start = time.perf_counter()
        drawn = self._parts.run(part)
        for event in self._parts.events[known:]:
            self._event({**event.record(), "actor": self.name})
        self._say_uncompiled()
        if self._finished is None:  # streamed rows come with part events of their own
            self._event({"kind": "part", "actor": self.name, "images": len(part),
                         "draw_s": round(time.perf_counter() - start, 3)})
        return drawn

    def _draw(self, requests: list[ImageRequest]):
        from twig_batch.pipeline import generate_images

        if self.faults is not None:
            self.faults.before_part(requests)
        if self._finished is None:
            return generate_images(self.bundle, requests, self.settings, templates=self.templates, engine=self.engine)
        # Streamed: each image goes to the writers as it is done; those handed back already are not drawn again.
        todo = [request for request in requests if id(request) not in self._delivered]
        start = time.perf_counter()

        def finished(index: int, result) -> None:
            self._delivered.add(id(todo[index]))
            seconds = (time.perf_counter() - start) / (len(self._delivered) or 1)  # the call's time so far, shared
            self._finished.put((todo[index], result, seconds))

        generate_images(self.bundle, todo, self.settings, templates=self.templates, engine=self.engine,
                        on_result=finished)
        return [None] * len(requests)  # every result went to the writers

    def _free_memory(self) -> None:
        """After an out-of-memory error: every cache and captured graph goes, so the smaller parts
        start from an empty device."""
        gc.collect()
        if self.bundle.device.type == "cuda":
            import torch

            self.engine.release()
            torch.cuda.empty_cache()

    def _part_size(self, requests: list[ImageRequest]) -> int:
        free = None
        if self.images_per_call is None and self.bundle.device.type == "cuda" and not self._runs_mixed():
            import torch

            torch.cuda.empty_cache()  # cached blocks of the last part's cache would fragment this one's
            free = self.engine.free_bytes()
        size = part_size(self.bundle, self.settings, [r.prompt for r in requests], self.images_per_call, free)
        return min(size, self._parts.cap or size)

    def _reserve(self, most: int, call_images: int | None = None) -> None:
        """The engine's sizing step (on a GPU): its arena for parts of up to `most` images, once, so
        later parts reuse it and the graphs over it; the image step's graphs for parts of
        `call_images` (None: `most`). In the mixed loop: the loop's page pool, whatever the parts."""
        from twig_batch.pipeline.sequences import call_shape

        if self._runs_mixed():
            self.engine.mixed_loop()
        elif self.bundle.device.type == "cuda":
            self.engine.reserve(call_shape(self.bundle, self.settings), most, call_images)

    def _runs_mixed(self) -> bool:
        return self.settings.runs_mixed(self.bundle.device.type == "cuda")

    def _event(self, event: dict) -> None:
        """Kept for the driver (`report_events`), else said in the actor's own log."""
        if self.report_events:
            with self._events_lock:
                self._events.append(event)
        elif event["kind"] not in ("startup", "part_size", "part"):
            print(f"twig-batch actor: {describe_event(event)}", file=sys.stderr, flush=True)

    def _say_uncompiled(self) -> None:
        """The engine's kernels that run as written because they could not be compiled (slower, same
        images): said when the list grows (compiles happen at the start, or at a shape's first use)."""
        uncompiled = list(self.engine.model.kernels.uncompiled)
        if len(uncompiled) > self._uncompiled_said:
            self._uncompiled_said = len(uncompiled)
            self._event({"kind": "uncompiled_kernels", "actor": self.name, "kernels": uncompiled})

    def _end_process(self, exc: BaseException) -> None:
        print(f"twig-batch actor: the device is unusable after {describe(exc)}; ending this actor so that Ray "
              "restarts it and retries its batch", file=sys.stderr, flush=True)
        os._exit(DEVICE_BROKEN_EXIT_CODE)

    def _store(self, request: ImageRequest, result, generation_s: float) -> dict:
        from twig_batch.errors import DestinationFullError
        from twig_batch.io.artifacts import encode_result, write_result

        try:
            if self.storage is None:
                row = encode_result(result, self.model_name, generation_s)
            else:
                row = write_result(self.storage, result, self.model_name, generation_s,
                                   controller_ran=self.settings.controller is not None)
        except DestinationFullError:
            raise  # no image fits any more: the run stops and says so, rather than failing every row left
        except Exception as exc:
            return self._error(request, f"writing the outputs failed: {type(exc).__name__}: {exc}")
        return row

    def _error(self, request: ImageRequest, reason: str) -> dict:
        return error_row(request.prompt_id, request.prompt, request.sample_index, request.seed, self.settings.mode,
                         self.model_name, reason)

    def _table(self, rows: list[dict]) -> pa.Table:
        schema = SCHEMA if self.storage is not None else pa.schema(list(SCHEMA) + ENCODED_COLUMNS)
        table = pa.Table.from_pylist(rows, schema=schema)
        if not self.report_events:
            return table
        with self._events_lock:
            events, self._events = self._events, []
        return attach_events(table, events)


def _actor_name() -> str:
    """The Ray actor's id (short) with its host and process, or the process alone outside Ray."""
    import socket

    name = f"{socket.gethostname()}:{os.getpid()}"
    try:
        import ray

        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 (a name is only a label)
        actor = None
    return f"{actor[:8]}@{name}" if actor else name


def _done(row: dict) -> Future:
    done = Future()
    done.set_result(row)
    return done


def part_size(bundle, settings: GenerationSettings, prompts: list[str], fixed: int | None,
              free_bytes: int | None) -> int:
    """Images per model call: `fixed` when given; in the mixed loop, all of them; else what fits
    `free_bytes` of device memory for these prompts; with no figure (off a GPU), all of them at once."""
    from twig_batch.pipeline.sequences import PROMPT_TOKENS, images_per_call

    if fixed is not None:
        return fixed
    if settings.runs_mixed(bundle.device.type == "cuda"):  # its pages fill the free memory, whatever the part
        return max(1, len(prompts))
    if free_bytes is None or not prompts:
        return max(1, len(prompts))
    longest = max(len(bundle.encode(prompt)) for prompt in prompts)
    return images_per_call(bundle, settings, free_bytes, prompt_tokens=max(PROMPT_TOKENS, longest + 64))


def even_parts(count: int, most: int) -> int:
    """The part size that draws `count` images in as few parts as `most` allows, all about equal: a
    batch of 256 with room for 165 goes as 128 + 128, not 165 + 91 (a small part wastes the GPU)."""
    parts = -(-count // most)
    return -(-count // parts)


def _as_rows(batch) -> list[dict]:
    """Accept any batch format Ray Data hands out (Arrow, pandas, dict of numpy arrays)."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return pa.Table.from_pandas(batch, preserve_index=False).to_pylist()
    columns = {name: list(values.tolist() if hasattr(values, "tolist") else values) for name, values in batch.items()}
    count = len(next(iter(columns.values()), []))
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]
