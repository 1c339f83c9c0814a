"""Data-parallel calibration over processes: ``torchrun --nproc-per-node 2`` with the gloo backend (CPU). Each
process takes every second prompt; the moments are summed with one float64 all-reduce per site; only rank 0
writes. With one sequence per batch the per-sequence float32 Grams are the same in both runs and a sum of two
float64 terms does not depend on the order, so the safety module equals the single-process one exactly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from click.testing import CliRunner

from salora_merge.cli import main
from salora_merge.io.safety_file import load_safety_module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """``salora-merge ARGS`` under ``torchrun --nproc-per-node 2`` (gloo on CPU); it must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SALORA_MERGE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(_free_port()), "-m", "salora_merge.cli", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _same_run(losses_one, losses_two, single, both) -> dict:
    """Three logged steps, each loss different from the last and equal in both runs (the same batches in the same
    order), and the same exported tensors to 1e-4 of each one's scale; the single run's tensors."""
    from safetensors.torch import load_file

    assert len(losses_one) == 3 and len({round(loss, 3) for _, loss in losses_one}) == 3
    for (step_a, loss_a), (step_b, loss_b) in zip(losses_one, losses_two, strict=True):
        assert step_a == step_b and abs(loss_a - loss_b) <= 1e-4 * abs(loss_a), (losses_one, losses_two)
    a = load_file(str(single / "adapter_model.safetensors"))
    b = load_file(str(both / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        scale = float(a[key].abs().max()) or 1.0
        assert (a[key] - b[key]).abs().max() <= 1e-4 * scale, key
    return a


def test_torchrun_calibration_equals_one_process(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    common = ["calibrate", "--base", str(tiny_model_dir), "--prompts", str(tiny_calibration_prompts), "--rank", "4",
              "--max-new-tokens", "6", "--keep-moments", "--batch-size", "1", "--generation-batch-size", "1",
              "--device", "cpu"]
    single = tmp_path / "single.safetensors"
    result = CliRunner().invoke(main, [*common, "-o", str(single)])
    assert result.exit_code == 0, result.output
    both = tmp_path / "parallel.safetensors"
    run = _torchrun([*common, "-o", str(both)], tmp_path)
    assert run.stdout.count("Wrote ") == 1  # rank 0 reports and writes; rank 1 neither
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == ["parallel.safetensors",
                                                                                        "single.safetensors"]
    a, b = load_safety_module(single), load_safety_module(both)
    assert a.counts == b.counts and a.metadata["n_prompts"] == b.metadata["n_prompts"] == 12
    for key, moment in a.moments.items():
        assert torch.equal(moment, b.moments[key]), key
    for name, basis in a.bases.items():
        assert torch.equal(basis, b.bases[name]), name


def test_torchrun_behavioural_audit_equals_one_process(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    """audit --behavior under torchrun: each rank generates every second prompt of each set, the answers are
    gathered in order, and rank 0 writes the report: the same rates and answers as one process."""
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    common = ["audit", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--prompts",
              str(tiny_calibration_prompts), "--rank", "2", "--max-new-tokens", "4", "--batch-size", "1",
              "--generation-batch-size", "1", "--behavior", "--max-eval-prompts", "5", "--device", "cpu",
              "--format", "json"]
    single = tmp_path / "single.json"
    result = CliRunner().invoke(main, [*common, "-o", str(single)])
    assert result.exit_code == 0, result.output
    both = tmp_path / "parallel.json"
    _torchrun([*common, "-o", str(both)], tmp_path)
    import json

    a, b = json.loads(single.read_text()), json.loads(both.read_text())
    assert a["adapters"][0]["behavior"] == b["adapters"][0]["behavior"]
    assert a["behavior"]["base"] == b["behavior"]["base"]
    assert a["adapters"][0]["weight_space"] == b["adapters"][0]["weight_space"]


def test_torchrun_train_equals_one_process(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    """train runs on transformers' Trainer, which runs under accelerate: two gloo processes with 2 examples each
    per step (DDP, the loss averaged over the tokens of all processes) give the adapter that one process gives
    with 4 examples per step, up to float round-off; only rank 0 writes and reports."""
    import json

    safety = tmp_path / "safety.safetensors"
    result = CliRunner().invoke(main, [
        "calibrate", "--base", str(tiny_model_dir), "--prompts", str(tiny_calibration_prompts), "--rank", "4",
        "--max-new-tokens", "6", "--targets", "q_proj,v_proj", "--device", "cpu", "-o", str(safety)])
    assert result.exit_code == 0, result.output
    words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Repeat the word {w}.", "input": "",
                                        "output": " ".join([w] * (1 + i % 3))}) + "\n" for i, w in enumerate(words)))

    def train(out, batch: int) -> list[str]:
        return ["train", "--base", str(tiny_model_dir), "--data", str(data), "--safety", str(safety), "--rank", "4",
                "--alpha", "8", "--task-rank", "6", "--targets", "q_proj,v_proj", "--lr", "1e-2", "--dropout", "0",
                "--batch-size", str(batch), "--grad-accum", "1", "--max-steps", "3", "--logging-steps", "1",
                "--device", "cpu", "--quiet", "--json", "--no-keep-refusals", "-o", str(out)]

    single, both = tmp_path / "single", tmp_path / "parallel"
    result = CliRunner().invoke(main, train(single, 4))
    assert result.exit_code == 0, result.output
    run = _torchrun(train(both, 2), tmp_path)
    assert run.stdout.count('"global_step"') == 1  # rank 0 reports; rank 1 neither reports nor writes
    one, two = json.loads(result.stdout), json.loads(run.stdout)
    assert one["global_step"] == two["global_step"] == 3
    _same_run(one["losses"], two["losses"], single, both)


def test_torchrun_refit_equals_one_process(tiny_model_dir, tmp_path, monkeypatch):
    """repair's re-fit (``realign --method refit``, KL distillation) under torchrun: each term of the loss is a
    weighted mean over the whole step's batch (the weights summed over the processes), so two gloo processes with
    2 examples each per step give the losses and the adapter of one process with 4, although the processes'
    shares hold different numbers of anchor and distilled tokens; only rank 0 writes and reports."""
    import json

    from conftest import make_peft_adapter
    from safetensors.torch import load_file

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    task = tmp_path / "task.txt"
    task.write_text("".join(f"Add {i} and {3 * i + 1}, then say the words {'go ' * (1 + i % 4)}\n" for i in range(8)))

    def refit(out, batch: int) -> list[str]:
        return ["realign", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--method", "refit",
                "--task-prompts", str(task), "--distill", "kl", "--max-anchors", "8", "--max-boundary", "4",
                "--answer-tokens", "6", "--example-length", "512", "--steps", "3", "--lr", "5e-3",
                "--refit-batch", str(batch), "--json", "-o", str(out)]

    single, both = tmp_path / "single", tmp_path / "parallel"
    result = CliRunner().invoke(main, refit(single, 4))
    assert result.exit_code == 0, result.output
    run = _torchrun(refit(both, 2), tmp_path)
    assert run.stdout.count('"method": "refit"') == 1  # rank 0 reports; rank 1 neither reports nor writes
    one, two = json.loads(result.stdout), json.loads(run.stdout)
    a = _same_run(one["losses"], two["losses"], single, both)
    before = load_file(str(adapter / "adapter_model.safetensors"))
    assert sorted(a) == sorted(before)
    assert any(not torch.equal(a[key], before[key]) for key in a)  # the re-fit moved the adapter
