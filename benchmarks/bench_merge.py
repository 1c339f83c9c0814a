"""Merge benchmark: salora-merge's out-of-core merge against PEFT merge_and_unload + save_pretrained, and
against simply reading and writing the same shards, side by side in one run. Results -> docs/merge-benchmark.md.

Two inputs:
1. The real SmolLM2-135M-Instruct (the built-in alias; one float32 shard of 538 MB) with the shipped
   example adapter.
2. A synthetic Llama-shaped bfloat16 checkpoint (default about 4.8 GB: hidden 2560, 28 layers, vocab 32000,
   untied embeddings) written by this script in 1 GB shards, with a random LoRA adapter of rank 16 on
   all seven projections.

With mergekit 0.1.5 in its own environment (`make mergekit-venv`, or `--mergekit PATH` to a mergekit-yaml),
mergekit merges the same LoRA too (a passthrough config of `base+lora`), and every output is checked against
the float64 merge and PEFT's unmerged model's logits.

Every measurement runs in a fresh subprocess that reports its own wall time and peak RSS (ru_maxrss).
The input shards are read once before timing so that every contender starts from a warm page cache.

    .venv/bin/python benchmarks/bench_merge.py [--layers 28] [--hidden 2560] [--shard-size 1GB] [--keep]
        [--mergekit out/mergekit-venv/bin/mergekit-yaml] [--no-logits]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "adapters" / "smollm2-benign-lora"
MERGEKIT = ROOT / "out" / "mergekit-venv" / "bin" / "mergekit-yaml"
MERGEKIT_SHOWN = "out/mergekit-venv/bin/mergekit-yaml"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- children: one measurement each --------------------------------------------------------------
def _peak_rss_mib() -> float:
    """VmHWM: this process's own peak resident set (ru_maxrss would include the parent's at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _report(extra: dict) -> None:
    print(json.dumps({**extra, "peak_rss_mib": _peak_rss_mib()}))


def child_ours(base: str, adapter: str, out: str, shard_size: str) -> None:
    from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge

    started = time.perf_counter()
    run_merge(base, [AdapterInput(adapter)], Path(out), MergeOptions(shard_size=shard_size))
    _report({"seconds": time.perf_counter() - started})


def child_peft(base: str, adapter: str, out: str, shard_size: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from salora_merge.hf.resolve import resolve_model

    logging.set_verbosity_error()
    started = time.perf_counter()
    folder = resolve_model(base).folder
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto")
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard_size)
    _report({"seconds": time.perf_counter() - started})


def child_mergekit(mergekit_yaml: str, base: str, adapter: str, out: str, shard_params: str) -> None:
    """mergekit 0.1.5 from its own environment: a passthrough merge of the one model ``base+adapter``
    (mergekit merges the LoRA with PEFT into its LoRA cache, then writes the passthrough output). The
    peak RSS is mergekit's own process (RUSAGE_CHILDREN: the largest waited-for child)."""
    from salora_merge.hf.resolve import resolve_model

    folder = resolve_model(base).folder
    dtype = json.loads((folder / "config.json").read_text()).get("torch_dtype") or \
        json.loads((folder / "config.json").read_text()).get("dtype") or "float32"
    work = Path(out).parent / (Path(out).name + "-mergekit-work")
    work.mkdir(parents=True)
    config = work / "merge.yaml"
    config.write_text(f"merge_method: passthrough\nmodels:\n  - model: {folder}+{adapter}\ndtype: {dtype}\n")
    started = time.perf_counter()
    result = subprocess.run(
        [mergekit_yaml, str(config), out, "--lora-merge-cache", str(work / "lora-cache"), "--out-shard-size",
         shard_params, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed:\n{result.stderr[-3000:]}")
    cache_bytes = sum(f.stat().st_size for f in (work / "lora-cache").rglob("*") if f.is_file())
    shutil.rmtree(work)
    print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "dtype": dtype, "lora_cache_bytes": cache_bytes}))


