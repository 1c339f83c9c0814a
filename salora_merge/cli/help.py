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
    """Lists options under their section's heading, in ``SECTION_ORDER``; ``--help`` last."""

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
