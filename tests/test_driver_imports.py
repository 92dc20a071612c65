"""The batch driver never loads torch or transformers for a model the actors fetch or build themselves
(a Hugging Face id, the random speed models, the built-in tiny ones): only the actors need them, and
importing them costs the driver seconds before any actor starts."""
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

DRIVER = """
import sys
from twig_batch.cli import main
sys.argv = ["twig-batch", "run", {input!r}, "--output", {output!r}, "--model", {model!r}, "--dry-run", *{mode!r}]
try:
    main()
except SystemExit as exc:
    print("EXIT", exc.code)
print("LOADED", sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


@pytest.mark.parametrize("model,mode", [("random-7b", ["--mode", "twig", "--controller"]),
                                        ("deepseek-community/Janus-Pro-7B", ["--mode", "seed"]),
                                        ("random-1b", ["--mode", "plain"]),
                                        ("tiny", ["--mode", "twig", "--controller", "--bands", "3"]),
                                        ("tiny-micro", ["--mode", "seed"])])
def test_the_driver_checks_a_run_without_loading_torch(tmp_path, model, mode):
    source = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red fox", "a paper boat"]}), source)
    script = DRIVER.format(input=str(source), output=str(tmp_path / "out"), model=model, mode=mode)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "every check passed" in done.stdout, done.stdout + done.stderr
    assert "LOADED []" in done.stdout, done.stdout


def test_the_package_names_still_load_on_first_use():
    script = ("import sys, twig_batch\nassert 'torch' not in sys.modules\n"
              "from twig_batch import load_janus, ImageRequest\nfrom twig_batch.model import JanusBundle\n"
              "print(load_janus.__module__, ImageRequest.__module__, JanusBundle.__module__, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["twig_batch.model.loading", "twig_batch.pipeline.request",
                                   "twig_batch.model.bundle", "True"], done.stdout + done.stderr