def child_plain(base: str, out: str) -> None:
    """The floor: read every shard whole and write it back (safetensors load_file/save_file)."""
    from safetensors.torch import load_file, save_file

    from salora_merge.hf.resolve import resolve_model

    started = time.perf_counter()
    folder = resolve_model(base).folder
    Path(out).mkdir(parents=True)
    for shard in sorted(folder.glob("model*.safetensors")):
        save_file(load_file(str(shard)), str(Path(out) / shard.name), metadata={"format": "pt"})
        # load_file maps the file; free each shard before the next, as a careful copier would
    _report({"seconds": time.perf_counter() - started})


# -- inputs --------------------------------------------------------------------------------------
def make_synthetic(folder: Path, hidden: int, layers: int, vocab: int, shard_size: str) -> None:
    """A Llama-shaped bfloat16 checkpoint written shard by shard (never whole in memory), and a config."""
    from salora_merge.io.stream import ShardWriter
    from salora_merge.core.merge_math import parse_size

    inter, kv = int(hidden * 2.7) // 256 * 256, hidden // 4
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)), (f"{p}.self_attn.k_proj.weight", (kv, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv, hidden)), (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)), (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    budget = parse_size(shard_size)
    groups, used = [[]], 0
    for name, shape in shapes:
        size = 2 * int(torch.tensor(shape).prod())
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append((name, shape))
        used += size
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        writer = ShardWriter(folder / file, [(n, "BF16", s) for n, s in group], {"format": "pt"})
        for name, shape in group:
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            writer.write(name, tensor)
            weight_map[name] = file
            total += tensor.numel() * 2
        writer.close()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
        "num_key_value_heads": kv // 128, "head_dim": 128, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "dtype": "bfloat16",
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_adapter(folder: Path, base: Path, rank: int = 16) -> None:
    """A PEFT LoRA adapter (rank 16, all projections) with random non-zero factors, from the headers."""
    from safetensors.torch import save_file

    from salora_merge.io.checkpoint import open_checkpoint

    shapes = open_checkpoint(base).linear_weight_shapes()
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (d_out, d_in) in shapes.items():
        if module.rsplit(".", 1)[-1] in PROJECTIONS:
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator) / d_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator) * 1e-3
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": PROJECTIONS, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "inference_mode": True, "base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


# -- driver --------------------------------------------------------------------------------------
def _run(args: list[str]) -> dict:
    """One measurement in a fresh process; ``seconds`` is the whole process (start-up and imports
    included, as a user waits for it), ``work_seconds`` the timed part inside it."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    record["work_seconds"] = record.pop("seconds")
    record["seconds"] = elapsed
    return record


def _warm(folder: Path) -> None:
    for shard in folder.glob("*.safetensors"):
        with shard.open("rb") as handle:
            while handle.read(1 << 24):
                pass


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _compare(ours: Path, other: Path) -> float:
    """Largest absolute difference between our merged weights and another output's (every tensor)."""
    from salora_merge.io.checkpoint import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(other)
    if set(a.files) != set(b.files):
        raise SystemExit(f"{other.name} wrote other tensors: only ours {sorted(set(a.files) - set(b.files))[:5]}, "
                         f"only {other.name} {sorted(set(b.files) - set(a.files))[:5]}")
    worst = 0.0
    for name in a.files:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        worst = max(worst, float((x.float() - y.float()).abs().max()))
    return worst


def _reference_errors(base_folder: Path, adapter: Path, outputs: dict[str, Path]) -> dict:
    """Who is right: every merged weight of each output against W + scale * B @ A in float64 (PEFT's
    LoRA formula, computed densely), as the largest absolute error and the number of elements that
    differ from the float64 result rounded once to the output dtype (the best any merge can write)."""
    from safetensors.torch import load_file

    from salora_merge.io.checkpoint import open_checkpoint

    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    base = open_checkpoint(base_folder)
    opened = {name: open_checkpoint(folder) for name, folder in outputs.items()}
    errors = {name: {"max_abs_error": 0.0, "not_nearest": 0, "merged_tensors": 0} for name in outputs}
    for key in factors:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        a, b = factors[key].double(), factors[key.replace("lora_A", "lora_B")].double()
        weight = base.read(module + ".weight")
        exact = weight.double() + scale * (b @ a)
        nearest = exact.to(weight.dtype)
        for name, checkpoint in opened.items():
            merged = checkpoint.read(module + ".weight")
            record = errors[name]
            record["max_abs_error"] = max(record["max_abs_error"], float((merged.double() - exact).abs().max()))
            record["not_nearest"] += int((merged != nearest).sum())
            record["merged_tensors"] += 1
    return errors


