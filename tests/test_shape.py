"""The package's shape: layers, no import cycle, small modules, the method registry as the one source of
the CLI's choices, the pipeline schema and the docs' table, and a fast ``--help``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "salora_merge"
MAX_LINES = 400
CORE_FORBIDDEN = ("transformers", "huggingface_hub", "peft", "accelerate", "salora_merge.io", "salora_merge.hf",
                  "safetensors", "click", "yaml")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}


def _imports(path: Path) -> set[str]:
    """Every module this file imports anywhere (top level, inside functions, under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; the package uses absolute imports")
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_module_over_400_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_core_is_pure_math():
    """core/ imports neither files nor third-party model libraries, only torch and itself."""
    core = {name: path for name, path in MODULES.items() if name.startswith("salora_merge.core.")}
    assert len(core) >= 8
    for name, path in core.items():
        bad = sorted(m for m in _imports(path) if m.startswith(CORE_FORBIDDEN)
                     or (m.startswith("salora_merge.") and not m.startswith(("salora_merge.core", "salora_merge.errors"))))
        assert bad == [], f"{name} imports {bad}"


def test_only_the_edges_import_transformers_and_the_hub():
    allowed = {"transformers": ("salora_merge.hf.", "salora_merge.training.trainer"),
               "huggingface_hub": ("salora_merge.hf.", "salora_merge.publishing.")}
    for name, path in MODULES.items():
        for library, edges in allowed.items():
            if any(m == library or m.startswith(library + ".") for m in _imports(path)):
                assert name.startswith(edges), f"{name} imports {library}"


def test_cli_and_registry_import_no_torch():
    """``--help`` stays fast: the CLI loads neither the method registry (realign builds its method options
    when parsed) nor torch; the registry itself loads without torch."""
    code = ("import sys, salora_merge.cli, salora_merge; "
            "assert not [m for m in sys.modules if m.startswith('salora_merge.methods')]; "
            "import salora_merge.methods; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'huggingface_hub')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_realign_help_is_grouped_into_sections():
    from click.testing import CliRunner

    from salora_merge.cli import main

    text = CliRunner().invoke(main, ["realign", "--help"]).output
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["Model", "Adapters", "Safety module", "Calibration", "Method", "Output", "Other"]
    method_part = text[text.index("\nMethod:"):text.index("\nOutput:")]
    for flag in ("--method", "--seed", "--gamma", "--threshold", "--top-k", "--input-safety", "--unaligned"):
        assert flag in method_part
    assert "--rank" not in method_part


def test_registry_drives_the_cli_choices_and_the_docs_table():
    import click

    from salora_merge.cli import main
    from salora_merge.methods import REGISTRY, method_table

    realign = main.commands["realign"]
    params = realign.get_params(click.Context(realign))
    choice = next(p for p in params if p.name == "method")
    assert isinstance(choice.type, click.Choice) and list(choice.type.choices) == list(REGISTRY)
    flags = [o.flag for m in REGISTRY.values() for o in m.options]
    types: dict[str, set] = {}
    for method in REGISTRY.values():
        for o in method.options:
            types.setdefault(o.flag, set()).add(o.type)
    assert all(len(t) == 1 for t in types.values()), "methods sharing an option name must share its type"
    other = {opt for p in params if not p.name.startswith("method_") and p.name != "method" for opt in p.opts}
    assert not set(flags) & other, "a method option would shadow another realign option"
    assert method_table() in (ROOT / "docs" / "usage.md").read_text(), \
        "docs/usage.md's method table is stale: paste salora_merge.methods.method_table() there"


def test_every_method_declares_known_needs_and_checks_its_options():
    from salora_merge.errors import InputError
    from salora_merge.methods import NEEDS, REGISTRY

    required = {"refit": {"task_prompts": "t.txt"}}  # an option without a default
    for method in REGISTRY.values():
        assert set(method.needs) <= set(NEEDS) and method.summary.endswith(".")
        given = required.get(method.name, {})
        assert method.resolve_options(given) == {o.name: given.get(o.name, o.default) for o in method.options}
        with pytest.raises(InputError, match="not an option of --method"):
            method.resolve_options({"no_such_option": 1})
    with pytest.raises(InputError, match="--gamma must be at most 1"):
        REGISTRY["shrink"].resolve_options({"gamma": 1.5})
    with pytest.raises(InputError, match="--gamma: expected a finite number"):
        REGISTRY["shrink"].resolve_options({"gamma": float("nan")})
    assert REGISTRY["random"].resolve_options({"seed": "4"}) == {"seed": 4}
    for bad in (3.5, True, "x"):
        with pytest.raises(InputError, match="--seed: expected int"):
            REGISTRY["random"].resolve_options({"seed": bad})
    with pytest.raises(InputError, match="give --threshold or --top-k, not both"):
        REGISTRY["safelora"].resolve_options({"threshold": 0.3, "top_k": 2})


def test_public_api_is_lazy_and_complete():
    import salora_merge
    from salora_merge import api

    for name in ("open_base", "calibrate", "realign", "merge", "audit", "train", "retrain", "push", "run"):
        assert callable(getattr(salora_merge, name)) and getattr(salora_merge, name) is getattr(api, name)
    assert set(salora_merge.__all__) - {"__version__"} == set(api.__all__)
    with pytest.raises(AttributeError):
        salora_merge.no_such_function  # noqa: B018
