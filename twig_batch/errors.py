"""Errors a user can act on. Each carries one plain message; the CLI prints it without a traceback."""


class TwigBatchError(Exception):
    """Base class: anything raised as this is a user-facing problem, not a bug."""


class ModelLoadError(TwigBatchError):
    """The model reference cannot be loaded (missing folder, weights, unknown layout, shape mismatch)."""


class InputError(TwigBatchError):
    """The input dataset or a setting is unusable as a whole; no GPU work was started."""


class OutputError(TwigBatchError):
    """The output destination cannot be written."""
