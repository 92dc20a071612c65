"""The bad-input matrix: each kind of bad input `twig-batch run` can meet, and what the user sees.

File-level kinds stop the run in its preflight: one `error:` line naming the file, column, row or
setting and the problem, exit code 2, Ray never joined, nothing written to the destination.
Row-level kinds share one real Ray run on the tiny model: each bad row's manifest row has status
`error` and a reason naming the problem, and every other row is drawn.

Kind                                  Where it is tested
missing path                          test_run_errors.py::test_missing_input
not Parquet                           test_run_errors.py::test_unreadable_file
empty file (0 bytes)                  FILE_LEVEL: empty-file
zero rows                             FILE_LEVEL: zero-rows, zero-rows-in-every-file
no prompt column                      test_run_errors.py::test_no_prompt_column
non-string prompt column              test_run_errors.py::test_wrong_column_type; FILE_LEVEL: prompt-*
null / empty / whitespace prompts     ROW_LEVEL (null, empty, blank)
100,000-character prompt              ROW_LEVEL (too-long)
control characters and NUL            ROW_LEVEL (nul, escape); tab and newline stay fine (tab-newline)
text that is not UTF-8                ROW_LEVEL (not-utf8)
emoji / CJK / right-to-left text      ROW_LEVEL (emoji, cjk, arabic, hebrew): drawn
duplicate ids                         FILE_LEVEL: duplicate-id*
ids with path characters              ROW_LEVEL (../../escape, a/b\\c:d*e?, /absolute): drawn under DEST/images
integer ids in one file, text in one  ROW_LEVEL (7001): drawn
seed column of the wrong type         FILE_LEVEL: seed-string, seed-float
negative / null / overflowing seed    ROW_LEVEL (seed-negative, seed-null, seed-overflow); 2**63 - 1 is fine
samples-per-prompt 0                  FILE_LEVEL: samples-0
bands not dividing 24                 FILE_LEVEL: bands-5-tiny, bands-5-folder, bands-text
NaN or negative cfg weight            FILE_LEVEL: cfg-*
unwritable destination                test_run_errors.py::test_unwritable_destination; FILE_LEVEL: dest-*
missing bucket                        test_run_errors.py::test_missing_output_bucket, ..._input_bucket_and_key
bad credentials                       test_run_errors.py::test_missing_credentials, ::test_refused_credentials
model folder missing files            FILE_LEVEL: model-*; an absent folder: test_run_failures.py (local
                                      cluster, before Ray) and test_run_modes.py (a joined cluster's worker)
controller weights of the wrong shape FILE_LEVEL: controller-*
"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch_support import read_manifest, write_prompts
from twig_batch.cli import app
from twig_batch.distributed.work_items import sample_seed

runner = CliRunner()


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the run gets as far as joining a Ray cluster."""
    def refuse(*args, **kwargs):
        raise AssertionError("a file-level problem reached Ray")

    monkeypatch.setattr("twig_batch.distributed.batch_job.connect", refuse)


# ---- file level: the preflight refuses the run --------------------------------------------------

def table(path, columns: dict, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)
    return path


def prompts_file(tmp_path):
    return write_prompts(tmp_path / "prompts.parquet", 3)


def empty_file(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_bytes(b"")
    return path


def folder_of(tmp_path, *tables: dict):
    """An input folder of Parquet files a.parquet, b.parquet, ... holding `tables`."""
    for name, columns in zip("abcdefgh", tables):
        table(tmp_path / "in" / f"{name}.parquet", columns)
    return tmp_path / "in"


def checkpoint_folder(tmp_path, drop=(), extra=None):
    """A local checkpoint folder with the files a load looks for (their contents are never read here)."""
    from twig_batch.model.checkpoint import tiny_config

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tiny_config(1024, 0, {}).to_dict()))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    for name, text in (extra or {}).items():
        (folder / name).write_text(text)
    for name in drop:
        (folder / name).unlink()
    return folder


def controller_weights(tmp_path, hidden_size: int):
    from twig_batch.controller import ControllerConfig
    from twig_batch.controller.weights import build_controller_net, save_weights

    return save_weights(build_controller_net(hidden_size, ControllerConfig()), tmp_path / "controller.safetensors")


