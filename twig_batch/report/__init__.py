"""The run report: one self-contained HTML page of a batch run (`twig-batch report DEST`)."""
from twig_batch.report.render import DEFAULT_LIMIT, build_report, write_report

__all__ = ["DEFAULT_LIMIT", "build_report", "write_report"]
