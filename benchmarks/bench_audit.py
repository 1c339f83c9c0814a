"""Audit benchmark: weight-space audit of a folder of SmolLM2 adapters with a saved safety module.

Makes N adapters (the shipped example adapter with its lora_B factors perturbed by different seeds),
calibrates a safety module once (not timed), then times `salora-merge audit` on the whole folder as a
user runs it (a fresh process: start-up and imports included) and the audit function alone.
Appends its results to docs/benchmarks.md (section "Audit").

    .venv/bin/python benchmarks/bench_audit.py [--adapters 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "adapters" / "smollm2-benign-lora"
DOC = ROOT / "docs" / "benchmarks.md"
MARK = "## Audit"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=20)
    args = parser.parse_args()
    from salora_merge.auditing.run import run_audit
    from salora_merge.calibration.run import CalibrationOptions, calibrate
    from salora_merge.io.safety_file import save_safety_module
    from salora_merge.hf.resolve import resolve_model

    with tempfile.TemporaryDirectory(prefix="salora-bench-audit-") as tmp:
        root = Path(tmp)
        folder = root / "adapters"
        state = load_file(str(EXAMPLE / "adapter_model.safetensors"))
        for i in range(args.adapters):
            target = folder / f"adapter-{i:03d}"
            shutil.copytree(EXAMPLE, target)
            g = torch.Generator().manual_seed(i)
            noisy = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if "lora_B" in k else v).contiguous()
                     for k, v in state.items()}
            save_file(noisy, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        safety = root / "smollm2.safety.safetensors"
        options = CalibrationOptions(max_prompts=32, max_new_tokens=32, targets=("q_proj", "v_proj"), device="cpu")
        save_safety_module(calibrate(resolve_model("smollm2-135m-instruct"), options).safety, safety)

        started = time.perf_counter()
        report = run_audit("smollm2-135m-instruct", [str(folder)], safety_path=safety)
        in_process = time.perf_counter() - started
        started = time.perf_counter()
        result = subprocess.run([str(Path(sys.executable).parent / "salora-merge"), "audit", "--base",
                                 "smollm2-135m-instruct", "--safety", str(safety), "--adapter", str(folder),
                                 "--format", "json"], capture_output=True, text=True)
        process = time.perf_counter() - started
        assert result.returncode == 0, result.stderr[-2000:]
        cli_report = json.loads(result.stdout)
    assert report["summary"]["passed"] == args.adapters == cli_report["summary"]["passed"]
    rhos = [e["weight_space"]["rho"] for e in report["adapters"]]
    text = (
        f"{MARK}\n\n"
        f"`benchmarks/bench_audit.py --adapters {args.adapters}`: weight-space audit of a folder of "
        f"{args.adapters} SmolLM2 adapters (60 modules each, rank 8) with a saved safety module (r_s = 32).\n\n"
        f"| measurement | seconds |\n|---|---|\n"
        f"| `salora-merge audit --adapter FOLDER` (whole process: start-up, imports, base fingerprint, report) | {process:.2f} |\n"
        f"| `run_audit` in a warm process, all {args.adapters} adapters | {in_process:.2f} |\n"
        f"| per adapter, in process | {in_process / args.adapters:.3f} |\n\n"
        f"rho ranged {min(rhos):.4f} to {max(rhos):.4f} across the adapters (random reference "
        f"{report['adapters'][0]['weight_space']['random_reference']:.4f}).\n"
    )
    doc = DOC.read_text()
    doc = doc.split(MARK)[0].rstrip() + "\n\n" + text if MARK in doc else doc.rstrip() + "\n\n" + text
    DOC.write_text(doc)
    print(text)


if __name__ == "__main__":
    main()
