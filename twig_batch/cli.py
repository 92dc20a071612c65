"""The `twig-batch` command line."""
from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from twig_batch.cli_help import NamedValuesCommand, NamedValuesGroup
from twig_batch.errors import InputError, TwigBatchError
from twig_batch.io.row_errors import ErrorAllowance


class Mode(str, Enum):
    plain = "plain"
    twig = "twig"
    seed = "seed"


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=NamedValuesGroup,
                  help="Batch text-to-image with Janus-Pro and Thinking-while-Generating.")


def _version(value: bool) -> None:
    if value:
        from twig_batch import __version__

        typer.echo(f"twig-batch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, metavar="",
                                       help="Print the version and exit.")) -> None:
    """Batch text-to-image with Janus-Pro and Thinking-while-Generating."""


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    if getattr(exc, "log", None):  # a worker's failure: its full traceback is in the Ray session's logs
        typer.echo(f"full log: {exc.log} (the actors' worker-*.err)", err=True)
    raise typer.Exit(code=2)


MODEL_HELP = "'tiny' (or 'tiny-micro', 'random-7b'), a checkpoint folder (either layout) or a Hugging Face id."
GENERATE_ID = "cli"  # the id of `generate`'s images in its manifest and output layout
DETERMINISTIC_HELP = ("The same bits on every GPU run for the same seeds (attention on kernels that repeat "
                      "themselves; bf16 decode steps ~35% slower). CPU runs always repeat.")


