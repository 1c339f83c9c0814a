"""Training benchmark: a SaLoRA training step against a plain PEFT LoRA step of the same rank, side by side.

Both contenders train SmolLM2-135M-Instruct (the built-in alias) with LoRA rank r on the same modules, the
same synthetic batches (random token ids, every token learned), the same AdamW optimizer and the same loop
(forward, backward, optimizer step); on CUDA both run under bfloat16 autocast with a bfloat16 base and
float32 adapter weights. The contenders alternate in fresh subprocesses (A, B, A, B, ...) so that drift of a
shared machine hits both; each reports the median step time after warm-up steps and its peak memory (CUDA:
``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS). SaLoRA's one-off initialization (task
statistics on --init-samples examples and truncated SVDs) is timed separately.

    .venv/bin/python benchmarks/bench_train.py [--device cpu|cuda] [--rank 16] [--targets q_proj,v_proj]
        [--batch 4] [--length 256] [--steps 8] [--repeats 2] [--output docs/train-benchmark-cpu.md]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import subprocess
import threading
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _AnonSampler:
    """Peak of the anonymous resident memory (not file pages of the mmapped checkpoint), sampled every 2 ms."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon_mib())
            time.sleep(0.002)

    def __enter__(self) -> "_AnonSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _batches(vocab: int, args, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (args.batch, args.length), generator=g) for _ in range(n)]


def _model(kind: str, args, device: torch.device):
    """The model to train and the seconds its setup took (SaLoRA: init statistics and SVDs included)."""
    from salora_merge.hf.loading import load_causal_lm
    from salora_merge.hf.resolve import resolve_model

    base = resolve_model(args.base)
    targets = tuple(args.targets.split(","))
    start = time.perf_counter()
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = load_causal_lm(base.folder, device)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(targets)))
        return model, time.perf_counter() - start
    from salora_merge.io.safety_file import load_safety_module
    from salora_merge.hf.loading import load_tokenizer
    from salora_merge.io.prompts import load_prompt_set
    from salora_merge.training.train import TrainOptions, prepare_model
    from salora_merge.training.data import conversations_from_pairs, tokenize_all

    tokenizer = load_tokenizer(base.folder)
    start = time.perf_counter()  # setup: model loading plus SaLoRA's initialization
    prompts = load_prompt_set("benign-instructions").prompts[: args.init_samples]
    # Task statistics on instruction prompts with placeholder answers: the cost depends on the token count.
    conversations = conversations_from_pairs(prompts, ["Here is a short, helpful answer to that request."] * len(prompts))
    examples = tokenize_all(tokenizer, conversations, 256, "benign-instructions")
    options = TrainOptions(rank=args.rank, alpha=float(args.rank), targets=targets, task_rank=32,
                           init_samples=args.init_samples, device=str(device))
    prepared = prepare_model(base, load_safety_module(Path(args.safety)), examples, options)
    return prepared.model, time.perf_counter() - start


