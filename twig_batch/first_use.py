"""Package names imported on first use (PEP 562), so that importing a package costs nothing heavy.

The batch driver imports `twig_batch` and its model references without loading torch, which only
the actors need; `from twig_batch import load_janus` still works, and loads torch then.
"""
from __future__ import annotations

from importlib import import_module


def names_on_first_use(namespace: dict, modules: dict[str, str]):
    """A module `__getattr__` that imports `name` from `modules[name]` when it is first asked for."""

    def __getattr__(name: str):
        if name not in modules:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(import_module(modules[name]), name)
        namespace[name] = value  # asked once: later lookups find it without this hook
        return value

    return __getattr__