@app.command("make-tiny-model", cls=NamedValuesCommand)
def make_tiny_model_cmd(
    folder: Path = typer.Argument(..., metavar="FOLDER", help="Where to write the checkpoint."),
    layout: str = typer.Option("hf", help="hf (transformers layout) or deepseek (DeepSeek's original layout)."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    vq_downsample: int = typer.Option(4, help="4 (96-px images) or 16 (Janus-Pro's 384-px geometry)."),
) -> None:
    """Build a random tiny Janus with an offline tokenizer and save it like a real checkpoint."""
    from twig_batch.model.tiny import make_tiny_model

    try:
        make_tiny_model(folder, layout=layout, seed=seed, vq_downsample=vq_downsample)
    except ValueError as exc:
        _fail(exc)
    typer.echo(f"tiny Janus ({layout} layout) written to {folder}")


def _controller_config(enabled: Optional[bool], weights: Optional[Path], pairs: list[str], numbers: dict):
    """The generate command's controller switches -> a ControllerConfig, or None when it is off."""
    from twig_batch.settings import ControllerConfig

    if enabled is None:
        enabled = weights is not None
    if not enabled:
        return None
    config = ControllerConfig(weights=str(weights) if weights is not None else None).with_overrides(pairs)
    given = {name: value for name, value in numbers.items() if value is not None}
    return ControllerConfig.from_dict(config.to_dict() | given)


def _generation_settings(mode: Mode, flags: dict, pairs: list[str], controller):
    """The generation flags, `--set KEY=VALUE` pairs and the controller's config -> the one
    GenerationSettings a command hands down (a flag left at None says nothing)."""
    from twig_batch.settings import GenerationSettings, parse_pairs

    values = parse_pairs(pairs)
    if "mode" in values:
        raise InputError("set the mode with --mode, not as an extra setting")
    for name, value in flags.items():
        if value is None:
            continue
        if name in values:
            raise InputError(f"--{name.replace('_', '-')} and --set {name}=... both set {name}: give one")
        values[name] = value
    if controller is not None:
        values["controller"] = controller
    return GenerationSettings.from_dict({"mode": mode.value, **values})


@app.command(cls=NamedValuesCommand)
def generate(
    prompt: str = typer.Argument(..., metavar="PROMPT", help="The text prompt."),
    model: str = typer.Option("tiny", help=MODEL_HELP),
    out: Path = typer.Option(Path("twig-output/generate"), help="Output folder: a run laid out as a batch run's "
                                                                "(images, manifest, run.json), replaced by the next "
                                                                "generate into it."),
    seed: int = typer.Option(0, help="Base seed; image i uses a seed derived from (seed, prompt, i)."),
    num_images: int = typer.Option(1, min=1, help="How many images."),
    mode: Mode = typer.Option(Mode.plain, help="What happens per image (README.md, Modes)."),
    bands: int = typer.Option(3, help="Horizontal bands (must divide the 24 token rows)."),
    reflect: bool = typer.Option(True, help="Reflect on each band and redraw it once when it scores low."),
    theta: float = typer.Option(90.0, help="Reflection score (0-100) at or above which a band is accepted."),
    think_max_tokens: int = typer.Option(512, help="Most new tokens per thought."),
    templates: Optional[Path] = typer.Option(None, help="JSON file of prompt templates replacing the defaults."),
    cfg_weight: float = typer.Option(5.0, help="Classifier-free guidance weight."),
    temperature: float = typer.Option(1.0, help="Sampling temperature (0 = greedy)."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely image tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass."),
    deterministic: bool = typer.Option(False, help=DETERMINISTIC_HELP),
    controller: Optional[bool] = typer.Option(
        None, "--controller/--no-controller",
        help="Run the latent controller (on by default when --controller-weights is given)."),
    controller_weights: Optional[Path] = typer.Option(
        None, "--controller-weights", help="Controller weights (safetensors); without it, a seeded initialisation."),
    tau_drop: Optional[float] = typer.Option(None, help="Controller: similarity drop that fires (with --tau-var)."),
    tau_var: Optional[float] = typer.Option(None, help="Controller: similarity variance that fires (with --tau-drop)."),
    tau_entropy: Optional[float] = typer.Option(None, help="Controller: entropy that fires (with --tau-sim)."),
    tau_sim: Optional[float] = typer.Option(None, help="Controller: similarity below which high entropy fires."),
    max_injections: Optional[int] = typer.Option(None, help="Controller: most injections per image and band."),
    controller_set: list[str] = typer.Option(
        [], "--controller-set", help="Any other controller number as NAME=VALUE, e.g. --controller-set min_gap=16 "
                                     "(repeatable; see ControllerConfig)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, float32 on CPU), float32, float64, bfloat16."),
) -> None:
    """Generate images for one prompt, no Ray: a run in OUT that `verify` and `report` read as a batch run's."""
    from twig_batch.devices import resolve_device, resolve_dtype
    from twig_batch.io.generated_run import check_destination, write_generated_run
    from twig_batch.io.run_info import run_identity, utc_now
    from twig_batch.io.storage import open_storage
    from twig_batch.model import load_janus
    from twig_batch.pipeline import ImageRequest, generate_images
    from twig_batch.seeds import derive_seed

    try:
        controller_config = _controller_config(
            controller, controller_weights, controller_set,
            {"tau_drop": tau_drop, "tau_var": tau_var, "tau_entropy": tau_entropy, "tau_sim": tau_sim,
             "max_injections_per_band": max_injections})
        settings = _generation_settings(mode, {"bands": bands, "reflect": reflect, "theta": theta,
                                               "think_max_tokens": think_max_tokens, "cfg_weight": cfg_weight,
                                               "temperature": temperature, "top_k": top_k, "top_p": top_p,
                                               "deterministic": deterministic}, [], controller_config)
        if not prompt.strip():
            raise TwigBatchError("the prompt is empty")
        from twig_batch.prompts import load_templates

        prompt_templates = load_templates(templates) if templates is not None else None
        storage = open_storage(str(out))
        replacing = check_destination(storage)  # before the model loads
        started_at = utc_now()
        torch_device = resolve_device(device)
        start = time.perf_counter()
        bundle = load_janus(model, torch_device, resolve_dtype(dtype, torch_device))
        load_s = time.perf_counter() - start
        # Every image has the id "cli" and its seed from (seed, prompt, i): computed here, once.
        requests = [ImageRequest(GENERATE_ID, prompt, i, derive_seed(seed, prompt, i)) for i in range(num_images)]
        start = time.perf_counter()
        results = generate_images(bundle, requests, settings, templates=prompt_templates)
        generation_s = time.perf_counter() - start
        if replacing:
            typer.echo(replacing)
        written = write_generated_run(storage, results, run_identity(model, settings, seed, prompt_templates), prompt,
                                      {"started_at": started_at, "device": device, "dtype": dtype,
                                       "model_load_s": round(load_s, 2)},
                                      generation_s, controller_ran=settings.controller is not None)
    except TwigBatchError as exc:
        _fail(exc)
    typer.echo(f"{written['manifest_ok']} image(s) written to {out}: images in {written['images']}, records in "
               f"{written['manifest']}")


MAX_ERRORS_HELP = ("Error rows allowed before the exit status is 3: a number (25) or a percentage of the rows "
                   "(1%).")
ALLOW_ERRORS_HELP = "Exit 0 whatever number of error rows the manifest holds."
BATCH_SIZE_DEPRECATED = ("--batch-size is deprecated: it is --images-per-call now (images per model call); work "
                         "items per actor call follow it, or --work-batch-size")
GENERATION, CONTROLLER, RAY = "Generation (any other setting: --set)", "Latent controller", "Ray and recovery"


@app.command("run", cls=NamedValuesCommand)
def run_cmd(
    input: str = typer.Argument(..., metavar="INPUT",
                                help="Prompts: a Parquet file, folder or glob, local or s3://bucket/key."),
    output: str = typer.Option(..., "--output", "-o", help="A local folder or s3://bucket/prefix."),
    model: str = typer.Option("tiny", help=MODEL_HELP),
    mode: Mode = typer.Option(Mode.plain, help="What happens per image (README.md, Modes)."),
    samples_per_prompt: int = typer.Option(1, help="Images per prompt."),
    seed: int = typer.Option(0, help="Base seed; each (id, sample) gets a seed derived from it."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT: skip every image recorded ok "
                                                        "(model, mode, settings, seed, columns and templates must "
                                                        "match)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in OUTPUT: its records and images are "
                                                              "removed first."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and say what the run would do: input "
                                                          "rows, images to draw, output, model, an estimate of the "
                                                          "time. Loads no model, writes nothing."),
    prompt_column: str = typer.Option("prompt", help="Column holding the prompts."),
    id_column: Optional[str] = typer.Option(None, help="Column holding the ids.",
                                            show_default="'id' when present, else ids derived from the prompts"),
    seed_column: Optional[str] = typer.Option(None, help="Integer column of per-row seeds ('' ignores it). Sample 0 "
                                                          "uses the row's seed, later samples seeds derived from it.",
                                              show_default="'seed' when present"),
    bands: Optional[int] = typer.Option(None, help="Horizontal bands (must divide the model's token rows).",
                                        show_default="3", rich_help_panel=GENERATION),
    reflect: Optional[bool] = typer.Option(None, "--reflect/--no-reflect", show_default="reflect",
                                           help="Twig mode: reflect on each band and redraw it once when it scores "
                                                "low.", rich_help_panel=GENERATION),
    theta: Optional[float] = typer.Option(None, help="Reflection score (0-100) at or above which a band is accepted.",
                                          show_default="90", rich_help_panel=GENERATION),
    think_max_tokens: Optional[int] = typer.Option(None, help="Most new tokens per thought.", show_default="512",
                                                   rich_help_panel=GENERATION),
    cfg_weight: Optional[float] = typer.Option(None, help="Classifier-free guidance weight.", show_default="5",
                                               rich_help_panel=GENERATION),
    temperature: Optional[float] = typer.Option(None, help="Sampling temperature (0 = greedy).", show_default="1",
                                                rich_help_panel=GENERATION),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely image tokens.", show_default="all",
                                        rich_help_panel=GENERATION),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass.", show_default="1",
                                          rich_help_panel=GENERATION),
    deterministic: bool = typer.Option(False, "--deterministic", help=DETERMINISTIC_HELP, rich_help_panel=GENERATION),
    setting: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", rich_help_panel=GENERATION,
                                      help="Any generation setting, e.g. --set kv_cache=fp8 (repeatable; a wrong key "
                                           "lists them all)."),
    templates: Optional[Path] = typer.Option(None, help="JSON file of prompt templates replacing the defaults.",
                                             rich_help_panel=GENERATION),
    controller: Optional[bool] = typer.Option(
        None, "--controller/--no-controller", show_default="on with --controller-weights",
        help="Run the latent controller.", rich_help_panel=CONTROLLER),
    controller_weights: Optional[Path] = typer.Option(
        None, "--controller-weights", help="Controller weights (safetensors), at a path every worker can read.",
        rich_help_panel=CONTROLLER),
    controller_set: list[str] = typer.Option(
        [], "--controller-set", metavar="NAME=VALUE", rich_help_panel=CONTROLLER,
        help="A controller number, e.g. --controller-set tau_drop=0.1 (repeatable; a wrong name lists them all)."),
    actors: Optional[int] = typer.Option(None, help="Model actors.", show_default="one per GPU in the cluster, 1 on CPU",
                                         rich_help_panel=RAY),
    gpus_per_actor: Optional[float] = typer.Option(None, help="GPUs each actor reserves.", show_default="1, 0 on CPU",
                                                   rich_help_panel=RAY),
    images_per_call: Optional[int] = typer.Option(None, help="Images per model call on each actor.",
                                                  rich_help_panel=RAY,
                                                  show_default="as many as fit in each GPU's free memory; on a CPU, "
                                                               "a call's work items"),
    work_batch_size: Optional[int] = typer.Option(None, help="Work items per actor call.",
                                                  rich_help_panel=RAY,
                                                  show_default="--images-per-call when given, else up to 256 "
                                                               "(fewer on a short run; 16 on CPU)"),
    batch_size: Optional[int] = typer.Option(None, hidden=True, help=BATCH_SIZE_DEPRECATED),
    device: str = typer.Option("auto", help="Device on each actor: auto, cpu, cuda.", rich_help_panel=RAY),
    dtype: str = typer.Option("auto", help="auto (bf16 on GPU, float32 on CPU), float32, float64, bfloat16.",
                              rich_help_panel=RAY),
    progress_every: float = typer.Option(10.0, metavar="SECONDS", rich_help_panel=RAY,
                                         help="Seconds between progress lines when the output is not a terminal "
                                              "(a terminal gets a live bar)."),
    journal_every: int = typer.Option(2000, help="Manifest rows per journal flush (at most this many are redrawn "
                                                 "after a crash).", rich_help_panel=RAY),
    max_actor_restarts: int = typer.Option(4, help="Times Ray restarts each model actor that dies (lost node, "
                                                   "out of memory) before the run stops.", rich_help_panel=RAY),
    max_task_retries: int = typer.Option(3, help="Times the items of a call whose actor died are sent again.",
                                         rich_help_panel=RAY),
    storage_retry_s: float = typer.Option(300.0, "--storage-retry-s", metavar="SECONDS", rich_help_panel=RAY,
                                          help="How long a write that fails for a passing reason (S3 refusing "
                                               "connections, throttling) is retried, with backoff, before its "
                                               "image becomes an error row."),
    max_errors: Optional[str] = typer.Option(None, "--max-errors", metavar="N|P%", show_default="0",
                                             help=MAX_ERRORS_HELP),
    allow_errors: bool = typer.Option(False, "--allow-errors", help=ALLOW_ERRORS_HELP),
    faults: Optional[str] = typer.Option(None, "--faults", metavar="JSON", show_default="$TWIG_BATCH_FAULTS",
                                         rich_help_panel=RAY,
                                         help="Testing only: inject faults, as JSON text or a JSON file (see "
                                              "docs/batch-job.md, Fault injection)."),
) -> None:
    """Batch job on Ray: every prompt x sample -> images, band images, trigger logs and a Parquet manifest."""
    from twig_batch.distributed import RunConfig, run_batch

    try:
        allowance = ErrorAllowance.parse(max_errors, allow_errors)
        flags = {"bands": bands, "reflect": reflect, "theta": theta, "think_max_tokens": think_max_tokens,
                 "cfg_weight": cfg_weight, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                 "deterministic": deterministic or None}
        settings = _generation_settings(mode, flags, setting,
                                        _controller_config(controller, controller_weights, controller_set, {}))
        if batch_size is not None:
            if images_per_call is not None:
                raise InputError("--batch-size is the old name of --images-per-call: give one")
            typer.secho(f"warning: {BATCH_SIZE_DEPRECATED}", fg=typer.colors.YELLOW, err=True)
            images_per_call = batch_size
        config = RunConfig(input=input, output=output, model=model, settings=settings,
                           actors=actors, gpus_per_actor=gpus_per_actor, images_per_call=images_per_call,
                           work_batch_size=work_batch_size,
                           samples_per_prompt=samples_per_prompt, seed=seed, resume=resume, overwrite=overwrite,
                           prompt_column=prompt_column, id_column=id_column, seed_column=seed_column,
                           device=device, dtype=dtype,
                           templates=str(templates) if templates is not None else None,
                           progress_interval_s=progress_every, journal_every_rows=journal_every,
                           max_actor_restarts=max_actor_restarts, max_task_retries=max_task_retries,
                           storage_retry_s=storage_retry_s, faults=faults,
                           progress_bar=sys.stdout.isatty())
        if dry_run:
            from twig_batch.distributed.dry_run import dry_run as check_only

            check_only(config, echo=typer.echo)
            return
        summary = run_batch(config, echo=typer.echo)
    except TwigBatchError as exc:
        _fail(exc)
    typer.echo(f"images:   {summary['images']}")
    typer.echo(f"manifest: {summary['manifest']} ({summary['manifest_ok']} ok, {summary['manifest_errors']} error rows)")
    _end_with_row_errors(summary["manifest_errors"], summary["manifest_rows"], summary["error_causes"], allowance,
                         "rerun with --resume to retry them")


