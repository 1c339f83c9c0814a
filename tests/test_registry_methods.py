"""The methods added with the registry (shrink, input-side), the method checks of the runner, and `run`'s
``realign: {method: ...}`` (against dense float64 references and stock PEFT)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from salora_merge.cli import main


def _realign(*args):
    return CliRunner().invoke(main, ["realign", *map(str, args)])


def _delta(folder, key):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()


def test_shrink_scales_every_update_and_loads_in_peft(tiny_model_dir, tmp_path):
    from conftest import make_peft_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "shrunk"
    result = _realign("--base", tiny_model_dir, "--adapter", adapter, "--method", "shrink", "--gamma", "0.25",
                      "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "shrink" and report["gamma"] == 0.25
    before = load_file(str(adapter / "adapter_model.safetensors"))
    keys = sorted({k.rsplit(".lora_", 1)[0] for k in before})
    assert len(report["modules"]) == len(keys) > 0
    for key in keys:
        dense = 0.25 * (before[f"{key}.lora_B.weight"].double() @ before[f"{key}.lora_A.weight"].double())
        assert torch.allclose(_delta(out, key), dense, atol=1e-7)
    assert all(m["energy_removed"] == pytest.approx(1 - 0.25**2) for m in report["modules"])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, str(out))
    assert [w for w in caught if "peft" in str(w.filename)] == []
    assert "gamma = 0.25" in (out / "README.md").read_text()


def test_input_side_calibrates_on_the_input_side(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    """Without --safety, input-side calibrates an input-side module; the update then vanishes on span(V)."""
    from conftest import make_peft_adapter

    from salora_merge.io.safety_file import load_safety_module

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    saved = tmp_path / "in.safetensors"
    result = _realign("--base", tiny_model_dir, "--adapter", adapter, "--method", "input-side", "--prompts",
                      tiny_calibration_prompts, "--rank", 4, "--max-new-tokens", 5, "--device", "cpu",
                      "--save-safety", saved, "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    safety = load_safety_module(saved)
    assert safety.side == "input" and json.loads(result.stdout)["side"] == "input"
    for name, basis in safety.bases.items():
        dw = _delta(tmp_path / "o", f"base_model.model.{name}")
        assert (dw @ basis.double()).abs().max() < 1e-6 * max(dw.abs().max().item(), 1e-12)
    wrong = _realign("--base", tiny_model_dir, "--adapter", adapter, "--method", "input-side", "--safety",
                     tmp_path / "out.safetensors", "-o", tmp_path / "x")
    assert wrong.exit_code == 1  # the file does not exist: one line naming it
    out_side = tmp_path / "out.safetensors"
    assert CliRunner().invoke(main, ["calibrate", "--base", str(tiny_model_dir), "--prompts",
                                     str(tiny_calibration_prompts), "--rank", "4", "--max-new-tokens", "5",
                                     "--targets", "q_proj,v_proj", "-o", str(out_side)]).exit_code == 0
    wrong = _realign("--base", tiny_model_dir, "--adapter", adapter, "--method", "input-side", "--safety", out_side,
                     "-o", tmp_path / "x")
    assert wrong.exit_code == 1 and "needs a input-side safety module" not in wrong.output
    assert "needs an input-side safety module" in wrong.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra, message", [
    (["--gamma", "0.5"], "--gamma belong to --method resta or shrink, not --method salora"),
    (["--method", "shrink", "--gamma", "2"], "--gamma must be at most 1"),
    (["--method", "shrink", "--safety", "s.safetensors"], "uses no safety module; drop --safety"),
    (["--method", "shrink", "--unaligned", "x"], "--aligned and --unaligned belong to the methods that use the aligned/unaligned pair"),
    (["--method", "both-sides", "--safety", "s.safetensors"], "needs --input-safety FILE"),
    (["--method", "shrink", "--input-safety", "s.safetensors"], "--input-safety belongs to --method both-sides"),
])
def test_method_inputs_are_checked_before_anything_is_written(tiny_model_dir, tmp_path, extra, message):
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    result = _realign("--base", tiny_model_dir, "--adapter", adapter, *extra, "-o", tmp_path / "o")
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_pipeline_realign_method_from_the_registry(tiny_model_dir, tmp_path):
    from conftest import make_peft_adapter

    from salora_merge.pipeline.config import load_pipeline
    from salora_merge.pipeline.run import plan_pipeline, run_pipeline

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    config = tmp_path / "p.yml"
    config.write_text(yaml.safe_dump({"base": str(tiny_model_dir), "adapters": [str(adapter)],
                                      "realign": {"method": "shrink", "gamma": 0.5},
                                      "output": str(tmp_path / "out")}))
    parsed = load_pipeline(config)
    assert parsed.method == "shrink" and dict(parsed.method_options) == {"gamma": 0.5}
    steps = plan_pipeline(parsed)
    assert [s.name for s in steps] == ["realign[0]", "merge"]  # shrink needs no safety module: no calibrate step
    run_pipeline(parsed, echo=lambda line: None)
    realigned = next((tmp_path / "out" / "realigned").iterdir())
    assert json.loads((realigned / "salora_realign.json").read_text())["gamma"] == 0.5
    # another gamma is another key: the realign step (and the merge after it) re-run
    config.write_text(config.read_text().replace("gamma: 0.5", "gamma: 0.75"))
    assert not any(s.up_to_date for s in plan_pipeline(load_pipeline(config)))
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"base": str(tiny_model_dir), "adapters": [str(adapter)], "output": "o",
                                   "realign": {"method": "nope"}}))
    from salora_merge.errors import InputError

    with pytest.raises(InputError, match="realign.method: 'nope' is not one of salora, input-side"):
        load_pipeline(bad)
    bad.write_text(yaml.safe_dump({"base": str(tiny_model_dir), "adapters": [str(adapter)], "output": "o",
                                   "realign": {"method": "shrink", "seed": 1, "unaligned": "m"}}))
    with pytest.raises(InputError) as caught:
        load_pipeline(bad)
    assert "realign.unaligned: method shrink does not use it" in str(caught.value)
    assert "--seed: not an option of --method shrink" in str(caught.value)
