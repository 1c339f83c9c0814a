"""benchmarks/gpu_checks.py's CPU dry run (issue 31): the GPU script runs end to end here, so it is known to work
before a device is lent. On the CPU the 'device' is the CPU itself, so the agreement must be exact."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_checks_dry_run_writes_every_figure(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "benchmarks" / "gpu_checks.py")
    gpu_checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_checks)
    out = tmp_path / "gpu-checks.md"
    assert gpu_checks.main(["--device", "cpu", "--tiny", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["calibration", "agreement", "repair"]
    results = json.loads(out.with_suffix(".json").read_text())
    c, a, r = results["calibration"], results["agreement"], results["repair"]
    assert c["ratio"] > 0 and c["tokens"] > 0 and c["peak_gib"] is None
    # CPU against itself: the same subspaces (to float rounding) and merged tensors within float32 rounding
    assert a["overlap_min"] > 1 - 1e-6 and a["merged_tensors"] > 0
    assert a["merged_max_abs_diff"] <= 1e-6 * max(1.0, a["merged_update_at_worst"])
    assert 0 < r["seconds_optimizer"] < r["seconds_method"] <= r["seconds_repair"] and r["seconds_audit"] > 0
    text = out.read_text()
    assert "--device cpu --tiny" in text and "## Repair and behavioural audit" in text
    assert "python benchmarks/gpu_checks.py" in text
