"""Plain-text rendering of the merge and training results for the terminal (the realign methods' reports
render themselves: ``report.render()``)."""

from __future__ import annotations

__all__ = ["render_merge", "render_train", "render_retrain"]


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