def read_only_folder(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    return folder / "out"


# Each case: build the input and options under tmp_path -> (CLI arguments after INPUT, fragments of the error).
FILE_LEVEL = {
    "empty-file": lambda t: ([empty_file(t)], ["p.parquet", "is empty (0 bytes)", "not a Parquet file"]),
    "zero-rows": lambda t: ([table(t / "p.parquet", {"prompt": pa.array([], pa.string())})],
                            ["p.parquet", "holds no rows", "nothing to draw"]),
    "zero-rows-in-every-file": lambda t: ([folder_of(t, *[{"prompt": pa.array([], pa.string())}] * 2)],
                                          ["holds no rows (2 file(s), 0 rows)"]),
    "prompt-binary": lambda t: ([table(t / "p.parquet", {"prompt": [b"a cube"]})],
                                ["'prompt'", "p.parquet", "holds binary, not text"]),
    "prompt-list": lambda t: ([table(t / "p.parquet", {"prompt": [["a", "cube"]]})],
                              ["'prompt'", "holds list<", "not text"]),
    "prompt-float": lambda t: ([table(t / "p.parquet", {"prompt": [1.5]})], ["'prompt'", "holds double, not text"]),
    "seed-string": lambda t: ([table(t / "p.parquet", {"prompt": ["a cube"], "seed": ["42"]})],
                              ["seed column 'seed'", "p.parquet", "holds string", "seeds must be integers",
                               "--seed-column"]),
    "seed-float": lambda t: ([table(t / "p.parquet", {"prompt": ["a cube", "a cat"], "seed": [1.0, None]})],
                             ["seed column 'seed'", "holds double", "store them as Int64"]),
    "seed-column-named-but-absent": lambda t: ([prompts_file(t), "--seed-column", "row_seed"],
                                               ["no seed column 'row_seed'", "columns: id, prompt"]),
    "seed-column-is-the-prompt-column": lambda t: ([prompts_file(t), "--seed-column", "prompt"],
                                                   ["seed column 'prompt' is also the prompt or id column"]),
    "duplicate-id": lambda t: ([table(t / "p.parquet", {"id": ["a", "dup", "b", "dup"], "prompt": list("wxyz")})],
                               ["id 'dup'", "column 'id'", "rows 1 and 3 of", "p.parquet", "must be unique"]),
    "duplicate-id-across-files": lambda t: (  # 7 and "7" are one id: the run casts ids to text
        [folder_of(t, {"id": [5, 6, 7], "prompt": list("xyz")}, {"id": ["7"], "prompt": ["w"]})],
        ["id '7'", "row 2 of", "a.parquet and row 0 of", "b.parquet"]),
    "duplicate-id-named-column": lambda t: (
        [table(t / "p.parquet", {"key": ["k1", "k1"], "prompt": ["x", "y"]}), "--id-column", "key"],
        ["id 'k1'", "column 'key'", "rows 0 and 1"]),
    "samples-0": lambda t: ([prompts_file(t), "--samples-per-prompt", 0], ["samples per prompt must be >= 1, got 0"]),
    "bands-5-tiny": lambda t: ([prompts_file(t), "--set", "bands=5"],
                               ["bands=5 does not divide the image's 24 token rows",
                                "use one of [1, 2, 3, 4, 6, 8, 12, 24]"]),
    "bands-5-folder": lambda t: ([prompts_file(t), "--set", "bands=5", "--model", checkpoint_folder(t)],
                                 ["bands=5 does not divide the image's 24 token rows"]),
    "bands-text": lambda t: ([prompts_file(t), "--set", "bands=three"], ["bands must be a whole number, got 'three'"]),
    "bands-fraction": lambda t: ([prompts_file(t), "--set", "bands=2.5"], ["bands must be a whole number, got 2.5"]),
    "cfg-NaN": lambda t: ([prompts_file(t), "--set", "cfg_weight=NaN"], ["cfg weight must be a finite number", "nan"]),
    "cfg-nan-text": lambda t: ([prompts_file(t), "--set", "cfg_weight=nan"], ["cfg weight", "got 'nan'"]),
    "cfg-Infinity": lambda t: ([prompts_file(t), "--set", "cfg_weight=Infinity"], ["cfg weight", "got inf"]),
    "cfg-negative": lambda t: ([prompts_file(t), "--set", "cfg_weight=-0.5"], ["cfg weight", ">= 0, got -0.5"]),
    "dest-is-a-file": lambda t: ([prompts_file(t), "--output", empty_file(t)], ["exists and is not a folder"]),
    "dest-inside-a-device": lambda t: ([prompts_file(t), "--output", "/dev/null/out"],
                                       ["cannot write to output folder /dev/null/out"]),
    "dest-read-only": lambda t: ([prompts_file(t), "--output", read_only_folder(t)],
                                 ["cannot write to output folder", "locked"]),
    "model-config-only": lambda t: ([prompts_file(t), "--model", checkpoint_folder(t, drop=["tokenizer.json",
                                                                                            "model.safetensors"])],
                                    ["checkpoint", "has no tokenizer (neither tokenizer.json nor tokenizer.model)"]),
    "model-no-weights": lambda t: ([prompts_file(t), "--model", checkpoint_folder(t, drop=["model.safetensors"])],
                                   ["checkpoint", "has no weights", "model.safetensors"]),
    "model-no-tokenizer": lambda t: ([prompts_file(t), "--model", checkpoint_folder(t, drop=["tokenizer.json"])],
                                     ["checkpoint", "has no tokenizer"]),
    "model-missing-shard": lambda t: (
        [prompts_file(t), "--model", checkpoint_folder(t, drop=["model.safetensors"], extra={
            "model.safetensors.index.json": json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                       "b": "model-00002-of-00002.safetensors"}}),
            "model-00001-of-00002.safetensors": ""})],
        ["is missing weight shards: model-00002-of-00002.safetensors"]),
    "model-no-config": lambda t: ([prompts_file(t), "--model", checkpoint_folder(t, drop=["config.json"])],
                                  ["has no config.json"]),
    "model-broken-config": lambda t: ([prompts_file(t), "--model", checkpoint_folder(t, extra={"config.json": "{"})],
                                      ["cannot read", "config.json"]),
    "controller-wrong-shape": lambda t: (
        [prompts_file(t), "--controller-weights", controller_weights(t, hidden_size=32)],
        ["controller.safetensors", "hidden size 64", "tensor condenser.latents has shape [8, 32], needs [8, 64]"]),
    "controller-weights-absent": lambda t: ([prompts_file(t), "--controller-weights", t / "nope.safetensors"],
                                            ["controller weights file", "nope.safetensors does not exist"]),
}


