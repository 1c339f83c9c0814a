"""Repair time and peak memory per method, side by side in one run (docs/benchmarks.md).

    python benchmarks/bench_repair.py --base ALIGNED --adapter ADAPTER --unaligned ORIGINAL --safety S \
        [--methods shrink,random,safedelta,resta,refit] [--task-prompts generic-tasks] [--output FILE.md]

Each method runs as the user runs it, `salora-merge realign --method M` in a fresh child process, on the same
inputs; the figures are the child's wall time and the high-water mark of its own resident memory (VmHWM
from /proc at exit; ru_maxrss would carry the parent's peak across fork and exec). The anchors of `refit`
are generated in a first warm-up run (or found in ``--cache``), so the timed run finds them cached, as every
repair after the first on a base model does; the warm-up's time is reported too.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WRAPPER = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') "
    "if l.startswith('VmHWM:')][0], file=sys.stderr, flush=True)); "
    "sys.argv = ['salora-merge', *sys.argv[1:]]; runpy.run_module('salora_merge.cli', run_name='__main__')"
)


def run_once(args: list[str], env: dict) -> tuple[float, float]:
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"salora-merge {' '.join(args)} failed:\n{child.stderr[-2000:]}")
    peak = [line.split()[1] for line in child.stderr.splitlines() if line.startswith("PEAK_KB ")]
    return seconds, int(peak[-1]) / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--unaligned", required=True, help="for resta")
    parser.add_argument("--safety", required=True, help="a safety module with moments (for safedelta and random)")
    parser.add_argument("--methods", default="shrink,random,safedelta,resta,refit")
    parser.add_argument("--task-prompts", default="generic-tasks")
    parser.add_argument("--cache", type=Path, default=None,
                        help="SALORA_MERGE_CACHE holding refit's anchors for this base already (skips the warm-up)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-repair-") as scratch:
        cache = args.cache or Path(scratch) / "cache"
        env = {**os.environ, "SALORA_MERGE_CACHE": str(cache)}
        extra = {"random": ["--safety", args.safety], "safedelta": ["--safety", args.safety],
                 "resta": ["--unaligned", args.unaligned], "refit": ["--task-prompts", args.task_prompts]}
        common = ["realign", "--base", args.base, "--adapter", args.adapter]
        rows = []
        warm = None
        for method in args.methods.split(","):
            cmd = common + ["--method", method, *extra.get(method, [])]
            if method == "refit" and args.cache is None:
                warm = run_once(cmd + ["-o", str(Path(scratch) / "warm")], env)
            seconds, peak = run_once(cmd + ["-o", str(Path(scratch) / method)], env)
            rows.append((method, seconds, peak))
            print(f"{method}: {seconds:.1f} s, peak {peak:,.0f} MB", file=sys.stderr)
    base_seconds, base_peak = rows[0][1], rows[0][2]
    lines = [f"Repair time and peak memory per method, one run, {os.cpu_count()} CPU threads, "
             f"{platform.processor() or platform.machine()}: `python benchmarks/bench_repair.py --base {args.base} "
             f"--adapter {args.adapter} --unaligned {args.unaligned} --safety {args.safety}`", "",
             f"| method | wall time (s) | peak RSS (MB) | time / {rows[0][0]} | peak / {rows[0][0]} |",
             "|---|---|---|---|---|"]
    for method, seconds, peak in rows:
        lines.append(f"| `{method}` | {seconds:.1f} | {peak:,.0f} | {seconds / base_seconds:.1f}x | "
                     f"{peak / base_peak:.1f}x |")
    if warm is not None:
        lines += ["", f"`refit`'s first run on this base, which also generates and caches the anchors: "
                      f"{warm[0]:.1f} s, peak {warm[1]:,.0f} MB."]
    text = "\n".join(lines) + "\n"
    if args.output:
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
