"""File-level problems stop `twig-batch run` before Ray is joined or a model loaded, with one message."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from typer.testing import CliRunner

from batch_support import s3_client, s3_server, strict_s3_server, upload_parquet, write_prompts
from twig_batch.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        s3_client().create_bucket(Bucket="errors-in")
        s3_client().create_bucket(Bucket="errors-out")
        yield endpoint


@pytest.fixture
def prompts(tmp_path):
    return write_prompts(tmp_path / "prompts.parquet", 4)


def fails_cleanly(args, *fragments):
    result = runner.invoke(app, ["run", *map(str, args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not ray.is_initialized()  # stopped before any cluster, actor or model
    return errors[0]


def test_missing_input(tmp_path):
    fails_cleanly([tmp_path / "nope.parquet", "--output", tmp_path / "out"], "does not exist")
    assert not (tmp_path / "out").exists()


def test_no_prompt_column(tmp_path):
    pq.write_table(pa.table({"text": ["a cube"]}), tmp_path / "p.parquet")
    fails_cleanly([tmp_path / "p.parquet", "--output", tmp_path / "out"], "no column 'prompt'", "--prompt-column")


def test_wrong_column_type(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2, 3]}), tmp_path / "p.parquet")
    fails_cleanly([tmp_path / "p.parquet", "--output", tmp_path / "out"], "'prompt'", "int64", "not text")


def test_unreadable_file(tmp_path):
    (tmp_path / "p.parquet").write_bytes(b"this is not parquet at all")
    fails_cleanly([tmp_path / "p.parquet", "--output", tmp_path / "out"], "cannot read", "as Parquet")


def test_unwritable_destination(tmp_path, prompts):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    fails_cleanly([prompts, "--output", tmp_path / "blocker" / "out"], "cannot write to output folder")


def test_explicit_id_column_must_exist(tmp_path, prompts):
    fails_cleanly([prompts, "--output", tmp_path / "out", "--id-column", "key"], "no id column 'key'")


def test_bad_settings(tmp_path, prompts):
    fails_cleanly([prompts, "--output", tmp_path / "out", "--set", "cfg_weight=-1"], "cfg weight")
    fails_cleanly([prompts, "--output", tmp_path / "out", "--set", "no_such_knob=1"], "unknown generation setting")
    fails_cleanly([prompts, "--output", tmp_path / "out", "--images-per-call", 0], "images per call must be >= 1")
    result = runner.invoke(app, ["run", str(prompts), "--output", str(tmp_path / "out"), "--mode", "dream"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "'dream' is not one of 'plain', 'twig', 'seed'" in result.output


def test_model_folder_that_is_not_a_checkpoint(tmp_path, prompts):
    (tmp_path / "not-a-model").mkdir()
    fails_cleanly([prompts, "--output", tmp_path / "out", "--model", tmp_path / "not-a-model"], "no config.json")


def test_missing_output_bucket(tmp_path, prompts, s3):
    fails_cleanly([prompts, "--output", "s3://no-such-bucket/run"], "s3://no-such-bucket/run",
                  "bucket does not exist")


def test_missing_input_bucket_and_key(tmp_path, s3):
    fails_cleanly(["s3://no-such-bucket/p.parquet", "--output", tmp_path / "out"], "bucket does not exist")
    fails_cleanly(["s3://errors-in/nothing-here.parquet", "--output", tmp_path / "out"], "matches no Parquet")


def test_s3_input_with_wrong_column(tmp_path, s3):
    uri = upload_parquet("errors-in", "bad/p.parquet", pa.table({"text": ["x"]}))
    fails_cleanly([uri, "--output", "s3://errors-out/run"], uri, "no column 'prompt'")


def test_missing_credentials(tmp_path, prompts, s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    fails_cleanly([prompts, "--output", "s3://errors-out/run"], "no usable AWS credentials")


def test_refused_credentials(tmp_path, prompts, monkeypatch):
    with strict_s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        message = fails_cleanly([prompts, "--output", "s3://errors-out/run"], "credentials were refused")
        assert "not-the-secret" not in message


def test_template_with_a_field_in_a_format_spec(tmp_path, prompts):
    templates = tmp_path / "templates.json"
    templates.write_text('{"think_first": "{band:{prompt.__class__.__mro__}} {prompt}"}')
    fails_cleanly([prompts, "--output", tmp_path / "out", "--mode", "twig", "--templates", templates],
                  "'think_first'", "a field inside a format spec")
    assert not (tmp_path / "out").exists()


def corrupt_a_data_page(path, row_group: int, column: int) -> None:
    """Overwrite 400 bytes inside one data page (its header and the footer stay intact), as a bad disk
    or a broken copy would."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    data = bytearray(path.read_bytes())
    start = meta.data_page_offset + 400  # past the page header, among the values
    data[start:start + 400] = b"\xff" * 400
    path.write_bytes(bytes(data))


def test_a_corrupted_data_page_is_named_before_anything_runs(tmp_path):
    folder = tmp_path / "input"
    write_prompts(folder / "a-good.parquet", 50)
    bad = folder / "b-bad.parquet"
    prompts = [f"a cube number {i} " * 3 for i in range(300)]
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(300)], "prompt": prompts}), bad, row_group_size=100,
                   compression="none", use_dictionary=False)
    corrupt_a_data_page(bad, row_group=1, column=1)
    assert pq.ParquetFile(bad).metadata.num_rows == 300  # the footer still reads
    fails_cleanly([folder, "--output", tmp_path / "out"], f"{bad}: row group 1 of 3 (rows 100..199) cannot be read",
                  "BYTE_ARRAY", "Nothing was drawn")
    assert not (tmp_path / "out").exists()