def _end_with_row_errors(errors: int, rows: int, causes: list, allowance, retry: str) -> None:
    """Name the error rows' most common causes; exit ROW_ERRORS_EXIT_CODE when there are more than allowed."""
    from twig_batch.io.row_errors import ROW_ERRORS_EXIT_CODE, describe_causes

    if not errors:
        return
    typer.echo(f"error rows: {errors} of {rows}: {describe_causes(causes, errors)}")
    if allowance.allows(errors, rows):
        typer.echo(f"accepted: {errors} error row(s), within {allowance.describe()}")
        return
    typer.secho(f"finished with {errors} error row(s), more than allowed ({allowance.describe()}; --max-errors N "
                f"or P%, or --allow-errors, accepts them); {retry}; exit status {ROW_ERRORS_EXIT_CODE}",
                fg=typer.colors.RED, err=True)
    raise typer.Exit(code=ROW_ERRORS_EXIT_CODE)


@app.command("report", cls=NamedValuesCommand)
def report_cmd(
    dest: str = typer.Argument(..., metavar="DEST", help="A run's output: a local folder or s3://bucket/prefix."),
    out: Optional[Path] = typer.Option(None, help="The HTML file to write.",
                                       show_default="DEST/report.html; for s3:// runs, report.html here"),
    limit: int = typer.Option(1000, min=0, help="Show at most this many images (errors are always all listed)."),
) -> None:
    """One self-contained HTML page of a run: summary, throughput, image grid, bands, thoughts, triggers."""
    from twig_batch.report import write_report

    if out is None:
        out = Path("report.html") if dest.startswith("s3://") else Path(dest) / "report.html"
    try:
        written = write_report(dest, out, limit)
    except TwigBatchError as exc:
        _fail(exc)
    typer.echo(f"report: {Path(written['path']).resolve()} ({written['images']} images, "
               f"{written['bytes'] / 1e6:.1f} MB); open it in a browser")


