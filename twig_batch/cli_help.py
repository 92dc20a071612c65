"""Help text of the `twig-batch` commands: a value is named (N, TEXT, PATH) rather than shown as its
Python type, on every typer release pyproject allows."""
from __future__ import annotations

from typer.core import TyperArgument, TyperCommand, TyperGroup

_VALUE_NAMES = {"int": "N", "integer": "N", "float": "NUMBER", "str": "TEXT", "text": "TEXT", "Path": "PATH",
                "path": "PATH", "list[str]": "TEXT"}


class NamedValuesCommand(TyperCommand):
    """Help that names a value (N, TEXT, PATH) rather than its Python type (<int>, <list[str]>), and
    shows a flag without one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            _name_the_value(param)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _name_the_value(option)
        return option


class NamedValuesGroup(TyperGroup):
    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            _name_the_value(option)
        return option


def _name_the_value(param) -> None:
    if isinstance(param, TyperArgument):
        param.display_type_rich = lambda ctx: None  # the argument's name says it
        return
    is_choice, type_name = _value_type(param)
    if param.metavar is None and not is_choice:  # a choice lists its values
        param.metavar = "" if getattr(param, "is_flag", False) else _VALUE_NAMES.get(type_name, "VALUE")


def _value_type(param) -> tuple[bool, str]:
    """(is the value a choice, its type's name) through whichever parameter API this typer release
    has: recent releases describe types themselves, earlier ones hand click's types through."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is not None:
        return descriptor.is_choice, param.bare_type()
    name = param.type.name  # click's: "integer", "float", "text", "path", "choice", ...
    return name == "choice", name
