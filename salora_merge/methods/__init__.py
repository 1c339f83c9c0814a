"""The realign and repair methods: one module each, listed in one explicit table.

Adding a method is one module (a :class:`~salora_merge.methods.base.Method` named ``METHOD``) and one
line in ``REGISTRY`` below; the CLI's ``--method`` choices and help, the ``run`` YAML schema and the
docs' method table are made from this table (``docs/design.md``, "How to add a method").
"""

from __future__ import annotations

from salora_merge.errors import InputError
from salora_merge.methods import (
    both_sides,
    input_side,
    random_control,
    refit,
    resta,
    safedelta,
    safelora,
    salora,
    shrink,
)
from salora_merge.methods.base import (
    NEEDS,
    Method,
    MethodContext,
    MethodOption,
    MethodReport,
)

__all__ = ["REGISTRY", "DEFAULT", "get_method", "method_table", "Method", "MethodContext", "MethodOption",
           "MethodReport", "NEEDS"]

REGISTRY: dict[str, Method] = {
    method.name: method
    for method in (
        salora.METHOD,
        input_side.METHOD,
        both_sides.METHOD,
        random_control.METHOD,
        shrink.METHOD,
        safelora.METHOD,
        resta.METHOD,
        safedelta.METHOD,
        refit.METHOD,
    )
}
DEFAULT = "salora"


def get_method(name: str) -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"--method {name!r}: expected one of {', '.join(REGISTRY)}") from None


def method_table() -> str:
    """The docs' method table (markdown), made from the registry."""
    rows = ["| method | what it does | needs | options |", "|---|---|---|---|"]
    for method in REGISTRY.values():
        needs = ", ".join(f"`{n}`" for n in method.needs) or "-"
        if method.optional:
            needs += " (optional: " + ", ".join(f"`{n}`" for n in method.optional) + ")"
        options = ", ".join(f"`{o.flag}` ({o.default!r})" if o.default is not None else f"`{o.flag}`"
                            for o in method.options) or "-"
        rows.append(f"| `{method.name}` | {method.summary} | {needs} | {options} |")
    return "\n".join(rows)