@pytest.mark.parametrize("kind", list(FILE_LEVEL))
def test_file_level_problem_is_one_clear_error(kind, tmp_path, no_ray):
    if kind == "dest-read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    args, fragments, *_ = FILE_LEVEL[kind](tmp_path)
    input_path, options = args[0], args[1:]
    dest = tmp_path / "dest"
    if "--output" not in options:
        options = [*options, "--output", dest]
    result = runner.invoke(app, ["run", str(input_path), *map(str, options)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert not dest.exists()  # the destination is not even created


def test_a_unique_id_check_reads_a_million_ids_quickly(tmp_path):
    """The duplicate-id check reads the id column of the whole input; it must stay cheap."""
    import time

    from twig_batch.io.dataset import check_unique_ids, resolve_input

    ids = pa.array([f"img-{i:08d}" for i in range(1_000_000)])
    table(tmp_path / "big.parquet", {"id": ids, "prompt": pa.array(["a cube"] * len(ids))})
    start = time.perf_counter()
    check_unique_ids(resolve_input(str(tmp_path / "big.parquet")), "id")
    assert time.perf_counter() - start < 10  # about half a second on one core


# ---- row level: one real run, every bad row next to good ones -----------------------------------

LONG_PROMPT = ("a red cube on a blue table " * 4000)[:100_000]
# id -> (prompt, seed, expected reason fragments; None for a row that must be drawn)
ROW_LEVEL = {
    "good": ("a red cube", 11, None),
    "null": (None, 12, ["prompt is missing (null)"]),
    "empty": ("", 13, ["prompt is empty"]),
    "blank": ("  \t\n ", 14, ["prompt is empty (only whitespace)"]),
    "too-long": (LONG_PROMPT, 15, ["prompt is too long:", "tokens, the limit is"]),
    "nul": ("a red\x00 cube", 16, ["control character U+0000 (NUL) at position 5"]),
    "escape": ("\x1b[31ma red cube", 17, ["control character U+001B (ESC) at position 0"]),
    "not-utf8": (b"a red \xff cube", 26, ["prompt is not valid UTF-8 text (byte 0xff at byte 6)"]),
    "tab-newline": ("a red cube\ton a table\nat night", 18, None),
    "emoji": ("a cat 🐱 next to a 🌲 under the 🌙", 19, None),
    "cjk": ("一只红色的猫坐在桌子上 赤い猫", 20, None),
    "arabic": ("قطة حمراء على طاولة", 21, None),
    "hebrew": ("\u200fחתול אדום על שולחן", 22, None),
    "../../escape": ("a green cube", 23, None),
    "a/b\\c:d*e?": ("a blue cube", 24, None),
    "/absolute": ("a white cube", 25, None),
    "seed-negative": ("a black cube", -3, ["seed -3 in column 'seed' is negative"]),
    "seed-null": ("a yellow cube", None, ["seed is missing (null in column 'seed')"]),
    "seed-overflow": ("an orange cube", 2**63, ["seed 9223372036854775808 in column 'seed' does not fit in int64"]),
    "seed-max": ("a purple cube", 2**63 - 1, None),
    "7001": ("a small house", 7001, None),  # an integer id, in a file of its own
}
# Files other than the main one (string ids, int64 seeds): one type per file can differ from the others'.
OTHER_FILES = {"unsigned-seeds": (["seed-overflow", "seed-max"], pa.string(), pa.uint64()),
               "integer-ids": (["7001"], pa.int64(), pa.int32())}
SAMPLES = 2


@pytest.fixture(scope="module")
def row_level_run(shared_ray, tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    # Seeds beyond int64 need an unsigned column and negative ones a signed column: several files, one input.
    elsewhere = {i for ids, _, _ in OTHER_FILES.values() for i in ids}
    files = {"main": ([i for i in ROW_LEVEL if i not in elsewhere], pa.string(), pa.int64()), **OTHER_FILES}
    for name, (ids, id_type, seed_type) in files.items():
        # Raw bytes make a string column that is not UTF-8, as writers that skip validation leave it.
        prompts = [p.encode() if isinstance(p, str) else p for p in (ROW_LEVEL[i][0] for i in ids)]
        table(root / "input" / f"{name}.parquet",  # with a column the run does not use, as real datasets have
              {"id": [int(i) if pa.types.is_integer(id_type) else i for i in ids],
               "prompt": pa.array(prompts, pa.binary()).view(pa.string()), "seed": [ROW_LEVEL[i][1] for i in ids],
               "source": [name] * len(ids)},
              schema=pa.schema([("id", id_type), ("prompt", pa.string()), ("seed", seed_type),
                                ("source", pa.string())]))
    dest = root / "dest"
    result = runner.invoke(app, ["run", str(root / "input"), "--output", str(dest), "--actors", "1",
                                 "--images-per-call", "8", "--samples-per-prompt", str(SAMPLES)])
    # Error rows are expected here: the run finishes with exit status 3 (finished with row errors).
    rows = {(r["id"], r["sample_index"]): r for r in read_manifest(dest).to_pylist()} if result.exit_code == 3 else {}
    return root, dest, result, rows


@pytest.mark.parametrize("kind", list(ROW_LEVEL))
def test_row_level_problem_is_that_rows_error_only(row_level_run, kind):
    _, dest, result, rows = row_level_run
    assert result.exit_code == 3, result.output
    prompt, seed, reasons = ROW_LEVEL[kind]
    for sample in range(SAMPLES):
        row = rows[(kind, sample)]
        if reasons is None:  # drawn, with the row's seed, inside the destination
            assert row["status"] == "ok" and row["error"] is None and row["prompt"] == prompt
            assert row["seed"] == sample_seed(seed, sample)
            image = (dest / row["image_uri"]).resolve()
            assert image.is_file() and (dest / "images").resolve() in image.parents
        else:
            assert row["status"] == "error" and row["image_uri"] is None, row
            for reason in reasons:
                assert reason in row["error"], row["error"]


def test_too_long_prompt_names_its_tokens_and_the_limit(row_level_run):
    import re

    error = row_level_run[3][("too-long", 0)]["error"]
    tokens, limit = map(int, re.search(r"too long: (\d+) tokens, the limit is (\d+)", error).groups())
    # The tiny model holds 8192 tokens; 576 of them are the image's, a few the chat template's.
    assert tokens > 10_000 and 7_000 < limit < 8192 - 576


def test_row_level_run_draws_every_good_row_and_counts_the_bad_ones(row_level_run):
    root, dest, result, rows = row_level_run
    assert result.exit_code == 3, result.output
    bad = [kind for kind, (_, _, reasons) in ROW_LEVEL.items() if reasons]
    assert len(rows) == len(ROW_LEVEL) * SAMPLES
    assert sum(r["status"] == "error" for r in rows.values()) == len(bad) * SAMPLES
    assert f"{len(bad) * SAMPLES} error(s)" in result.output
    # Error rows draw nothing: one folder of images per good id, and nothing outside the destination.
    assert len(list((dest / "images").rglob("sample-0000.png"))) == len(ROW_LEVEL) - len(bad)
    for path in root.rglob("*"):
        if path.is_file() and path.parent != root / "input":
            assert dest.resolve() in path.resolve().parents, path
    assert not (root / "escape").exists() and not (dest / "a").exists()


def test_row_seeds_are_recorded_and_resume_must_keep_the_seed_column(row_level_run):
    root, dest, _, rows = row_level_run
    info = json.loads((dest / "run.json").read_text())
    assert info["seed_column"] == "seed"
    assert rows[("good", 0)]["seed"] == 11 and rows[("good", 1)]["seed"] == sample_seed(11, 1) != 11
    result = runner.invoke(app, ["run", str(root / "input"), "--output", str(dest), "--resume",
                                 "--samples-per-prompt", str(SAMPLES), "--seed-column", ""])
    assert result.exit_code == 2 and "cannot resume" in result.output and "seed_column" in result.output


# ---- the prompt checks themselves, without Ray ----------------------------------------------------

@pytest.mark.parametrize("prompt, reason", [
    ("a\x7fb", "U+007F (DEL) at position 1"),
    ("a red\x85cube", "U+0085 at position 5"),  # a C1 control
    ("\x07ding", "U+0007 (BEL) at position 0"),
    ("tab\tnewline\ncarriage return\r\n", None),
    ("zero\u200bwidth space and \u202eright-to-left override", None),  # format characters, not controls
])
def test_control_characters(prompt, reason):
    from twig_batch.io.prompt_checks import text_problem

    problem = text_problem(prompt)
    assert (problem is None) if reason is None else (reason in problem), problem


def test_the_prompt_limit_follows_mode_and_settings_and_is_exact():
    from twig_batch.controller import ControllerConfig
    from twig_batch.pipeline.sequences import PromptBudget
    from twig_batch.model import load_janus
    from twig_batch.settings import GenerationSettings

    bundle = load_janus("tiny")
    limits = {mode: PromptBudget(bundle, GenerationSettings(mode=mode)).limit for mode in ("plain", "twig", "seed")}
    # twig repeats the prompt next to every thought and a picture; seed next to a stage plan.
    assert limits["twig"] < limits["seed"] < limits["plain"] < 8192 - 576
    controlled = PromptBudget(bundle, GenerationSettings(controller=ControllerConfig())).limit
    assert controlled == limits["plain"] - ControllerConfig().max_injections_per_band * ControllerConfig().control_tokens
    shorter_texts = PromptBudget(bundle, GenerationSettings(mode="twig", think_max_tokens=64)).limit
    assert shorter_texts > limits["twig"]
    budget = PromptBudget(bundle, GenerationSettings())
    words = "a red cube on a table "
    low, high = 1, budget.limit  # the most repeats that still fit, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if budget.count(words * middle) <= budget.limit else (low, middle - 1)
    fits = low
    assert budget.problem(words * fits) is None
    assert budget.problem(words * (fits + 1)).startswith(
        f"prompt is too long: {budget.count(words * (fits + 1))} tokens, the limit is {budget.limit}")
