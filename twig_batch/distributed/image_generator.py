"""`ImageGenerator`: the callable class Ray Data's `map_batches` runs on each GPU actor.

The Ray Data idiom: `__init__` loads the model once per actor, `__call__(batch)` turns a batch of
work items (id, prompt, sample_index, seed) into a batch of manifest rows. With `output` set, the
images are written there and the rows carry their URIs; without it, the PNG bytes travel in the
returned batch, for pipelines that want to handle images themselves.

A row that cannot be drawn (null, empty, too long or control characters in its prompt, a bad row
seed, a generation error) comes back with status `error` and the reason; the rest of its batch
still goes through.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from twig_batch.io.manifest import SCHEMA, error_row
from twig_batch.pipeline import ImageRequest
from twig_batch.settings import GenerationSettings
from twig_batch.seeds import derive_seed

WRITER_THREADS = 8  # images encoded and written at once per actor
ENCODED_COLUMNS = [("image_png", pa.binary()), ("stage_pngs", pa.list_(pa.binary())),
                   ("trigger_log_json", pa.string())]


class ImageGenerator:
    def __init__(self, model: str = "tiny", output: str | None = None, settings: dict | GenerationSettings | None = None,
                 device: str = "auto", dtype: str = "auto", model_name: str | None = None, base_seed: int = 0,
                 templates=None, faults: dict | None = None, images_per_call: int | None = None):
        from twig_batch.devices import resolve_device, resolve_dtype
        from twig_batch.io.storage import open_storage
        from twig_batch.model import load_janus

        if isinstance(settings, GenerationSettings):
            self.settings = settings
        else:
            self.settings = GenerationSettings(**(settings or {}))
        torch_device = resolve_device(device)
        self.bundle = load_janus(model, torch_device, resolve_dtype(dtype, torch_device))
        self.settings.check_geometry(self.bundle.grid)
        self.model_name = model_name or model
        self.storage = open_storage(output) if output else None
        self.base_seed = base_seed
        self.templates = templates  # a `prompts.Templates`, or None for the defaults
        self.images_per_call = images_per_call  # None: as many as fit in the GPU's free memory
        self._writers = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="twig-writer")
        self.faults = None  # testing only: see twig_batch.faults
        if faults:
            from twig_batch.faults import ActorFaults, FaultPlan

            self.faults = ActorFaults(FaultPlan.from_dict(faults), self.storage)

    def __call__(self, batch) -> pa.Table:
        items = _as_rows(batch)
        if self.faults is not None:
            self.faults.before_batch(len(items))
        rows: list[dict | None] = [None] * len(items)
        requests: list[tuple[int, ImageRequest]] = []
        for position, item in enumerate(items):
            request, problem = self._request(item)
            if problem:
                rows[position] = error_row(request.prompt_id, item.get("prompt"), request.sample_index,
                                           request.seed, self.settings.mode, self.model_name, problem)
            else:
                requests.append((position, request))
        for position, row in self._generate(requests):
            rows[position] = row
        return self._table(rows)

    def _request(self, item: dict) -> tuple[ImageRequest, str | None]:
        from twig_batch.distributed.work_items import content_id
        from twig_batch.io.prompt_checks import text_problem

        prompt = item.get("prompt")
        prompt_id = item.get("id")
        prompt_id = str(prompt_id) if prompt_id is not None else content_id(prompt if isinstance(prompt, str) else None)
        sample = int(item.get("sample_index") or 0)
        problem = item.get("problem")  # found while the input was read (a bad row seed)
        seed = item.get("seed")
        if seed is not None:
            seed = int(seed)
        elif not problem:
            seed = derive_seed(self.base_seed, prompt_id, sample)
        request = ImageRequest(prompt_id, prompt if isinstance(prompt, str) else "", sample, seed)
        return request, problem or text_problem(prompt) or self._prompt_budget().problem(prompt)

    def _prompt_budget(self):
        """Built on first use: it needs the loaded model's tokenizer and context length."""
        from twig_batch.io.prompt_checks import PromptBudget

        if getattr(self, "_budget", None) is None:
            self._budget = PromptBudget(self.bundle, self.settings, self.templates)
        return self._budget

    def _generate(self, requests: list[tuple[int, ImageRequest]]):
        """Draw the batch in parts that fit the device; if a part fails, draw it row by row so one bad
        row fails alone. Images never depend on how a batch is split (per-row seeds and positions).

        A part's images are encoded and written on a few threads (PNG encoding and uploads release
        the GIL) while the GPU draws the next part; the rows come back once all are written."""
        from twig_batch.pipeline import generate_images

        size = self._part_size(requests)
        writes = []  # (position, future row), in request order
        for first in range(0, len(requests), size):
            part = requests[first:first + size]
            start = time.perf_counter()
            try:
                results = generate_images(self.bundle, [r for _, r in part], self.settings, templates=self.templates)
            except Exception:  # noqa: BLE001 (the row-by-row pass reports each row's own error)
                writes += [(position, _done(row)) for position, row in self._one_by_one(part)]
                continue
            share = (time.perf_counter() - start) / len(part)
            writes += [(position, self._writers.submit(self._store, request, result, share))
                       for (position, request), result in zip(part, results)]
        for position, write in writes:
            row = write.result()
            if self.faults is not None:
                self.faults.row_stored()  # an injected kill lands here: objects written, rows not yet returned
            yield position, row

    def _part_size(self, requests: list[tuple[int, ImageRequest]]) -> int:
        from twig_batch.engine.memory import free_device_bytes

        free = None
        if self.images_per_call is None and self.bundle.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # cached blocks of the last part's cache would fragment this one's
            free = free_device_bytes(self.bundle.device)
        size = part_size(self.bundle, self.settings, [r.prompt for _, r in requests], self.images_per_call, free)
        if self.bundle.device.type == "cuda":
            from twig_batch.engine.memory import reserve_kv_arena

            reserve_kv_arena(self.bundle, self.settings, size)  # once: later parts reuse it, graphs and all
        return size

    def _one_by_one(self, requests):
        from twig_batch.pipeline import generate_images

        for position, request in requests:
            start = time.perf_counter()
            try:
                (result,) = generate_images(self.bundle, [request], self.settings, templates=self.templates)
            except Exception as exc:
                yield position, self._error(request, f"generation failed: {type(exc).__name__}: {exc}")
                continue
            yield position, self._store(request, result, time.perf_counter() - start)

    def _store(self, request: ImageRequest, result, generation_s: float) -> dict:
        from twig_batch.io.artifacts import encode_result, write_result

        try:
            if self.storage is None:
                row = encode_result(result, self.model_name, generation_s)
            else:
                row = write_result(self.storage, result, self.model_name, generation_s,
                                   controller_ran=self.settings.controller is not None)
        except Exception as exc:
            return self._error(request, f"writing the outputs failed: {type(exc).__name__}: {exc}")
        return row

    def _error(self, request: ImageRequest, reason: str) -> dict:
        return error_row(request.prompt_id, request.prompt, request.sample_index, request.seed, self.settings.mode,
                         self.model_name, reason)

    def _table(self, rows: list[dict]) -> pa.Table:
        if self.storage is not None:
            return pa.Table.from_pylist(rows, schema=SCHEMA)
        schema = pa.schema(list(SCHEMA) + ENCODED_COLUMNS)
        return pa.Table.from_pylist(rows, schema=schema)


def _done(row: dict) -> Future:
    done = Future()
    done.set_result(row)
    return done


def part_size(bundle, settings: GenerationSettings, prompts: list[str], fixed: int | None,
              free_bytes: int | None) -> int:
    """Images per model call: `fixed` when given; else what fits `free_bytes` of device memory for
    these prompts; with no figure (off a GPU), all of them at once."""
    from twig_batch.engine.memory import PROMPT_TOKENS, images_per_call

    if fixed is not None:
        return fixed
    if free_bytes is None or not prompts:
        return max(1, len(prompts))
    longest = max(len(bundle.encode(prompt)) for prompt in prompts)
    return images_per_call(bundle, settings, free_bytes, prompt_tokens=max(PROMPT_TOKENS, longest + 64))


def _as_rows(batch) -> list[dict]:
    """Accept any batch format Ray Data hands out (Arrow, pandas, dict of numpy arrays)."""
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return pa.Table.from_pandas(batch, preserve_index=False).to_pylist()
    columns = {name: list(values.tolist() if hasattr(values, "tolist") else values) for name, values in batch.items()}
    count = len(next(iter(columns.values()), []))
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]
