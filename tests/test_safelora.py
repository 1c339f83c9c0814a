"""Safe LoRA (realign --method safelora) against dense float64 computations of the paper's rule."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from salora_merge.cli import main
from salora_merge.core.safelora_math import safelora_B, select_modules, update_cosine


def test_projection_and_cosine_match_dense_float64():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(12, 20, generator=g, dtype=torch.float64)
    b = torch.randn(12, 3, generator=g, dtype=torch.float64)
    a = torch.randn(3, 20, generator=g, dtype=torch.float64)
    c = v @ v.T / torch.linalg.matrix_norm(v)  # the authors' C, dense
    assert torch.allclose(safelora_B(b, v), c @ b, atol=1e-12)
    dw, cdw = b @ a, c @ b @ a
    want = float((cdw.flatten() @ dw.flatten()) / (cdw.norm() * dw.norm()))
    assert update_cosine(b, c @ b, a) == pytest.approx(want, abs=1e-12)
    assert update_cosine(b, b, a) == pytest.approx(1.0, abs=1e-12)


def test_module_selection():
    cosines = {"m.a": 0.2, "m.b": 0.7, "m.c": 0.5, "m.d": 0.2}
    assert select_modules(cosines, 0.5, None) == {"m.a", "m.c", "m.d"}
    assert select_modules(cosines, None, 2) == {"m.a", "m.d"}
    assert select_modules(cosines, None, 0) == set()
    with pytest.raises(ValueError):
        select_modules(cosines, 0.5, 2)


def _run(*args):
    return CliRunner().invoke(main, ["realign", *map(str, args)])


def test_cli_safelora_projects_the_selected_modules(tiny_model_dir, other_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora", target_modules=["q_proj", "v_proj", "o_proj"])
    original = load_file(str(adapter / "adapter_model.safetensors"))
    aligned = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    unaligned = AutoModelForCausalLM.from_pretrained(str(other_model_dir)).state_dict()

    def dense(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        v = (aligned[f"{module}.weight"] - unaligned[f"{module}.weight"]).double()
        c = v @ v.T / torch.linalg.matrix_norm(v)
        b = original[f"base_model.model.{module}.lora_B.weight"].double()
        a = original[f"base_model.model.{module}.lora_A.weight"].double()
        cdw, dw = c @ b @ a, b @ a
        return c @ b, (cdw.flatten() @ dw.flatten()) / (cdw.norm() * dw.norm())

    out = tmp_path / "all"
    result = _run("--base", tiny_model_dir, "--adapter", adapter, "--method", "safelora", "--unaligned",
                  other_model_dir, "--threshold", "1.0", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["projected_modules"] == len(report["modules"]) == 6
    written = load_file(str(out / "adapter_model.safetensors"))
    for m in report["modules"]:
        cb, cosine = dense(m["module"])
        assert m["cosine"] == pytest.approx(float(cosine), abs=1e-6)
        got = written[f"base_model.model.{m['module']}.lora_B.weight"].double()
        assert torch.allclose(got, cb, atol=1e-6 * cb.abs().max().item())
        assert torch.equal(written[f"base_model.model.{m['module']}.lora_A.weight"],
                           original[f"base_model.model.{m['module']}.lora_A.weight"])
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out))  # loads

    one = tmp_path / "one"
    result = _run("--base", tiny_model_dir, "--adapter", adapter, "--method", "safelora", "--unaligned",
                  other_model_dir, "--top-k", "1", "-o", one, "--json")
    assert result.exit_code == 0, result.output
    modules = json.loads(result.stdout)["modules"]
    lowest = min(modules, key=lambda m: m["cosine"])
    assert [m["module"] for m in modules if m["projected"]] == [lowest["module"]]
    written = load_file(str(one / "adapter_model.safetensors"))
    for m in modules:
        key = f"base_model.model.{m['module']}.lora_B.weight"
        assert torch.equal(written[key], original[key]) != m["projected"]


def test_cli_safelora_bad_input(tiny_model_dir, tmp_path):
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "out"
    cases = [
        (["--method", "safelora"], "needs --unaligned"),
        (["--method", "safelora", "--unaligned", tiny_model_dir], "are the same weights"),
        (["--method", "safelora", "--unaligned", tiny_model_dir, "--safety", tmp_path / "s.safetensors"],
         "drop --safety"),
        (["--method", "safelora", "--unaligned", tiny_model_dir, "--threshold", "0.3", "--top-k", "2"],
         "not both"),
        (["--top-k", "2"], "belong to --method safelora"),
    ]
    for extra, message in cases:
        result = _run("--base", tiny_model_dir, "--adapter", adapter, *extra, "-o", out)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
        assert not out.exists()
