"""The GPU path in one prepared run (issue 31): calibrate, repair, audit and merge on one CUDA device.

    python benchmarks/gpu_checks.py --device cuda --output docs/gpu-checks.md      # on a GPU machine (< 8 min)
    python benchmarks/gpu_checks.py --device cpu --tiny --output /tmp/gpu-dry.md   # the dry run the tests use

Everything is built here from configs (random weights, a byte-level tokenizer with a ChatML template): nothing is
read from or written to the Hub. The checks:

1. models: SmolLM2-135M's shape, and a Llama with a 7B's layer widths (4096 hidden, 11008 intermediate, 32
   heads) but 4 layers (``--tiny``: both scaled down, for the CPU dry run);
2. calibration of the 7B-shaped model in bfloat16: the statistics pass (all seven projections) against bare
   forward passes of the backbone over the same batches, measured alternately in one process, and the peak
   device memory of the whole ``calibrate``;
3. CUDA against CPU on SmolLM2's shape (the CPU in float32, the device in the dtype the product loads there,
   bfloat16 on CUDA where supported): each module's subspace overlap ``||U_cpu^T U_dev||_F^2 / r``
   and the ratio of the captured eigenvalue energy, and the tensors of a merge of an adapter realigned with each
   module (max abs difference against the size of the update);
4. ``repair`` (the default re-fit, prompt discovery included, a short setting) and ``audit --behavior`` on
   SmolLM2's shape, with the repair's time in generation (anchors, discovery, answers) and in optimizer steps;
5. one markdown file with every figure and the command, and a one-line summary per check on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "llama-7b-widths-4-layers": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
TINY = {
    "smollm2-135m": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320),
    "llama-7b-widths-4-layers": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, vocab_size=320),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer_for(folder: Path):
    """A byte-level tokenizer (one token per byte) with ChatML's special tokens; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|im_start|>")
    fast.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder))
    return fast