def worker(kind: str, args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, setup = _model(kind, args, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = _batches(model.config.vocab_size, args, args.warmup + args.steps)
    cuda = device.type == "cuda"
    times = []
    gc.collect()
    if not cuda:  # hand memory freed during setup back to the OS, for both contenders alike
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    # Peak memory of setup (loading, SaLoRA's init) and of training are reported apart: reset the peak here.
    setup_memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    sampler = _AnonSampler().__enter__() if not cuda else None
    for i, ids in enumerate(batches):
        ids = ids.to(device)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if sampler is not None:
        sampler.__exit__()
    memory = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()
    anon = sampler.peak if sampler is not None else None
    print(json.dumps({"kind": kind, "step_s": statistics.median(times), "memory_mib": memory, "setup_s": setup,
                      "setup_memory_mib": setup_memory, "anon_mib": anon,
                      "trainable": sum(p.numel() for p in params), "loss": float(loss)}))


def _calibrate(args, work: Path) -> Path:
    out = work / "safety.safetensors"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "salora_merge.cli", "calibrate", "--base", args.base,
                        "--max-prompts", "32", "--max-new-tokens", "32", "--targets", args.targets,
                        "--device", args.device, "-o", str(out)], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base", default="smollm2-135m-instruct",
                        help="the alias, or a folder with SmolLM2's config and tokenizer (weights may be random)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--init-samples", type=int, default=64)
    parser.add_argument("--work", default=str(ROOT / "out" / "bench-train"))
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", choices=["salora", "lora"], default=None)
    parser.add_argument("--safety", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    safety = _calibrate(args, work)
    results: dict[str, list[dict]] = {"lora": [], "salora": []}
    for _ in range(args.repeats):
        for kind in ("lora", "salora"):
            cmd = [sys.executable, __file__, "--worker", kind, "--safety", str(safety)]
            for key in ("base", "device", "rank", "targets", "batch", "length", "steps", "warmup", "init_samples"):
                cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[kind].append(json.loads(line))
            print(line, flush=True)
    text = render(results, args)
    print(text)
    if args.output:
        Path(args.output).write_text(text)


def render(results: dict[str, list[dict]], args) -> str:
    step = {k: statistics.median(r["step_s"] for r in v) for k, v in results.items()}
    memory = {k: max(r["memory_mib"] for r in v) for k, v in results.items()}
    setup = {k: statistics.median(r["setup_s"] for r in v) for k, v in results.items()}
    setup_memory = {k: max(r["setup_memory_mib"] for r in v) for k, v in results.items()}
    trainable = {k: v[0]["trainable"] for k, v in results.items()}
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    mem_label = "peak CUDA memory allocated (MiB)" if args.device == "cuda" else "peak RSS (MiB)"
    cpu = args.device != "cuda"
    anon = {k: max(r["anon_mib"] for r in v) for k, v in results.items()} if cpu else {}

    def row(k: str, name: str) -> str:
        cells = [name, f"{trainable[k]:,}", f"{step[k]:.3f}", f"{step[k] / step['lora']:.3f}"]
        if cpu:
            cells += [f"{anon[k]:.0f}", f"{anon[k] / anon['lora']:.3f}"]
        cells += [f"{memory[k]:.0f}", f"{memory[k] / memory['lora']:.3f}", f"{setup[k]:.1f}", f"{setup_memory[k]:.0f}"]
        return "| " + " | ".join(cells) + " |"

    rows = "\n".join(row(k, name) for k, name in (("lora", "PEFT LoRA"), ("salora", "SaLoRA (salora-merge)")))
    head = ["contender", "trainable parameters", "step (s)", "step ratio"]
    if cpu:
        head += ["training peak anonymous RSS (MiB)", "ratio"]
    head += [f"training {mem_label}", "ratio", "setup (s)", "setup peak (MiB)"]
    header = "| " + " | ".join(head) + " |\n|" + "---|" * len(head)
    return f"""# Training benchmark: SaLoRA against plain LoRA ({args.device})

`python benchmarks/bench_train.py --device {args.device} --rank {args.rank} --targets {args.targets} --batch {args.batch} --length {args.length} --steps {args.steps} --repeats {args.repeats}`

SmolLM2-135M-Instruct (`{args.base}`), LoRA rank {args.rank} on `{args.targets}`, batches of {args.batch} x {args.length} tokens, AdamW; {device}, torch {torch.__version__}.
{"bfloat16 base under bfloat16 autocast, float32 adapter weights." if args.device == "cuda" else "float32."}
Median step time over {args.steps} steps after {args.warmup} warm-up steps, median of {args.repeats} alternating fresh processes per contender.
SaLoRA's trainable factors have rank r (the export doubles it); its fixed part (`A0`, `B0`, `U_s`) is stored as buffers.

{header}
{rows}

{"On CPU the anonymous RSS (sampled every 2 ms) is the memory a run really holds; the plain peak RSS also counts pages of the memory-mapped checkpoint that were read (SaLoRA reads every adapted weight once for its SVDs), which the kernel can drop at will." if cpu else ""}
Setup is model loading plus, for SaLoRA, the one-off initialization (task statistics on {args.init_samples} examples and truncated SVDs of the adapted weights), paid once per run; its peak memory is measured apart from training's (on CPU the process's peak RSS is reset through /proc/self/clear_refs before the first step, so the training figure is the peak RSS during training).
Target: step time and peak memory at most 1.10x plain LoRA's.
Per-process results: `{json.dumps(results)}`
"""


if __name__ == "__main__":
    main()
