"""Every code snippet of README.md and docs/*.md runs, in order, so none can rot.

Python blocks run as written; every `twig-batch` command of a bash block runs through the CLI. They
share one local Ray cluster, an S3 server standing in for `s3://bucket` and `s3://my-bucket` (with
the sample prompts under `prompts/`), and a working folder holding `prompts.parquet` and
`examples/prompts.parquet`. What a CPU test machine cannot run as written is substituted, and only
that (SUBSTITUTIONS). Commands of other tools are tested where COVERED_ELSEWHERE says; a command
that is neither is a failure, so a new snippet cannot slip by untested.
"""
import os
import re
import shlex
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from batch_support import s3_client, upload_parquet, write_prompts
from twig_batch.cli import app

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", pytest.param("docs/batch-job.md", marks=pytest.mark.slow), "docs/report.md",
             "docs/engine.md", "docs/controller.md", "docs/fidelity.md"]
SUBSTITUTIONS = [
    ("deepseek-community/Janus-Pro-7B", "tiny-micro"),  # no 7B weights on a test machine
    ("num_gpus=1, compute=ray.data.ActorPoolStrategy(size=4)",  # the GPU variant, on a machine without one
     "num_gpus=0, compute=ray.data.ActorPoolStrategy(size=1)"),
    # pyarrow's S3 writer completes even small files as multipart uploads, which the stand-in S3
    # server fails; the Ray Data output goes to a local folder instead.
    ('write_parquet("s3://bucket/with-pngs/")', 'write_parquet("twig-output/with-pngs/")'),
]
COVERED_ELSEWHERE = {
    "bash examples/quickstart.sh": "test_run_quickstart.py",
    "bash tests/run.sh": "the suite itself",
    "RAY_AUTH_MODE=token ray job submit": "test_job_submit.py",
}


def code_blocks(document: str):
    text = (REPO / document).read_text()
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        yield match.group(1), match.group(2)


def commands(block: str):
    """The commands of a bash block: continuation lines joined, comments dropped."""
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            yield line


def substituted(text: str, tmp: Path) -> str:
    import torch

    for old, new in SUBSTITUTIONS:
        if "num_gpus" in old and torch.cuda.is_available():
            continue
        text = text.replace(old, new)
    return text.replace("/tmp/", f"{tmp}/").replace("$PWD", str(tmp))


@pytest.fixture(scope="module")
def workspace(shared_ray_s3, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    (tmp / "examples").mkdir()
    shutil.copy(REPO / "examples" / "prompts.parquet", tmp / "examples" / "prompts.parquet")
    write_prompts(tmp / "prompts.parquet", 2)
    # The random tiny model never ends a text by itself: its thoughts stop after 8 tokens (the
    # benchmark-only emulation).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TWIG_BATCH_EMULATE_TEXT_LENGTHS", "thought=8,reflection=8,plan=8")
        for bucket in ("bucket", "my-bucket"):
            s3_client().create_bucket(Bucket=bucket)
            upload_parquet(bucket, "prompts/p.parquet", pq.read_table(tmp / "prompts.parquet"))
        before = os.getcwd()
        os.chdir(tmp)
        try:
            yield tmp
        finally:
            os.chdir(before)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_snippet_runs(workspace, document):
    ran = 0
    for language, block in code_blocks(document):
        if language == "python":
            exec(compile(substituted(block, workspace), f"{document} snippet", "exec"), {"__name__": "__main__"})
            ran += 1
        elif language == "bash":
            for command in commands(block):
                covered = next((k for k in COVERED_ELSEWHERE if command.startswith(k)), None)
                if covered:
                    continue
                words = shlex.split(substituted(command, workspace))
                assert words[0] == "twig-batch", f"{document}: {command!r} is neither run here nor covered elsewhere"
                result = CliRunner().invoke(app, words[1:])
                assert result.exit_code == 0, f"{document}: {command}\n{result.output}"
                ran += 1
    assert ran or document in ("docs/engine.md", "docs/controller.md")
