"""Plain-text rendering of results for the terminal."""

from __future__ import annotations

from collections import defaultdict

from .realign import REPORT_NAME, RealignReport

__all__ = ["render_realign"]


def render_realign(report: RealignReport, top: int = 5) -> str:
    """Per-module-kind summary, the modules that lost most, totals, and where the output is."""
    by_kind: dict[str, list] = defaultdict(list)
    for m in report.modules:
        by_kind[m.module.rsplit(".", 1)[-1]].append(m)
    lines = [
        f"Realigned {len(report.modules)} modules of {report.adapter} against {report.base_model} "
        f"({report.side} side, r_s = {report.rank}; safety module: {report.safety})",
        "",
        f"{'module kind':<16}{'count':>6}{'mean removed':>14}{'max removed':>13}{'random ref':>12}",
    ]
    for kind in sorted(by_kind):
        ms = by_kind[kind]
        mean = sum(m.energy_removed for m in ms) / len(ms)
        lines.append(
            f"{kind:<16}{len(ms):>6}{mean:>14.4f}{max(m.energy_removed for m in ms):>13.4f}"
            f"{ms[0].random_reference:>12.4f}"
        )
    lines.append("")
    lines.append("Largest shares removed:")
    for m in sorted(report.modules, key=lambda m: m.energy_removed, reverse=True)[:top]:
        lines.append(f"  {m.module:<48} {m.energy_removed:.4f}")
    lines += [
        "",
        f"Energy of the whole update removed: {report.total_energy_removed:.4f}",
        f"Wrote {report.output} (per-module figures in {REPORT_NAME})",
    ]
    return "\n".join(lines)
