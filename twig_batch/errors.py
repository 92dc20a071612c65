"""Errors a user can act on. Each carries one plain message; the CLI prints it without a traceback."""


class TwigBatchError(Exception):
    """Base class: anything raised as this is a user-facing problem, not a bug."""


class ModelLoadError(TwigBatchError):
    """The model reference cannot be loaded (missing folder, weights, unknown layout, shape mismatch)."""


class InputError(TwigBatchError):
    """The input dataset or a setting is unusable as a whole; no GPU work was started."""


class OutputError(TwigBatchError):
    """The output destination cannot be written."""


class DestinationFullError(OutputError):
    """The output's disk is full (or its quota spent): no further image can be written, so the run stops."""


def unknown_name(kind: str, name: str, known) -> InputError:
    """`kind` NAME is not one of `known`: the error names the nearest and lists them all."""
    import difflib

    known = sorted(known)
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return InputError(f"unknown {kind} {name!r}{hint}; the {kind}s are: {', '.join(known)}")