@app.command("verify", cls=NamedValuesCommand)
def verify_cmd(
    dest: str = typer.Argument(..., metavar="DEST", help="A run's output: a local folder or s3://bucket/prefix."),
    input: Optional[str] = typer.Option(None, "--input", help="The run's input, to check that every prompt x "
                                                               "sample was drawn and nothing else."),
    max_errors: Optional[str] = typer.Option(None, "--max-errors", metavar="N|P%", show_default="0",
                                             help=MAX_ERRORS_HELP),
    allow_errors: bool = typer.Option(False, "--allow-errors", help=ALLOW_ERRORS_HELP),
) -> None:
    """Check a run's output: objects exist and decode, no duplicate rows, counts, the completion marker.

    Exits 0 when clean, 1 when it found problems (each listed), 2 when DEST or the input cannot be read,
    3 when it holds more error rows than allowed.
    """
    from twig_batch.distributed.verify_run import verify_run

    try:
        allowance = ErrorAllowance.parse(max_errors, allow_errors)
        report = verify_run(dest, input)
    except TwigBatchError as exc:
        _fail(exc)
    typer.echo(f"verify: {report.dest} ({'complete' if report.complete else 'not complete'})")
    typer.echo(f"  rows:    {report.manifest_rows} in the manifest, {report.journal_rows} in the journal, "
               f"{report.duplicate_rows} duplicate")
    typer.echo(f"  items:   {report.items} recorded: {report.ok_rows} ok, {report.error_rows} error "
               "(per-row failures; --resume retries them)")
    typer.echo(f"  objects: {report.images_checked} images and {report.trigger_logs_checked} trigger logs checked")
    if report.expected_items is not None:
        typer.echo(f"  input:   {report.expected_items} expected, {report.missing_items} missing, "
                   f"{report.unexpected_items} unexpected")
    if report.ok:
        typer.echo("ok: no problems found")
        _end_with_row_errors(report.error_rows, report.items, report.error_causes, allowance,
                             "twig-batch run --resume retries them")
        return
    typer.echo(f"{report.problem_count} problem(s):")
    for problem in report.problems:
        typer.echo(f"  - {problem}")
    raise typer.Exit(code=1)


def main() -> None:
    try:
        app()
    except TwigBatchError as exc:  # anything that escaped a command's own handling
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
