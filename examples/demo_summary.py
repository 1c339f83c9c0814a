"""The end of ``make demo``: one table of what the audit and the repair measured, where each output is, and what
to run next.

    python examples/demo_summary.py out/demo

reads ``out/demo/audit.json`` (``salora-merge audit --format json``) and ``out/demo/repaired/salora_repair.json``
(``salora-merge repair``), writes the audit as HTML beside its JSON, and prints the summary. tests/test_demo.py
checks :func:`summary` on reports made on a tiny model.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from salora_merge.auditing.render import render
from salora_merge.core.stats import rate_with_interval
from salora_merge.repairing.report import REPORT_NAME, RepairReport

_RATES = (("harmful_refusal_rate", "harmful"), ("benign_refusal_rate", "benign"),
          ("overrefusal_rate", "overrefusal"))


def _repair_report(data: dict) -> RepairReport:
    names = {f.name for f in dataclasses.fields(RepairReport)}
    return RepairReport(**{k: v for k, v in data.items() if k in names})


def _row(label: str, result: dict | None, task: str) -> str:
    if result is None:
        return f"| {label} | - | - | - | {task} |"
    n = result["n"]
    cells = [rate_with_interval(result[key], n[set_name]) for key, set_name in _RATES]
    return f"| {label} | " + " | ".join(cells) + f" | {task} |"


def summary(audit: dict, repair: dict, out: Path) -> str:
    """The demo's closing text: the numbers of the base, the eroding adapter, the adapter realigned by projection
    (the audit's) and the repaired adapter, on the same held-out prompts; the audit's status; the repair's
    verdict; the outputs; the next commands."""
    report = _repair_report(repair)
    b, check = report.behavior, report.task_check
    entry = audit["adapters"][0]
    realigned = (entry.get("behavior") or {}).get("realigned")
    task = (lambda v: f"{check[v]:.0%}") if check else (lambda v: "-")  # noqa: E731
    n = b["base"]["n"]
    sets = report.eval_sets
    lines = [
        "Summary (every rate measured in this run; 95% Wilson intervals in brackets)", "",
        f"| model | harmful refusal ({sets['harmful']}, {n['harmful']}) | benign refusal ({n['benign']}) | "
        f"over-refusal ({n['overrefusal']}) | task: exact answers ({check['prompts'] if check else 0}) |",
        "|---|---|---|---|---|",
        _row("aligned base", b["base"], task("base")),
        _row("+ the eroding adapter", b["adapter"], task("adapter")),
        _row("+ the adapter realigned by projection (audit)",
             realigned if realigned and realigned["n"] == b["base"]["n"] else None, "-"),
        _row("+ the repaired adapter", b["repaired"], task("repaired")),
        "",
    ]
    ws = entry.get("weight_space") or {}
    reasons = "; ".join(entry.get("reasons") or []) or "no reason"
    lines.append(f"Audit: {entry['status']} ({reasons}); rho {ws.get('rho', float('nan')):.3f} (random subspace "
                 f"{ws.get('random_reference', float('nan')):.3f}): the share of the update in the safety subspace, "
                 "which on its own says nothing about refusals.")
    for warning in entry.get("warnings") or []:
        lines.append(f"Audit warning: {warning}")
    lines.append(report.verdict())
    lines.append(f"Repair took {report.seconds_method:.0f} s (evaluation {report.seconds_eval:.0f} s).")
    out = Path(out)
    lines += ["", "Outputs:",
              f"  {out / 'audit.json'} and {out / 'audit.html'}  the audit report",
              f"  {out / 'repaired'}  the repaired adapter (stock PEFT), its card and {REPORT_NAME}",
              f"  {out / 'merged'}  the aligned model with the repaired adapter merged in (transformers loads it)",
              "", "Next:",
              "  salora-merge audit --base smollm2-135m-aligned --adapter YOUR_LORA --behavior   # your own adapter",
              f"  salora-merge push {out / 'merged'} --repo-id YOU/NAME   # publish (a token from HF_TOKEN)",
              "  docs/repair-study.md   what repair was measured to do across models, adapters and seeds"]
    return "\n".join(lines)


def main(folder: Path) -> None:
    audit = json.loads((folder / "audit.json").read_text())
    repair = json.loads((folder / "repaired" / REPORT_NAME).read_text())
    (folder / "audit.html").write_text(render(audit, "html"), encoding="utf-8")
    print(summary(audit, repair, folder))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo"))