def _logit_errors(base: str, adapter: Path, outputs: dict[str, Path]) -> dict:
    """Against PEFT's unmerged model (the base in float32 with the adapter applied on the fly): the
    largest absolute difference of each merged model's logits (loaded in float32) on two prompts."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from salora_merge.hf.resolve import resolve_model

    logging.set_verbosity_error()
    generator = torch.Generator().manual_seed(2)
    folder = resolve_model(base).folder
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = torch.randint(3, min(vocab, 30000), (2, 24), generator=generator)
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        reference = PeftModel.from_pretrained(model, str(adapter)).eval()(ids).logits
        del model
        errors = {}
        for name, out in outputs.items():
            merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            errors[name] = float((merged(ids).logits - reference).abs().max())
            del merged
    errors["logit_scale"] = float(reference.abs().max())
    return errors


def bench(label: str, base: str, base_folder: Path, adapter: Path, work: Path, shard_size: str,
          mergekit: str | None = None, logits: bool = False) -> dict:
    _warm(base_folder)
    largest = max(p.stat().st_size for p in base_folder.glob("*.safetensors"))
    adapter_size = (adapter / "adapter_model.safetensors").stat().st_size
    results = {"label": label, "input_bytes": _dir_size(base_folder), "largest_shard": largest,
               "adapter_bytes": adapter_size, "shards": len(list(base_folder.glob("*.safetensors")))}
    for name, args in (("plain", ["_child", "plain", base, str(work / "plain")]),
                       ("ours", ["_child", "ours", base, str(adapter), str(work / "ours"), shard_size]),
                       ("peft", ["_child", "peft", base, str(adapter), str(work / "peft"), shard_size])):
        results[name] = _run(args)
        print(f"{label} {name}: {results[name]}", flush=True)
        if name == "plain":
            shutil.rmtree(work / "plain")
    results["max_abs_diff_vs_peft"] = _compare(work / "ours", work / "peft")
    outputs = {"ours": work / "ours", "peft": work / "peft"}
    if mergekit:
        from salora_merge.core.merge_math import parse_size

        params = str(parse_size(shard_size) // (2 if "bfloat16" in label else 4))
        results["mergekit"] = _run(["_child", "mergekit", mergekit, base, str(adapter), str(work / "mergekit"), params])
        # mergekit's wall time is its own process's (start-up and imports included), like the others'
        results["mergekit"]["seconds"] = results["mergekit"]["work_seconds"]
        print(f"{label} mergekit: {results['mergekit']}", flush=True)
        results["max_abs_diff_mergekit_vs_ours"] = _compare(work / "ours", work / "mergekit")
        outputs["mergekit"] = work / "mergekit"
    results["reference"] = _reference_errors(base_folder, adapter, outputs)
    if logits:
        results["logits"] = _logit_errors(base, adapter, outputs)
    print(f"{label} checks: {results['reference']} {results.get('logits')}", flush=True)
    for folder in outputs.values():
        shutil.rmtree(folder)
    return results


CONTENDERS = (("ours", "salora-merge"), ("peft", "PEFT"), ("mergekit", "mergekit 0.1.5"),
              ("plain", "plain read+write"))


def _checks_section(rows: list[dict]) -> list[str]:
    """Where the outputs differ and who is right: each against the float64 merge and PEFT's unmerged model."""
    lines = ["## Who is right", "",
             "Every merged weight of each output against `W + (alpha/r) * B @ A` computed in float64 (\"max error\"),",
             "and the number of elements that differ from that float64 result rounded once to the checkpoint's",
             "dtype (the best any merge can write); then the largest difference of each merged model's logits",
             "(loaded in float32) from PEFT's unmerged model (the base in float32, the adapter applied on the fly)",
             "on two random 24-token inputs.", "",
             "| input | contender | max error vs float64 | elements not nearest | logits vs PEFT unmerged |",
             "|---|---|---|---|---|"]
    for r in rows:
        for name, title in CONTENDERS:
            if name not in r.get("reference", {}):
                continue
            ref = r["reference"][name]
            logit = r.get("logits", {}).get(name)
            lines.append(f"| {r['label']} | {title} | {ref['max_abs_error']:.3g} | {ref['not_nearest']} | "
                         f"{'not run' if logit is None else f'{logit:.3g}'} |")
    lines.append("")
    identical = all(r["max_abs_diff_vs_peft"] == 0 and r.get("max_abs_diff_mergekit_vs_ours", 0) == 0 for r in rows)
    if identical:
        lines += ["All contenders wrote bit-identical weights on every input (mergekit merges a LoRA with PEFT",
                  "itself). None writes the nearest value of the dtype everywhere: salora-merge adds the update to",
                  "the weight in float32 and casts once (PEFT and mergekit give the same bits), so a value is rounded",
                  "twice (the product and sum in float32, then the cast) and lands one unit off where the two",
                  "roundings compound. The logits differences from PEFT's unmerged model come from storing the",
                  "merged weight in the checkpoint's dtype and are the same for all. They differ in cost:", ""]
    else:
        lines += ["The outputs differ (see the largest differences below); the float64 column says who is right.", ""]
    for r in rows:
        if "mergekit" in r:
            ours, kit = r["ours"], r["mergekit"]
            lines.append(f"- {r['label']}: salora-merge takes {ours['seconds'] / kit['seconds']:.2f}x mergekit's "
                         f"wall time with {ours['peak_rss_mib'] / kit['peak_rss_mib']:.2f}x its peak RSS.")
            lines.append(f"- {r['label']}: largest difference between mergekit's and salora-merge's merged "
                         f"weights {r['max_abs_diff_mergekit_vs_ours']:.3g}; mergekit also wrote "
                         f"{r['mergekit']['lora_cache_bytes'] / 2**20:.0f} MiB to its LoRA merge cache "
                         "(a whole merged copy, deleted after the run).")
        if "logits" in r:
            lines.append(f"- {r['label']}: the largest logit of PEFT's unmerged model is {r['logits']['logit_scale']:.3g}.")
    return lines + [""]


