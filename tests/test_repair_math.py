"""Safe Delta, RESTA and the low-rank refactoring against direct float64 implementations of the formulas,
and both methods end to end through realign (stock PEFT loads the result)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from salora_merge.core.lora_config import with_uniform_rank
from salora_merge.core.lowrank import truncated_factors, uniform_factors
from salora_merge.core.resta import safety_vector_factors, with_safety_vector
from salora_merge.core.safedelta import BUDGET_REFERENCE, inverse_cholesky, safe_delta, select_entries


def _spd(d: int, n: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 1] *= 5.0  # uneven columns, so the costs differ
    return x.T @ x


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    return h + damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)


def test_inverse_cholesky_gives_the_sequential_obs_inverses():
    h = _spd(7, 40, 0)
    u = inverse_cholesky(h, 0.01)
    hd = _damped(h, 0.01)
    assert torch.allclose(u.T @ u, torch.linalg.inv(hd), atol=1e-12)
    for m in range(7):  # U_mm^2 = [H_(m)^-1]_00 and the row ratio is the OBS update of the remaining columns
        sub = torch.linalg.inv(hd[m:, m:])
        assert u[m, m] ** 2 == pytest.approx(float(sub[0, 0]), rel=1e-10)
        assert torch.allclose(u[m, m:] / u[m, m], sub[0, :] / sub[0, 0], atol=1e-10)


def _direct_safe_delta(w, delta, h, mask, damp):
    """The OBS step written out: at column m, invert H restricted to columns m.., set the column, and
    move the later columns by -err * [H_(m)^-1]_0,1: / [H_(m)^-1]_00."""
    hd = _damped(h, damp)
    w = w.clone()
    target = w + delta
    for m in range(w.shape[1]):
        sub = torch.linalg.inv(hd[m:, m:])
        chosen = torch.where(mask[:, m], target[:, m], w[:, m])
        err = (w[:, m] - chosen) / sub[0, 0]
        w[:, m] = chosen
        w[:, m + 1:] -= err[:, None] * sub[0, 1:][None, :]
    return w


def test_safe_delta_equals_the_direct_obs_formulas_and_keeps_safety_outputs():
    g = torch.Generator().manual_seed(1)
    d_out, d_in = 9, 7
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    delta = 0.3 * torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    h = _spd(d_in, 60, 2)
    scale = 0.4 * BUDGET_REFERENCE / (d_out * d_in)  # budget = 0.4 x mean per-unit cost
    new, mask = safe_delta(w, delta, h, scale)
    assert 0 < int(mask.sum()) < mask.numel()
    assert torch.allclose(new, _direct_safe_delta(w, delta, h, mask, 0.01), atol=1e-10)
    # accepted entries hold exactly the fine-tuned value
    assert torch.allclose(new[mask], (w + delta)[mask], atol=1e-12)
    # compensation: the outputs on the safety inputs move less than with the accepted entries alone
    plain = w + delta * mask
    moved = lambda v: float(torch.trace((v - w) @ h @ (v - w).T))  # noqa: E731
    assert moved(new) < moved(plain) < moved(w + delta)


def test_selection_is_the_greedy_prefix_within_the_budget():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(6, 8, generator=g, dtype=torch.float64)
    h = _spd(8, 50, 4)
    u = inverse_cholesky(h, 0.01)
    scale = 0.6 * BUDGET_REFERENCE / delta.numel()
    mask = select_entries(delta, u, scale, exclude=0.25)
    hdiag = torch.diagonal(u) ** 2
    per_cost = (1.0 / hdiag)[None, :].expand_as(delta).flatten()
    cost = (delta**2 / hdiag[None, :]).flatten()
    order = sorted(range(delta.numel()), key=lambda i: (float(per_cost[i]), i))
    allowed = order[: len(order) - int(0.25 * len(order))]
    budget = 0.6 * float(per_cost.mean())
    want, spent = set(), 0.0
    for i in allowed:  # the prefix of the order whose cumulative cost fits
        spent += float(cost[i])
        if spent > budget:
            break
        want.add(i)
    assert set(torch.nonzero(mask.flatten()).flatten().tolist()) == want
    assert not mask.flatten()[order[len(allowed):]].any()  # the excluded, most expensive share


def test_identity_curvature_means_no_compensation():
    w = torch.randn(4, 5, dtype=torch.float64)
    delta = torch.randn(4, 5, dtype=torch.float64)
    new, mask = safe_delta(w, delta, torch.eye(5, dtype=torch.float64), scale=BUDGET_REFERENCE / 20 * 0.5)
    assert torch.allclose(new, w + delta * mask, atol=1e-12)


def test_truncated_factors_and_the_resta_term():
    g = torch.Generator().manual_seed(5)
    low = torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 12, generator=g, dtype=torch.float64)
    b, a, kept = truncated_factors(low, 4)
    assert b.shape == (10, 4) and kept == pytest.approx(1.0) and torch.allclose(b @ a, low, atol=1e-10)
    full = torch.randn(10, 12, generator=g, dtype=torch.float64)
    b, a, kept = truncated_factors(full, 4)
    s = torch.linalg.svdvals(full)
    assert kept == pytest.approx(float((s[:4] ** 2).sum() / (s**2).sum()), rel=1e-10)
    assert float(torch.linalg.norm(full - b @ a)) == pytest.approx(float(s[4:].norm()), rel=1e-8)  # Eckart-Young
    vb, va, _ = safety_vector_factors(low, 0.7, 8)
    lora_b, lora_a = torch.randn(10, 2, dtype=torch.float64), torch.randn(2, 12, dtype=torch.float64)
    cb, ca = with_safety_vector(lora_b, lora_a, 1.5, vb, va)
    assert torch.allclose(cb @ ca, 1.5 * lora_b @ lora_a + 0.7 * low, atol=1e-10)
    padded = uniform_factors({"m": (lora_b, lora_a, 1.5)}, 5)["m"]
    assert padded[0].shape == (10, 5) and torch.allclose(padded[0] @ padded[1], 1.5 * lora_b @ lora_a)
    assert with_uniform_rank({"r": 8, "lora_alpha": 16, "rank_pattern": {"q": 4}}, 12) == {
        "r": 12, "lora_alpha": 12.0, "rank_pattern": {}, "alpha_pattern": {}}


def _peft_delta(base_dir, adapter_dir, module):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    w0 = dict(base.named_parameters())[f"{module}.weight"].detach().double().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    assert [w for w in caught if "peft" in str(w.filename)] == []
    merged = model.merge_and_unload()
    return dict(merged.named_parameters())[f"{module}.weight"].detach().double() - w0


def test_resta_through_realign_adds_the_safety_vector(tiny_model_dir, other_model_dir, tmp_path):
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "resta"
    result = CliRunner().invoke(__import__("salora_merge.cli", fromlist=["main"]).main, [
        "realign", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--method", "resta", "--unaligned",
        str(other_model_dir), "--gamma", "0.5", "--vector-rank", "64", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "resta" and all(m["vector_energy_kept"] == pytest.approx(1.0) for m in report["modules"])
    module = "model.layers.0.self_attn.q_proj"
    base_w = load_file(str(tiny_model_dir / "model.safetensors"))[f"{module}.weight"].double()
    other_w = load_file(str(other_model_dir / "model.safetensors"))[f"{module}.weight"].double()
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    key = f"base_model.model.{module}"
    before = config["lora_alpha"] / config["r"] * (lora[f"{key}.lora_B.weight"].double() @ lora[f"{key}.lora_A.weight"].double())
    want = before + 0.5 * (base_w - other_w)  # exact: rank 64 covers the whole (32-wide) difference
    assert torch.allclose(_peft_delta(tiny_model_dir, out, module), want, atol=1e-4)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == report["rank"]


def test_safedelta_through_realign_calibrates_moments_and_loads_in_peft(tiny_model_dir, tiny_calibration_prompts,
                                                                        tmp_path):
    from conftest import make_peft_adapter

    from salora_merge.cli import main

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "sd"
    result = CliRunner().invoke(main, [
        "realign", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--method", "safedelta",
        "--prompts", str(tiny_calibration_prompts), "--rank", "4", "--max-new-tokens", "5", "--device", "cpu",
        "--scale", "2000", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    adapter_rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    assert report["method"] == "safedelta" and report["lora_rank"] == adapter_rank
    assert 0 < sum(m["accepted"] for m in report["modules"]) / len(report["modules"]) < 0.85
    for m in report["modules"]:
        assert 0.0 <= m["accepted"] <= 0.85 + 1e-9  # the most expensive 15% are never accepted
        assert m["safety_error_after"] <= m["safety_error_before"] + 1e-12
        assert m["energy_kept_by_lora"] == pytest.approx(1.0)  # the result lies in span(lora_B): rank r is exact
    module = report["modules"][0]["module"]
    delta = _peft_delta(tiny_model_dir, out, module)
    assert float(delta.norm()) == pytest.approx(report["modules"][0]["norm_after"], rel=1e-4)
    # a safety module without input moments is refused, naming the fix
    plain = tmp_path / "plain.safetensors"
    assert CliRunner().invoke(main, ["calibrate", "--base", str(tiny_model_dir), "--prompts",
                                     str(tiny_calibration_prompts), "--rank", "4", "--max-new-tokens", "5",
                                     "-o", str(plain)]).exit_code == 0
    bad = CliRunner().invoke(main, ["realign", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                    "--method", "safedelta", "--safety", str(plain), "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "recalibrate with --keep-moments" in bad.output and not (tmp_path / "x").exists()
