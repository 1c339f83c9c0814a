"""How a command ends on error: a library error as one line and its exit code; an interrupt; anything else as
one line naming the command (exit code 2), or its traceback under ``salora-merge --debug``."""

from __future__ import annotations

import functools
import sys
from typing import Callable

import click

from salora_merge.errors import SaloraError

__all__ = ["EXIT_USER_ERROR", "EXIT_INTERNAL_ERROR", "EXIT_INTERRUPTED", "_friendly_errors"]

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 2  # an unexpected exception, reported in one line (salora-merge --debug shows the traceback)
EXIT_INTERRUPTED = 130


def _friendly_errors(func: Callable) -> Callable:
    """Turn library errors into one line on stderr and a non-zero exit; never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SaloraError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # the last resort: every case that reaches it is a missing check (a bug)
            context = click.get_current_context(silent=True)
            if context is not None and context.find_root().params.get("debug"):
                raise
            command = context.info_name if context is not None else "salora-merge"
            message = (str(exc).strip().splitlines() or [""])[0][:300]
            click.echo(f"Error: internal error in {command}: {type(exc).__name__}: {message}; "
                       "re-run with salora-merge --debug for the traceback, and please report it", err=True)
            sys.exit(EXIT_INTERNAL_ERROR)

    return wrapper