def render(rows: list[dict], args) -> str:
    def mib(b):
        return b / 2**20

    lines = [
        "# Merge benchmark",
        "",
        "Written by `benchmarks/bench_merge.py` "
        f"(`.venv/bin/python benchmarks/bench_merge.py --layers {args.layers} --hidden {args.hidden} "
        f"--shard-size {args.shard_size}{' --mergekit ' + MERGEKIT_SHOWN if args.mergekit else ''}`) on {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, CPU only. All contenders run one after another in the same "
        "script, each in a fresh process, from a warm page cache.",
        "",
        "- **salora-merge**: `run_merge` (what `salora-merge merge` runs): streams each input shard once, "
        "adds the LoRA update in float32, writes output shards to the same budget.",
        "- **PEFT**: `AutoModelForCausalLM.from_pretrained(dtype='auto')`, `PeftModel.from_pretrained`, "
        "`merge_and_unload()`, `save_pretrained(max_shard_size=...)`.",
        "- **mergekit 0.1.5** (`mergekit-yaml` from its own environment, `make mergekit-venv`): a `passthrough` "
        "config of the one model `base+lora` in the checkpoint's dtype; mergekit merges the LoRA with PEFT "
        "(`from_pretrained(low_cpu_mem_usage=True)`, `merge_and_unload()`) into its LoRA cache, then writes the "
        "passthrough output (`--out-shard-size` in parameters, the same byte budget). Its peak RSS is the "
        "mergekit process's own.",
        "- **plain read+write**: `safetensors.torch.load_file` + `save_file` of every shard (no merge at all): "
        "the I/O floor.",
        "",
        "Wall time is the whole process (start-up and imports included, as a user waits for it); "
        "\"work s\" is the timed part inside the process. Ratios use the whole-process time.",
        "",
        "| input | contender | wall s | work s | peak RSS MiB | vs PEFT time | vs plain speed | RSS / (largest shard + adapter) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = mib(r["largest_shard"] + r["adapter_bytes"])
        for name, title in CONTENDERS:
            if name not in r:
                continue
            m = r[name]
            lines.append(
                f"| {r['label']} | {title} | {m['seconds']:.1f} | {m['work_seconds']:.1f} | {m['peak_rss_mib']:.0f} | "
                f"{m['seconds'] / r['peft']['seconds']:.2f}x | {r['plain']['seconds'] / m['seconds']:.2f} | "
                f"{m['peak_rss_mib'] / budget:.2f} |"
            )
    lines += [""] + _checks_section(rows) + ["## Against the targets", ""]
    for r in rows:
        budget = mib(r["largest_shard"] + r["adapter_bytes"])
        ours, peft, plain = r["ours"], r["peft"], r["plain"]
        checks = [
            (f"peak RSS {ours['peak_rss_mib']:.0f} MiB <= 1.5 x (largest shard {mib(r['largest_shard']):.0f} MiB "
             f"+ adapter {mib(r['adapter_bytes']):.0f} MiB) = {1.5 * budget:.0f} MiB", ours["peak_rss_mib"] <= 1.5 * budget),
            (f"wall time {ours['seconds']:.1f} s <= PEFT's {peft['seconds']:.1f} s", ours["seconds"] <= peft["seconds"]),
            (f"speed {plain['seconds'] / ours['seconds']:.2f} of plain read+write ({plain['seconds']:.1f} s) >= 0.5",
             plain["seconds"] / ours["seconds"] >= 0.5),
        ]
        lines.append(f"**{r['label']}** ({r['shards']} input shard(s), {mib(r['input_bytes']):.0f} MiB; "
                     f"largest difference from PEFT's merged weights: {r['max_abs_diff_vs_peft']:.3g}):")
        lines.append("")
        lines += [f"- {'met' if ok else 'MISSED'}: {text}" for text, ok in checks]
        lines.append("")
    lines += [
        "Peak RSS of salora-merge does not depend on the shard size: it holds the tensors in flight (the",
        "largest tensor in float32 plus its update) and the adapter, on top of the interpreter with torch",
        "loaded (about 300 MiB). PEFT holds the whole model. Absolute times on this shared machine are",
        "noisy; the ratios come from one run.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_child":
        kind, rest = sys.argv[2], sys.argv[3:]
        {"ours": child_ours, "peft": child_peft, "plain": child_plain, "mergekit": child_mergekit}[kind](*rest)
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="1GB")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--output", default=str(ROOT / "docs" / "merge-benchmark.md"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint in the work folder")
    parser.add_argument("--mergekit", default=str(MERGEKIT) if MERGEKIT.exists() else None,
                        help="mergekit-yaml of mergekit's own environment (`make mergekit-venv`); "
                             "default: out/mergekit-venv/bin/mergekit-yaml when it exists")
    parser.add_argument("--no-logits", action="store_true",
                        help="skip the logits check against PEFT's unmerged model (loads each output in float32)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="salora-bench-merge-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        from salora_merge.hf.resolve import resolve_model

        smol = resolve_model("smollm2-135m-instruct").folder
        rows.append(bench("SmolLM2-135M (float32)", "smollm2-135m-instruct", smol, EXAMPLE, work, "5GB",
                          args.mergekit, not args.no_logits))
        if not args.skip_synthetic:
            synthetic, adapter = work / "synthetic", work / "synthetic-lora"
            started = time.perf_counter()
            make_synthetic(synthetic, args.hidden, args.layers, args.vocab, args.shard_size)
            make_adapter(adapter, synthetic)
            print(f"synthetic checkpoint: {_dir_size(synthetic) / 1e9:.2f} GB in "
                  f"{len(list(synthetic.glob('*.safetensors')))} shards ({time.perf_counter() - started:.0f}s)")
            rows.append(bench(f"synthetic Llama {_dir_size(synthetic) / 1e9:.1f} GB (bfloat16)", str(synthetic),
                              synthetic, adapter, work, args.shard_size, args.mergekit, not args.no_logits))
    Path(args.output).write_text(render(rows, args))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
