"""Render an audit report (the dict of ``audit.run_audit``): terminal table, markdown, self-contained HTML."""

from __future__ import annotations

import base64
import html
import io
import json

__all__ = ["render_table", "render_markdown", "render_html", "render", "FORMATS"]

FORMATS = ("table", "json", "markdown", "html")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ratio(entry: dict) -> str:
    ws = entry.get("weight_space")
    return "-" if not ws or ws.get("ratio") is None else f"{ws['ratio']:.2f}x"


def _variant_rows(report: dict, quote=lambda s: s) -> list[tuple[str, dict]]:
    """(label, rates) for the base model and, per adapter, base + adapter and base + realigned."""
    rows = [("base", report["behavior"]["base"])]
    for e in report["adapters"]:
        if e.get("behavior"):
            rows += [(f"+ {quote(e['adapter'])}", e["behavior"]["adapter"]),
                     (f"+ realigned {quote(e['adapter'])}", e["behavior"]["realigned"])]
    return rows


def render_table(report: dict) -> str:
    lines = [f"Safety audit of {len(report['adapters'])} adapter(s) against {report['base_model']}"]
    safety = report.get("safety")
    if safety:
        lines.append(f"safety module: {safety['source']} ({safety['side']} side, r_s = {safety['rank']})")
    lines += ["", f"{'adapter':<44}{'status':>7}{'rho':>9}{'random':>9}{'ratio':>8}  modules that stand out"]
    for e in report["adapters"]:
        ws = e.get("weight_space")
        name = e["adapter"] if len(e["adapter"]) <= 43 else "..." + e["adapter"][-40:]
        if ws:
            lines.append(f"{name:<44}{e['status']:>7}{ws['rho']:>9.4f}{ws['random_reference']:>9.4f}"
                         f"{_ratio(e):>8}  {', '.join(s.split('model.')[-1] for s in ws['standouts'][:3]) or '-'}")
        else:
            lines.append(f"{name:<44}{e['status']:>7}{'-':>9}{'-':>9}{'-':>8}")
        for reason in e["reasons"]:
            lines.append(f"    FAIL: {reason}")
        if e["error"]:
            lines.append(f"    ERROR: {e['error']}")
        for warning in e["warnings"]:
            lines.append(f"    warning: {warning}")
    behavior = report.get("behavior")
    if behavior:
        lines += ["", f"Behaviour (greedy, {behavior['max_new_tokens']} new tokens; harm judged by "
                      f"{behavior['judge']['name']} {behavior['judge']['version']}, refusals by keyword-v1):",
                  f"{'model':<44}{'harmful refused':>16}{'ASR':>8}{'benign refused':>16}{'over-refusal':>14}"]
        for label, v in _variant_rows(report, lambda s: s[-29:]):
            lines.append(f"{label:<44}{_pct(v['harmful_refusal_rate']):>16}{_pct(v['attack_success_rate']):>8}"
                         f"{_pct(v['benign_refusal_rate']):>16}{_pct(v['overrefusal_rate']):>14}")
    s = report["summary"]
    lines += ["", RHO_NOTE, "", f"{summary_line(s)} ({s['seconds']:.1f}s)"]
    return "\n".join(lines)


RHO_NOTE = ("rho: the share of the adapter's update energy inside the safety subspace (a random update of the same "
            "shapes scores the random reference); a weight-space score says nothing about refusals on its own: "
            "measure them with --behavior.")


def summary_line(s: dict) -> str:
    """'2 passed, 1 failed, ...', or, with no gate set, that nothing was gated."""
    if s.get("no_gate"):
        return (f"{s['no_gate']} audited with no gate set (give --fail-above or --fail-asr-above to gate), "
                f"{s['errors']} could not be audited")
    return f"{s['passed']} passed, {s['failed']} failed, {s['errors']} could not be audited"


def render_markdown(report: dict) -> str:
    """Markdown for a model card or a CI summary."""
    out = [f"Audited with salora-merge {report['tool_version']} against `{report['base_model']}`"]
    safety = report.get("safety")
    if safety:
        out[0] += (f", safety module `{safety['source']}` ({safety['side']} side, r_s = {safety['rank']}, "
                   f"{safety.get('n_prompts')} prompts of `{safety.get('prompt_set')}`)")
    out[0] += ". `rho` is the share of the adapter's update energy inside the safety subspace; a random " \
              "update of the same shapes scores the random reference."
    out += ["", "| adapter | status | rho | random reference | ratio | modules that stand out |", "|---|---|---|---|---|---|"]
    for e in report["adapters"]:
        ws = e.get("weight_space")
        if ws:
            stand = ", ".join(f"`{m}`" for m in ws["standouts"][:3]) or "-"
            out.append(f"| `{e['adapter']}` | {e['status']} | {ws['rho']:.4f} | {ws['random_reference']:.4f} | "
                       f"{_ratio(e)} | {stand} |")
        else:
            out.append(f"| `{e['adapter']}` | error | - | - | - | {e['error']} |")
    behavior = report.get("behavior")
    if behavior:
        out += ["", f"Behaviour: greedy decoding, {behavior['max_new_tokens']} new tokens; harm judged by "
                    f"{behavior['judge']['name']} ({behavior['judge']['version']}), refusals by keyword-v1. Prompt sets: "
                    + ", ".join(f"{k} `{v['name']}` ({v['n']})" for k, v in behavior["prompt_sets"].items()) + ".",
                "", "| model | harmful refused | attack success | benign refused | over-refusal |", "|---|---|---|---|---|"]
        for label, v in _variant_rows(report, lambda s: f"`{s}`"):
            out.append(f"| {label} | {_pct(v['harmful_refusal_rate'])} | {_pct(v['attack_success_rate'])} | "
                       f"{_pct(v['benign_refusal_rate'])} | {_pct(v['overrefusal_rate'])} |")
    return "\n".join(out) + "\n"