def build_model(folder: Path, shape: dict, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-weight Llama of ``shape`` saved as safetensors with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_for(folder)
    config = LlamaConfig(**{**shape, "vocab_size": max(shape["vocab_size"], len(tok))}, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def build_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A PEFT LoRA (r 8, the seven projections) with non-zero random B, made by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def calibration_overhead(folder: Path, device: torch.device, n_prompts: int, repeats: int) -> dict:
    """The statistics pass against bare forward passes over the same batches (alternating, medians), and the
    peak device memory of a whole calibration through the product's API (the timing model freed first)."""
    from salora_merge import api
    from salora_merge.calibration.run import CalibrationOptions

    timed = _timed_passes(folder, device, n_prompts, repeats)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    api.calibrate(str(folder), CalibrationOptions(max_prompts=n_prompts, max_new_tokens=32, device=str(device)))
    _sync(device)
    whole = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {**timed, "seconds_calibrate": whole, "peak_gib": peak}


def _timed_passes(folder: Path, device: torch.device, n_prompts: int, repeats: int) -> dict:
    from salora_merge.calibration.run import (accumulate_moments, backbone_of, batch_tensors, build_sequences,
                                              length_sorted_batches, select_targets)
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.generation import generate_greedy
    from salora_merge.hf.layers import linear_modules
    from salora_merge.hf.loading import load_causal_lm, load_tokenizer
    from salora_merge.io.prompts import load_prompt_set

    tokenizer, model = load_tokenizer(folder), load_causal_lm(folder, device)
    prompts = load_prompt_set("advbench-calibration").prompts[:n_prompts]
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    started = time.perf_counter()
    responses = generate_greedy(model, tokenizer, ids, 32, 64)
    _sync(device)
    seconds_generate = time.perf_counter() - started
    sequences = build_sequences(ids, responses, 512)
    linear, backbone, pad = linear_modules(model), backbone_of(model), tokenizer.pad_token_id
    modules = {n: linear[n] for n in select_targets(list(linear), None)}

    @torch.no_grad()
    def bare():
        for batch in length_sorted_batches(sequences, 16):
            input_ids, attention, _ = batch_tensors(batch, pad, ["response"], device)
            backbone(input_ids=input_ids, attention_mask=attention, use_cache=False)

    def stats():
        accumulate_moments(model, modules, sequences, ["response"], 16, pad, allow_output_moments=True)

    bare()
    stats()  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {"bare": [], "stats": []}
    for _ in range(repeats):
        for label, fn in (("bare", bare), ("stats", stats)):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[label].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"prompts": n_prompts, "tokens": sum(len(s) for s, _ in sequences), "seconds_generate": seconds_generate,
            "median_seconds": med, "ratio": med["stats"] / med["bare"],
            "dtype": str(next(iter(linear.values())).weight.dtype).replace("torch.", "")}


def device_agreement(folder: Path, adapter: Path, device: torch.device, n_prompts: int, work: Path) -> dict:
    """Calibrate on the CPU and on ``device`` (same prompts, float32) and compare the bases; merge an adapter
    realigned with each module and compare the merged tensors."""
    from safetensors.torch import load_file

    from salora_merge import api
    from salora_merge.calibration.run import CalibrationOptions
    from salora_merge.io.safety_file import load_safety_module

    runs = {"reference": "cpu", "device": str(device)}  # the dry run compares the CPU with itself
    modules = {}
    for tag, where in runs.items():
        path = work / f"safety-{tag}.safetensors"
        api.calibrate(str(folder), CalibrationOptions(max_prompts=n_prompts, max_new_tokens=16, device=where),
                      output=path)
        modules[tag] = load_safety_module(path)
    cpu, dev = modules["reference"], modules["device"]
    overlaps, energies = [], []
    for name, u in cpu.bases.items():
        v = dev.bases[name]
        overlaps.append(float((u.double().T @ v.double()).pow(2).sum()) / u.shape[1])
        energies.append(float(dev.eigenvalues[name].sum() / cpu.eigenvalues[name].sum()))
    merged = {}
    for tag in runs:
        api.realign(str(folder), str(adapter), work / f"realigned-{tag}",
                    safety=work / f"safety-{tag}.safetensors")
        api.merge(str(folder), [str(work / f"realigned-{tag}")], work / f"merged-{tag}")
        merged[tag] = load_file(str(work / f"merged-{tag}" / "model.safetensors"))
    original = load_file(str(folder / "model.safetensors"))
    diffs, identical = [], 0
    for key, a in merged["reference"].items():
        b = merged["device"][key]
        identical += int(torch.equal(a, b))
        update = (a.double() - original[key].double()).abs().max() if key in original else torch.tensor(0.0)
        if not torch.equal(a, b):
            diffs.append((float((a.double() - b.double()).abs().max()), float(update), key))
    worst = max(diffs) if diffs else (0.0, 0.0, "-")
    from salora_merge.hf.loading import load_causal_lm

    probe = load_causal_lm(folder, device)
    device_dtype = str(next(probe.parameters()).dtype).replace("torch.", "")
    del probe
    return {"device_dtype": device_dtype, "modules": len(overlaps), "overlap_min": min(overlaps), "overlap_mean": statistics.mean(overlaps),
            "energy_ratio_min": min(energies), "energy_ratio_max": max(energies),
            "merged_tensors": len(merged["reference"]), "merged_identical": identical,
            "merged_max_abs_diff": worst[0], "merged_update_at_worst": worst[1], "merged_worst_tensor": worst[2]}


def repair_and_audit(folder: Path, adapter: Path, device: torch.device, work: Path, tiny: bool) -> dict:
    """The default repair (refit with prompt discovery) in a short setting, and audit --behavior; times split
    into generation and optimizer steps from the re-fit's own report."""
    from salora_merge import api
    from salora_merge.auditing.behavior import BehaviorOptions
    from salora_merge.auditing.run import AuditOptions
    from salora_merge.repairing.run import RepairOptions

    behavior = BehaviorOptions(max_prompts=4 if tiny else 32, max_new_tokens=8 if tiny else 32, device=str(device))
    short = {"steps": 2 if tiny else 20, "max_anchors": 4 if tiny else 64, "max_boundary": 4 if tiny else 64,
             "discover_candidates": 4 if tiny else 64, "distill_top": 4 if tiny else 32,
             "answer_tokens": 8 if tiny else 48}
    started = time.perf_counter()
    report = api.repair(str(folder), str(adapter), work / "repaired",
                        RepairOptions(heldout=2 if tiny else 8, behavior=behavior), method_options=short)
    _sync(device)
    seconds_repair = time.perf_counter() - started
    refit = report.method_report
    discovery = refit.get("discovery") or {}
    started = time.perf_counter()
    api.audit(str(folder), [str(adapter)], AuditOptions(behavior=behavior),
              safety=work / "safety-reference.safetensors")
    _sync(device)
    return {"options": short, "seconds_repair": seconds_repair, "seconds_method": report.seconds_method,
            "seconds_generation": refit["seconds_prepare"], "seconds_discovery": discovery.get("seconds", 0.0),
            "seconds_optimizer": refit["seconds_train"], "seconds_eval": report.seconds_eval,
            "seconds_audit": time.perf_counter() - started}


def render(results: dict, command: str) -> str:
    c, a, r = results["calibration"], results["agreement"], results["repair"]
    peak = f"{c['peak_gib']:.2f} GiB" if c["peak_gib"] is not None else "n/a (CPU)"
    return "\n".join([
        "# GPU checks", "",
        f"Generated by `{command}` ({results['device_name']}, torch {torch.__version__}, {results['when']}). "
        "Random-weight models built from configs (nothing from the Hub); every figure from this one run.", "",
        "## Calibration of the 7B-shaped model", "",
        f"Shape `{results['shapes']['large']}` in {c['dtype']}: {c['prompts']} prompts, {c['tokens']} tokens "
        f"(32 generated per prompt in {c['seconds_generate']:.1f} s). The statistics pass (all seven projections) "
        f"took {c['median_seconds']['stats']:.2f} s against {c['median_seconds']['bare']:.2f} s for bare forward "
        f"passes of the backbone over the same batches: **{c['ratio']:.2f}x** (medians of alternating runs). A "
        f"whole `calibrate` took {c['seconds_calibrate']:.1f} s, peak device memory {peak}.", "",
        f"## The device against the CPU (SmolLM2's shape; the device computes in {a['device_dtype']})", "",
        f"Over {a['modules']} modules: subspace overlap `||U_cpu^T U_dev||_F^2 / r` min {a['overlap_min']:.6f}, mean "
        f"{a['overlap_mean']:.6f}; captured eigenvalue energy, device / CPU, {a['energy_ratio_min']:.6f} to "
        f"{a['energy_ratio_max']:.6f}. A merge of the adapter realigned with each module: {a['merged_identical']} of "
        f"{a['merged_tensors']} tensors bit-identical; the largest difference {a['merged_max_abs_diff']:.3g} "
        f"(`{a['merged_worst_tensor']}`, where the merged update reaches {a['merged_update_at_worst']:.3g}).", "",
        "## Repair and behavioural audit (SmolLM2's shape)", "",
        f"`repair` with its defaults (refit, prompt discovery) in a short setting ({json.dumps(r['options'])}): "
        f"{r['seconds_repair']:.1f} s in all; the re-fit {r['seconds_method']:.1f} s, of which generation "
        f"(anchors, discovery, the adapter's answers) {r['seconds_generation']:.1f} s (discovery "
        f"{r['seconds_discovery']:.1f} s) and optimizer steps {r['seconds_optimizer']:.1f} s; the evaluation "
        f"{r['seconds_eval']:.1f} s. `audit --behavior`: {r['seconds_audit']:.1f} s.", ""])


def summaries(results: dict) -> list[str]:
    c, a, r = results["calibration"], results["agreement"], results["repair"]
    return [f"calibration: statistics pass {c['ratio']:.2f}x the bare forward passes; calibrate "
            f"{c['seconds_calibrate']:.1f} s, peak {c['peak_gib'] if c['peak_gib'] is None else round(c['peak_gib'], 2)} GiB",
            f"agreement: overlap min {a['overlap_min']:.6f}; merged tensors identical {a['merged_identical']}/"
            f"{a['merged_tensors']}, max diff {a['merged_max_abs_diff']:.3g}",
            f"repair: {r['seconds_repair']:.1f} s (generation {r['seconds_generation']:.1f} s, optimizer "
            f"{r['seconds_optimizer']:.1f} s); audit --behavior {r['seconds_audit']:.1f} s"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the dry run)")
    parser.add_argument("--tiny", action="store_true", help="scaled-down models and settings (the CPU dry run)")
    parser.add_argument("--prompts", type=int, default=None, help="calibration prompts (default 64; --tiny 4)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating timing runs (default 3; --tiny 1)")
    parser.add_argument("--output", type=Path, default=Path("docs/gpu-checks.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; use --device cpu --tiny for the dry run",
              file=sys.stderr)
        return 1
    shapes = TINY if args.tiny else SHAPES
    n_prompts = args.prompts or (4 if args.tiny else 64)
    repeats = args.repeats or (1 if args.tiny else 3)
    command = "python benchmarks/gpu_checks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="salora-gpu-checks-") as tmp:
        work = Path(tmp)
        small = build_model(work / "small", shapes["smollm2-135m"], torch.float32)
        large = build_model(work / "large", shapes["llama-7b-widths-4-layers"], torch.bfloat16)
        adapter = build_adapter(small, work / "adapter")
        results = {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or "CPU", "when": time.strftime("%Y-%m-%d"),
            "shapes": {"small": json.dumps(shapes["smollm2-135m"]), "large": json.dumps(
                shapes["llama-7b-widths-4-layers"])},
            "calibration": calibration_overhead(large, device, n_prompts, repeats),
            "agreement": device_agreement(small, adapter, device, n_prompts, work),
            "repair": repair_and_audit(small, adapter, device, work, args.tiny),
        }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(results, command))
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2))
    for line in summaries(results):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
