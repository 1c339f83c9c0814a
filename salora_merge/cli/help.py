"""``--help`` in sections (model, calibration, method, output, ...), as mergekit groups its options."""

from __future__ import annotations

from typing import Any, Callable

import click

__all__ = ["SectionedCommand", "option", "apply_options", "SECTION_ORDER"]

SECTION_ORDER = ("Model", "Adapters", "Safety module", "Calibration", "Method", "Merge", "Audit", "Behaviour",
                 "Data", "Training", "Run", "Hub", "Output")


class SectionedOption(click.Option):
    def __init__(self, *args: Any, section: str = "Other", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.section = section


class SectionedCommand(click.Command):
    """Lists options under their section's heading, in ``SECTION_ORDER``; ``--help`` last.

    ``lazy_params`` builds more options when the command is first parsed or its help shown, not when the
    CLI is imported (realign's ``--method`` options come from the method registry; ``salora-merge --help``
    does not load it). They go before the first option of their own section.
    """

    def __init__(self, *args: Any, lazy_params: Callable[[], list[click.Parameter]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy_params = lazy_params

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._lazy_params is not None:
            extra, self._lazy_params = self._lazy_params(), None
            section = getattr(extra[0], "section", None) if extra else None
            at = next((i for i, p in enumerate(self.params) if getattr(p, "section", None) == section),
                      len(self.params))
            self.params[at:at] = extra
        return super().get_params(ctx)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "section", "Other"), []).append(record)
        order = [s for s in SECTION_ORDER if s in sections] + sorted(set(sections) - set(SECTION_ORDER) - {"Other"})
        for name in order + (["Other"] if "Other" in sections else []):
            with formatter.section(name):
                formatter.write_dl(sections[name])


def option(section: str, *decls: str, **kwargs: Any) -> Callable[[Callable], Callable]:
    """``click.option`` that belongs to a help section."""
    return click.option(*decls, cls=SectionedOption, section=section, **kwargs)


def apply_options(func: Callable, options: list[Callable[[Callable], Callable]]) -> Callable:
    for decorate in reversed(options):
        func = decorate(func)
    return func
