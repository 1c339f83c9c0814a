"""What the shape issue changed, measured side by side against an older checkout (docs/benchmarks.md).

    python benchmarks/bench_shape.py --before /path/to/older/checkout [--runs 15]

For each checkout (this one, and --before when given), in fresh processes: how many times one realign of
the example adapter on SmolLM2 resolves the base reference and opens its checkpoint index (calibrating on
8 prompts, and with a saved safety module), the sha256 of every output file (the outputs must be
byte-identical), the median wall time of `salora-merge --help`, and the largest modules.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PROBE = r'''
import hashlib, importlib, json, pkgutil, sys
from pathlib import Path
import salora_merge
counts = {"resolve": 0, "open_checkpoint": 0}
modules = []
for info in pkgutil.walk_packages(salora_merge.__path__, "salora_merge."):
    if not info.name.endswith("__main__"):
        modules.append(importlib.import_module(info.name))
checkpoint = importlib.import_module("salora_merge.io.checkpoint")
original_open = checkpoint.open_checkpoint
def counted_open(*a, **k):
    counts["open_checkpoint"] += 1
    return original_open(*a, **k)
resolvers = {}
for mod in modules:
    if getattr(mod, "open_checkpoint", None) is original_open:
        mod.open_checkpoint = counted_open
    fn = getattr(mod, "resolve_model", None)
    if callable(fn):
        original = resolvers.setdefault(id(fn), fn)
        def counted_resolve(ref, _f=original):
            if isinstance(ref, str):  # a handle passed in is not a resolution
                counts["resolve"] += 1
            return _f(ref)
        mod.resolve_model = counted_resolve
from click.testing import CliRunner
from salora_merge.cli import main
out, safety = Path(sys.argv[1]), sys.argv[2]
args = ["realign", "--base", "smollm2-135m-instruct", "--adapter", sys.argv[3], "-o", str(out / "realigned"),
        "--overwrite"]
args += ["--safety", safety] if safety != "-" else ["--max-prompts", "8", "--max-new-tokens", "8", "--device",
                                                     "cpu", "--save-safety", str(out / "s.safetensors")]
result = CliRunner().invoke(main, args)
assert result.exit_code == 0, result.output
digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "realigned").iterdir())}
print(json.dumps({"counts": counts, "sha256": digests}))
'''


def _probe(checkout: Path, out: Path, safety: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), safety,
                           str(HERE / "examples" / "adapters" / "smollm2-benign-lora")],
                          capture_output=True, text=True, env=env, check=True, cwd=checkout)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _help_times(checkouts: dict[str, Path], runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in checkouts}
    for _ in range(runs):  # interleaved, so that both see the same machine load
        for label, checkout in checkouts.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "from salora_merge.cli import main; main(['--help'])"],
                           capture_output=True, env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=checkout)
            times[label].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def _largest(checkout: Path, n: int = 5) -> list[tuple[str, int]]:
    sizes = [(str(p.relative_to(checkout)), len(p.read_text().splitlines()))
             for p in (checkout / "salora_merge").rglob("*.py")]
    return sorted(sizes, key=lambda s: -s[1])[:n]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", type=Path, default=None, help="An older checkout to compare with.")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    checkouts = {"this checkout": HERE}
    if args.before:
        checkouts = {"before": args.before.resolve(), "after": HERE}
    rows, digests = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, checkout in checkouts.items():
            out = Path(tmp) / "out"  # one output path, so the reports (which name it) can be compared
            calibrating = _probe(checkout, out, "-")
            saved = Path(tmp) / f"{len(rows)}.safetensors"
            (out / "s.safetensors").replace(saved)
            with_safety = _probe(checkout, out, str(saved))
            digests[label] = calibrating["sha256"]
            rows.append((label, calibrating["counts"], with_safety["counts"]))
            shutil.rmtree(out)
    help_times = _help_times(checkouts, args.runs)
    lines = ["| checkout | base resolved (calibrating) | checkpoint index opened (calibrating) | "
             "base resolved (--safety) | index opened (--safety) | `salora-merge --help`, median of "
             f"{args.runs} |", "|---|---|---|---|---|---|"]
    for label, cal, saf in rows:
        lines.append(f"| {label} | {cal['resolve']} | {cal['open_checkpoint']} | {saf['resolve']} | "
                     f"{saf['open_checkpoint']} | {help_times[label]:.3f} s |")
    same = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1
    lines.append("")
    lines.append(f"Realign outputs byte-identical across checkouts: {'yes' if same else 'NO'} "
                 f"({', '.join(sorted(next(iter(digests.values()))))}).")
    for label, checkout in checkouts.items():
        lines.append(f"Largest modules ({label}): " + ", ".join(f"`{n}` {k}" for n, k in _largest(checkout)) + ".")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
