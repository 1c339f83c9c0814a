"""Plain-text rendering of results for the terminal."""

from __future__ import annotations

from collections import defaultdict

from salora_merge.realignment.run import REPORT_NAME, RealignReport

__all__ = ["render_realign", "render_merge", "render_train", "render_retrain", "render_safelora"]


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
        "",
        "Note: this is a constraint on the weights, not a measured safety guarantee. In the safety study "
        "(docs/safety-study.md) it restored no more refusals than a random subspace of the same size; "
        "measure refusals with `salora-merge audit --behavior` before deployment.",
    ]
    return "\n".join(lines)


def render_merge(report) -> str:
    """What was merged, how, and where the checkpoint is."""
    lines = [f"Merged {len(report.adapters)} adapter(s) into {report.base_model}:"]
    for a in report.adapters:
        lines.append(f"  {a['ref']}  weight {a['weight']:g}, {a['modules']} LoRA modules"
                     + (f", modules_to_save {', '.join(a['modules_to_save'])}" if a["modules_to_save"] else ""))
    if report.realign:
        for r in report.realign:
            lines.append(f"  realigned {r['adapter']}: {r['total_energy_removed']:.4f} of its update energy removed "
                         f"(r_s = {r['rank']}, {r['side']} side)")
    else:
        for a in report.adapters:
            prior = a.get("realigned_before")
            if prior:
                lines.append(f"  {a['ref']} was realigned before (salora_realign.json): "
                             f"{prior['total_energy_removed']:.4f} of its update energy removed")
        if not any(a.get("realigned_before") for a in report.adapters):
            lines.append("  not realigned")
    if report.untied:
        lines.append(f"  untied {report.untied[0]} from the input embedding (tie_word_embeddings: false)")
    size = sum(s["size"] for s in report.shards)
    lines += [
        f"{report.changed_tensors} tensors changed; dtype {report.dtype}; {len(report.shards)} shard(s), "
        f"{size / 1e6:.1f} MB in {report.seconds:.1f}s",
        f"Wrote {report.output} (model card README.md, provenance salora_config.yml)",
    ]
    return "\n".join(lines)


def render_train(report) -> str:
    """Summary of a SaLoRA training run (``TrainReport``)."""
    first = report.losses[0][1] if report.losses else float("nan")
    last = report.losses[-1][1] if report.losses else float("nan")
    lines = [
        f"Trained {report.modules} SaLoRA modules on {report.base_model} ({report.init} init, r = {report.rank}, "
        f"alpha = {report.alpha:g}{', rsLoRA' if report.use_rslora else ''}; r_s = {report.safety_rank})",
        f"Data: {report.data}: {report.examples} examples, {report.learned_tokens} learned tokens",
        f"Steps: {report.global_step}{' (resumed from ' + report.resumed_from + ')' if report.resumed_from else ''}; "
        f"logged loss {first:.4f} -> {last:.4f}; init {report.seconds_init:.1f}s, training {report.seconds_train:.1f}s",
        f"Exported as a PEFT LoRA of rank {report.export_rank} (lora_alpha {report.export_alpha:g}); "
        f"update energy inside the safety subspace: {report.safety_energy:.2e}",
        f"Wrote {report.output}" + (f"; merged model: {report.merged}" if report.merged else ""),
    ]
    return "\n".join(lines)


def render_retrain(report, output) -> str:
    """Comparison of the retrained adapter with the original (``RetrainReport``)."""
    exact = f"; identical greedy answers {report.exact_match:.3f}" if report.exact_match is not None else ""
    lines = [
        f"Retrained {report.adapter} ({report.source}: {report.train_examples} training, "
        f"{report.heldout_examples} held-out examples)",
        f"{'held-out':<22}{'base':>10}{'original':>10}{'retrained':>11}",
        f"{'NLL / target token':<22}{report.nll['base']:>10.4f}{report.nll['original']:>10.4f}"
        f"{report.nll['retrained']:>11.4f}",
        f"{'target accuracy':<22}{report.target_accuracy['base']:>10.4f}{report.target_accuracy['original']:>10.4f}"
        f"{report.target_accuracy['retrained']:>11.4f}",
        f"Argmax agreement original vs retrained: {report.agreement:.4f}{exact}",
        f"Safety-subspace energy share: original {report.weight_space['original']:.4f}, retrained "
        f"{report.weight_space['retrained']:.2e} (random reference {report.weight_space['random_reference']:.4f})",
        f"Wrote {output}",
    ]
    return "\n".join(lines)


def render_safelora(report) -> str:
    """Summary of a Safe LoRA run (``SafeLoraReport``)."""
    rule = f"cosine <= {report.threshold}" if report.threshold is not None else f"{report.top_k} lowest cosines"
    lines = [f"Safe LoRA on {report.adapter}: projected {report.projected} of {len(report.modules)} modules "
             f"({rule}; V = {report.aligned} - {report.unaligned})", "",
             f"{'module':<48}{'cosine':>9}{'projected':>11}{'norm before':>13}{'after':>10}"]
    for m in sorted(report.modules, key=lambda m: m.cosine)[:10]:
        lines.append(f"{m.module:<48}{m.cosine:>9.4f}{'yes' if m.projected else 'no':>11}"
                     f"{m.update_norm:>13.4g}{m.norm_after:>10.4g}")
    lines += ["", f"Wrote {report.output}"]
    return "\n".join(lines)
