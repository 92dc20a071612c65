"""Entrypoint for `ray job submit`: the same options as `twig-batch run`.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/generate_batch.py s3://bucket/prompts/ --output s3://bucket/runs/first

Inside a submitted job `RAY_ADDRESS` is set, so the run joins the cluster the job was sent to.
"""
from __future__ import annotations

import sys
from pathlib import Path

# The uploaded working directory is the job's current directory; make its package importable even
# where the cluster image has an older twig-batch installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twig_batch.cli import main  # noqa: E402


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "run", *sys.argv[1:]]
    main()
