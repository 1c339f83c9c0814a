"""The README's set-up and its Python example: two set-up commands, and the example runs as written (slow: the
real built-in model)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _block(after_heading: str, language: str) -> str:
    section = README[README.index(after_heading):]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_the_readme_keeps_two_set_up_commands_and_no_placeholder():
    setup = _block("## Set-up", "bash")
    assert [line.split("#")[0].strip() for line in setup.strip().splitlines()] == ["make demo", "make test"]
    assert not re.search(r"\b(DEMO_TIME|TEST_TIME|SLOW_TIME|DISCOVERY_CONV|TODO|TBD)\b", README)
    for target in ("demo:", "test:", "test-slow:"):
        assert f"\n{target}" in (ROOT / "Makefile").read_text()


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(monkeypatch):
    code = _block("### From Python", "python")
    monkeypatch.chdir(ROOT)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    text = printed.getvalue()
    assert text.startswith("Safety module: ") and "rho: " in text and "Wrote out/readme/merged" in text
    assert "dataclass" not in text and "MergeReport(" not in text and len(text.splitlines()) < 40
    out = ROOT / "out" / "readme"
    realign = json.loads((out / "realigned" / "salora_realign.json").read_text())
    assert realign["total_energy_removed"] > 0 and (out / "merged" / "model.safetensors").is_file()
    assert os.path.getsize(out / "safety.safetensors") > 0
