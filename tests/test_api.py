"""The public API: the example that docs/api.md shows runs, and its figures agree with the CLI's outputs."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "api_example.py"


def test_docs_show_the_example_that_runs():
    text = (ROOT / "docs" / "api.md").read_text()
    assert EXAMPLE.read_text().strip() in text


def test_api_example_on_a_tiny_model(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    from conftest import make_peft_adapter

    import salora_merge as sm

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    run = runpy.run_path(str(EXAMPLE))["realign_audit_merge"]
    calibration = sm.CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=4, max_new_tokens=5,
                                        device="cpu")
    out = tmp_path / "out"
    figures = run(str(tiny_model_dir), str(adapter), out, calibration)
    report = json.loads((out / "realigned" / "salora_realign.json").read_text())
    assert figures["energy_removed"] == pytest.approx(report["total_energy_removed"])
    assert figures["shrink_energy_kept"] == 0.25
    original_rho, realigned_rho = figures["audit_rho"]
    assert original_rho == pytest.approx(report["total_energy_removed"], abs=1e-6)
    assert realigned_rho < 1e-8
    # The merged checkpoint holds W + s B' A' of the realigned adapter (dense float64 reference).
    merged = load_file(str(out / "merged" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    lora = load_file(str(out / "realigned" / "adapter_model.safetensors"))
    config = json.loads((out / "realigned" / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    key = "model.layers.0.self_attn.q_proj"
    dense = base[f"{key}.weight"].double() + scale * (
        lora[f"base_model.model.{key}.lora_B.weight"].double() @ lora[f"base_model.model.{key}.lora_A.weight"].double())
    assert torch.allclose(merged[f"{key}.weight"].double(), dense, atol=1e-6)
    assert figures["merged_tensors_changed"] > 0


def test_api_errors_are_one_line_and_typed(tiny_model_dir, tmp_path):
    import salora_merge as sm
    from salora_merge.errors import InputError, SaloraError

    with pytest.raises(SaloraError):
        sm.open_base(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="--method 'nope': expected one of salora"):
        sm.realign(str(tiny_model_dir), "x", tmp_path / "o", method="nope")
    assert not (tmp_path / "o").exists()


def test_one_handle_opens_the_checkpoint_once(tiny_model_dir, tiny_calibration_prompts, tmp_path, monkeypatch):
    """A realign that calibrates on the way reads the base's checkpoint index once (the handle keeps it)."""
    from conftest import make_peft_adapter

    import salora_merge as sm
    import salora_merge.io.checkpoint as checkpoint

    opened = []
    original = checkpoint.open_checkpoint
    monkeypatch.setattr(checkpoint, "open_checkpoint", lambda folder: opened.append(folder) or original(folder))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    calibration = sm.CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=4, max_new_tokens=5, device="cpu")
    base = sm.open_base(str(tiny_model_dir))
    sm.realign(base, str(adapter), tmp_path / "o", calibration=calibration)
    sm.merge(base, [str(tmp_path / "o")], tmp_path / "m")
    assert len(opened) == 1
