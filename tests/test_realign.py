"""Realign on tiny models: PEFT loads the output, and the PEFT-merged model keeps U_s^T of every layer output."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_peft_adapter
from salora_merge.calibration.run import CalibrationOptions, calibrate
from salora_merge.errors import OutputExistsError, SafetyModuleError
from salora_merge.io.adapter import read_adapter
from salora_merge.io.safety_file import load_safety_module, save_safety_module
from salora_merge.methods.projection import realign_modules
from salora_merge.realignment.run import run_realign
from salora_merge.hf.resolve import resolve_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def safety_file(tiny_model_dir, tiny_calibration_prompts, tmp_path_factory):
    options = CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=5, max_new_tokens=6, device="cpu",
                                 batch_size=5)
    path = tmp_path_factory.mktemp("safety") / "tiny.safety.safetensors"
    save_safety_module(calibrate(resolve_model(str(tiny_model_dir)), options).safety, path)
    return path


def _load_peft(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model, [w for w in caught if "peft" in str(w.filename)]


def test_safety_file_round_trip_and_metadata(safety_file, tiny_model_dir):
    safety = load_safety_module(safety_file)
    assert safety.side == "output" and safety.rank == 5
    assert len(safety.bases) == 14  # 7 projections x 2 layers
    meta = safety.metadata
    for key in ("base_model", "base_fingerprint", "prompt_set_sha256", "token_policy", "tool_version", "rank"):
        assert meta.get(key) is not None, key
    assert meta["token_policy"] == "response"
    # q, k and v share one input site.
    assert safety.sites["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    for basis in safety.bases.values():
        assert torch.allclose(basis.T @ basis, torch.eye(5), atol=1e-5)


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=TARGETS),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["v_proj", "gate_proj"], rank_pattern={"gate_proj": 2}),
])
def test_realigned_adapter_keeps_safety_features_of_every_layer_output(config, safety_file, tiny_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a", seed=11, **config)
    out = tmp_path / "realigned"
    report = run_realign(str(tiny_model_dir), str(adapter_dir), out, safety_path=safety_file)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json",
                                                     "adapter_model.safetensors", "salora_realign.json"]
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((adapter_dir / "adapter_config.json").read_text())
    model, warned = _load_peft(tiny_model_dir, out)
    assert warned == []
    merged = model.merge_and_unload()  # PEFT's own merge is the oracle

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    original, _ = _load_peft(tiny_model_dir, adapter_dir)
    original = original.merge_and_unload()
    safety = load_safety_module(safety_file)
    base_modules, merged_modules = dict(base.named_modules()), dict(merged.named_modules())
    original_modules = dict(original.named_modules())
    for module_name in read_adapter(adapter_dir).modules:
        u = safety.bases[module_name].double()  # (d_out, r_s)
        w_base = base_modules[module_name].weight.double()
        w_new = merged_modules[module_name].weight.double()
        w_old = original_modules[module_name].weight.double()
        d_in = w_base.shape[1]
        xs = torch.randn(64, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(d_in))
        # The safety part of the layer output is unchanged by the realigned adapter...
        assert torch.allclose((xs @ w_new.T) @ u, (xs @ w_base.T) @ u, atol=1e-5), module_name
        # ... while the original adapter did move it, and the rest of the update survives.
        assert not torch.allclose((xs @ w_old.T) @ u, (xs @ w_base.T) @ u, atol=1e-4)
        # Exactly the safety component was removed: ||dW'||^2 = ||dW||^2 - ||U^T dW||^2 (dense float64).
        dw_old, dw_new = w_old - w_base, w_new - w_base
        expected = torch.linalg.norm(dw_old) ** 2 - torch.linalg.norm(u.T @ dw_old) ** 2
        assert torch.allclose(torch.linalg.norm(dw_new) ** 2, expected, rtol=1e-4), module_name
    assert all(0.0 <= m.energy_removed <= 1.0 for m in report.modules)
    saved = json.loads((out / "salora_realign.json").read_text())
    assert len(saved["modules"]) == len(report.modules)


def test_realign_is_idempotent(safety_file, tiny_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=TARGETS)
    once = run_realign(str(tiny_model_dir), str(adapter_dir), tmp_path / "once", safety_path=safety_file)
    twice = run_realign(str(tiny_model_dir), str(tmp_path / "once"), tmp_path / "twice", safety_path=safety_file)
    a = load_file(str(tmp_path / "once" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "twice" / "adapter_model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert max(m.energy_removed for m in twice.modules) < 1e-8
    assert max(m.energy_removed for m in once.modules) > 1e-3


def test_lora_A_and_scaling_are_unchanged(safety_file, tiny_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    run_realign(str(tiny_model_dir), str(adapter_dir), tmp_path / "o", safety_path=safety_file)
    before, after = read_adapter(adapter_dir), read_adapter(tmp_path / "o")
    for name, module in before.modules.items():
        assert torch.equal(module.lora_A, after.modules[name].lora_A)
        assert module.scaling == after.modules[name].scaling
        assert not torch.equal(module.lora_B, after.modules[name].lora_B)


def test_input_side_makes_update_vanish_on_calibration_inputs(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    options = CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=4, side="input", max_new_tokens=4,
                                 device="cpu", targets=("q_proj", "v_proj"))
    safety = calibrate(resolve_model(str(tiny_model_dir)), options).safety
    adapter = read_adapter(make_peft_adapter(tiny_model_dir, tmp_path / "a"))
    new, _ = realign_modules(adapter.modules, safety)
    for name, module in new.items():
        v = safety.bases[name].double()
        assert torch.allclose(module.lora_B.double() @ module.lora_A.double() @ v, torch.zeros(module.lora_B.shape[0], 4, dtype=torch.float64), atol=1e-5)


def test_safety_module_of_another_model_is_refused(safety_file, other_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(other_model_dir, tmp_path / "a")
    with pytest.raises(SafetyModuleError, match="recompute it with salora-merge calibrate"):
        run_realign(str(other_model_dir), str(adapter_dir), tmp_path / "o", safety_path=safety_file)
    assert not (tmp_path / "o").exists()


def test_module_missing_from_safety_module_is_refused(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    options = CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=2, max_new_tokens=4, device="cpu",
                                 targets=("q_proj",))
    path = tmp_path / "q.safetensors"
    save_safety_module(calibrate(resolve_model(str(tiny_model_dir)), options).safety, path)
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a")  # q_proj and v_proj
    with pytest.raises(SafetyModuleError, match="no safety basis for model.layers.0.self_attn.v_proj"):
        run_realign(str(tiny_model_dir), str(adapter_dir), tmp_path / "o", safety_path=path)
    assert not (tmp_path / "o").exists()


def test_realign_without_safety_calibrates_the_adapter_modules(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=["k_proj"])
    options = CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=3, max_new_tokens=4, device="cpu")
    run_realign(str(tiny_model_dir), str(adapter_dir), tmp_path / "o", calibration=options,
                save_safety=tmp_path / "s.safetensors")
    saved = load_safety_module(tmp_path / "s.safetensors")
    assert sorted(saved.bases) == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]


def test_existing_output_needs_overwrite(safety_file, tiny_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_realign(str(tiny_model_dir), str(adapter_dir), out, safety_path=safety_file)
    assert (out / "keep.txt").read_text() == "mine"
    run_realign(str(tiny_model_dir), str(adapter_dir), out, safety_path=safety_file, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_failure_while_writing_leaves_nothing_behind(safety_file, tiny_model_dir, tmp_path, monkeypatch):
    import salora_merge.realignment.run as realign_module

    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a")

    def fail_midway(folder, *args, **kwargs):
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(realign_module, "write_adapter", fail_midway)
    with pytest.raises(Exception, match="no space left on the device while writing"):
        run_realign(str(tiny_model_dir), str(adapter_dir), tmp_path / "o", safety_path=safety_file)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
