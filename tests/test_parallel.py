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
