"""The command line: click commands that parse options, call one function of the public API
(:mod:`salora_merge.api`) and render its result. No tensor code, and nothing heavy imported before a
command runs (``salora-merge --help`` stays fast)."""

from salora_merge.cli.commands import main

__all__ = ["main"]