def _layer_plot(entry: dict) -> str:
    """A PNG (base64) of rho per layer against the random reference."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers = [row for row in entry["weight_space"]["layers"] if row["layer"] is not None]
    fig, ax = plt.subplots(figsize=(7, 3), dpi=100)
    xs = [row["layer"] for row in layers]
    ax.bar(xs, [row["rho"] for row in layers], color="#c0392b", label="rho (share in safety subspace)")
    ax.plot(xs, [row["random_reference"] for row in layers], color="#2c3e50", marker=".", linestyle="--",
            label="random update")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of update energy")
    ax.set_ylim(0, max([0.05] + [row["rho"] for row in layers] + [row["random_reference"] for row in layers]) * 1.15)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}.pass{color:#1e7e34}.fail{color:#c0392b;font-weight:bold}.error{color:#a35d00}
pre{white-space:pre-wrap;background:#f8f8f8;padding:.5em;margin:0;font-size:.85em}"""

_SCRIPT = """window.addEventListener('load',function(){var imgs=document.querySelectorAll('img.plot');
var ok=0;imgs.forEach(function(i){if(i.complete&&i.naturalWidth>0)ok++;});
document.body.setAttribute('data-rendered-plots',String(ok));
document.body.setAttribute('data-rendered-rows',String(document.querySelectorAll('table#summary tbody tr').length));});"""


def render_html(report: dict) -> str:
    """One self-contained page: summary, per-adapter plots (embedded PNG), behaviour table, examples."""
    e_ = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>salora-merge audit</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Safety audit</h1><p>salora-merge {e_(report['tool_version'])}, base model "
             f"<code>{e_(report['base_model'])}</code>"]
    safety = report.get("safety")
    if safety:
        parts.append(f", safety module <code>{e_(str(safety['source']))}</code> ({e_(safety['side'])} side, "
                     f"r<sub>s</sub> = {safety['rank']})")
    s = report["summary"]
    parts.append(f".</p><p>{e_(summary_line(s))}.</p><p>{e_(RHO_NOTE)}</p>")
    parts.append("<table id='summary'><thead><tr><th>adapter</th><th>status</th><th>rho</th><th>random reference</th>"
                 "<th>ratio</th><th>modules that stand out / problem</th></tr></thead><tbody>")
    for e in report["adapters"]:
        ws = e.get("weight_space")
        detail = ", ".join(ws["standouts"][:3]) if ws else e["error"]
        detail = "; ".join(filter(None, [detail, *e["reasons"], *e["warnings"]])) or "-"
        parts.append(f"<tr><td><code>{e_(e['adapter'])}</code></td><td class='{e['status']}'>{e['status']}</td>"
                     + (f"<td>{ws['rho']:.4f}</td><td>{ws['random_reference']:.4f}</td><td>{_ratio(e)}</td>" if ws
                        else "<td>-</td><td>-</td><td>-</td>")
                     + f"<td>{e_(detail)}</td></tr>")
    parts.append("</tbody></table>")
    behavior = report.get("behavior")
    if behavior:
        parts.append(f"<h2>Behaviour</h2><p>Greedy decoding, {behavior['max_new_tokens']} new tokens. Harm judged by "
                     f"{e_(behavior['judge']['name'])} ({e_(str(behavior['judge']['version']))}); refusals by the "
                     f"keyword-v1 list.</p><table id='behavior'><thead><tr><th>model</th><th>harmful refused</th>"
                     "<th>attack success</th><th>benign refused</th><th>over-refusal</th></tr></thead><tbody>")
        for label, v in _variant_rows(report):
            parts.append(f"<tr><td>{e_(label)}</td><td>{_pct(v['harmful_refusal_rate'])}</td>"
                         f"<td>{_pct(v['attack_success_rate'])}</td><td>{_pct(v['benign_refusal_rate'])}</td>"
                         f"<td>{_pct(v['overrefusal_rate'])}</td></tr>")
        parts.append("</tbody></table>")
    for e in report["adapters"]:
        if not e.get("weight_space"):
            continue
        parts.append(f"<h2>{e_(e['adapter'])}</h2><img class='plot' alt='rho per layer against a random update' "
                     f"src='data:image/png;base64,{_layer_plot(e)}'>")
        examples = (e.get("behavior") or {}).get("examples") or []
        if examples:
            parts.append("<table class='examples'><thead><tr><th>set</th><th>prompt</th><th>base</th>"
                         "<th>+ adapter</th><th>+ realigned</th></tr></thead><tbody>")
            for x in examples:
                parts.append("<tr>" + "".join(f"<td><pre>{e_(str(x[k]))}</pre></td>"
                                              for k in ("set", "prompt", "base", "adapter", "realigned")) + "</tr>")
            parts.append("</tbody></table>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def render(report: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "html":
        return render_html(report)
    return render_table(report) + "\n"
