"""Method variants of the safety subspace: energy-chosen rank, random control, contrastive bases."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from salora_merge.cli import main
from salora_merge.io.safety_file import load_safety_module
from salora_merge.core.subspace import contrastive_output_basis, energy_total, random_basis, rank_for_energy


def _psd(d: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(decay ** torch.arange(d, dtype=torch.float64)) @ q.T


def test_rank_for_energy_against_the_whole_spectrum():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    assert rank_for_energy(values, 0.5) == 2  # 7/10 >= 0.5, 4/10 < 0.5
    assert rank_for_energy(values[:2], 0.5, total=10.0) == 2
    assert rank_for_energy(values[:2], 0.9, total=10.0) == 2  # cannot reach 90% with the top 2: all of them
    w = torch.randn(6, 9, dtype=torch.float64)
    s = _psd(9, 1)
    assert energy_total(w, s, False, "output") == pytest.approx(float(torch.trace(w @ s @ w.T)), rel=1e-12)


def test_random_basis_is_orthonormal_and_seeded():
    a = random_basis(20, 5, torch.Generator().manual_seed(3))
    assert torch.allclose(a.T @ a, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.equal(a, random_basis(20, 5, torch.Generator().manual_seed(3)))
    assert not torch.allclose(a, random_basis(20, 5, torch.Generator().manual_seed(4)))


def test_contrastive_basis_solves_the_generalized_eigenproblem():
    d, k, ridge = 12, 3, 1e-3
    harmful, benign = _psd(d, 5), _psd(d, 6, decay=0.9)
    basis, values = contrastive_output_basis(harmful, benign, k, ridge)
    assert torch.allclose(basis.T @ basis, torch.eye(k, dtype=torch.float64), atol=1e-10)
    reg = benign + ridge * torch.trace(benign) / d * torch.eye(d, dtype=torch.float64)
    # Independent reference: eigenpairs of reg^{-1} harmful (a non-symmetric dense solve).
    lam, vec = torch.linalg.eig(torch.linalg.solve(reg, harmful))
    order = lam.real.argsort(descending=True)[:k]
    assert torch.allclose(values, lam.real[order], rtol=1e-8)
    reference = torch.linalg.qr(vec.real[:, order])[0]
    # Same span: the projector onto each is the same.
    assert torch.allclose(basis @ basis.T, reference @ reference.T, atol=1e-8)
    # It beats the plain top eigenvectors of the harmful moment on the harmful/benign ratio.
    plain = torch.linalg.eigh(harmful)[1][:, -k:]
    ratio = lambda u: torch.trace(u.T @ harmful @ u) / torch.trace(u.T @ reg @ u)  # noqa: E731
    assert ratio(basis) >= ratio(plain)


def _calibrate(base, prompts, out, *extra):
    return CliRunner().invoke(main, ["calibrate", "--base", str(base), "--prompts", str(prompts), "--rank", "6",
                                     "--max-new-tokens", "6", "--targets", "q_proj,v_proj,down_proj", "-o", str(out),
                                     *extra])


def test_cli_energy_rank_and_contrastive(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "energy.safetensors"
    result = _calibrate(tiny_model_dir, tiny_calibration_prompts, out, "--energy", "0.5", "--keep-moments")
    assert result.exit_code == 0, result.output
    safety = load_safety_module(out)
    weights = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    widths = set()
    for name, basis in safety.bases.items():
        w = weights[f"{name}.weight"].double()
        s = safety.moments[(safety.sites[name], "response")].double()
        spectrum = torch.linalg.eigvalsh(w @ s @ w.T).flip(0).clamp_min(0)
        share = spectrum.cumsum(0) / spectrum.sum()
        k = basis.shape[1]
        widths.add(k)
        assert share[k - 1] >= 0.5 - 1e-6 and (k == 1 or share[k - 2] < 0.5), (name, k, share[:k])
    assert max(widths) <= 6 and safety.metadata["energy"] == 0.5

    benign = tmp_path / "benign.txt"
    benign.write_text("".join(f"Write a short poem about the number {i}.\n" for i in range(10)))
    contrast = tmp_path / "contrast.safetensors"
    result = _calibrate(tiny_model_dir, tiny_calibration_prompts, contrast, "--contrast-prompts", str(benign))
    assert result.exit_code == 0, result.output
    c = load_safety_module(contrast)
    assert c.metadata["method"].startswith("contrastive") and c.metadata["contrast_n_prompts"] == 10
    assert all(b.shape[1] == 6 for b in c.bases.values())
    plain_path = tmp_path / "plain.safetensors"
    assert _calibrate(tiny_model_dir, tiny_calibration_prompts, plain_path).exit_code == 0
    plain = load_safety_module(plain_path)
    distances = {n: float(torch.linalg.matrix_norm(basis @ basis.T - plain.bases[n] @ plain.bases[n].T))
                 for n, basis in c.bases.items()}
    assert max(distances.values()) > 0.5, distances  # the benign prompts move the subspace (the math is above)
    bad = _calibrate(tiny_model_dir, tiny_calibration_prompts, tmp_path / "x.safetensors", "--energy", "1.5")
    assert bad.exit_code == 1 and "--energy must be in (0, 1]" in bad.output
    bad = _calibrate(tiny_model_dir, tiny_calibration_prompts, tmp_path / "x.safetensors", "--side", "input",
                     "--contrast-prompts", str(benign))
    assert bad.exit_code == 1 and "drop --side input" in bad.output


def test_cli_random_control(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    from conftest import make_peft_adapter

    safety = tmp_path / "s.safetensors"
    assert _calibrate(tiny_model_dir, tiny_calibration_prompts, safety).exit_code == 0
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    reports = []
    for name in ("a", "b"):
        result = CliRunner().invoke(main, ["realign", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                           "--safety", str(safety), "--method", "random", "--seed", "7",
                                           "-o", str(tmp_path / name), "--json"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    real = CliRunner().invoke(main, ["realign", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                     "--safety", str(safety), "-o", str(tmp_path / "real"), "--json"])
    real_report = json.loads(real.stdout)
    assert reports[0]["modules"] == reports[1]["modules"]  # seeded
    assert "random control (seed 7)" in reports[0]["safety"]
    removed = [m["energy_removed"] for m in reports[0]["modules"]]
    assert removed != [m["energy_removed"] for m in real_report["modules"]]
    for m in reports[0]["modules"]:  # same sizes as the safety module's bases
        assert m["safety_rank"] == 6 and 0 < m["energy_removed"] < 1


def test_cli_both_sides(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    """--input-safety: B' = C B and A' = A (I - V V^T); the update then leaves U_s^T W x unchanged and
    vanishes on span(V), and the report gives the energy removed by both together."""
    from safetensors.torch import load_file

    from conftest import make_peft_adapter

    outer, inner = tmp_path / "out.safetensors", tmp_path / "in.safetensors"
    assert _calibrate(tiny_model_dir, tiny_calibration_prompts, outer).exit_code == 0
    assert _calibrate(tiny_model_dir, tiny_calibration_prompts, inner, "--side", "input").exit_code == 0
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    result = CliRunner().invoke(main, ["realign", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                       "--safety", str(outer), "--input-safety", str(inner),
                                       "-o", str(tmp_path / "both"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["side"] == "both"
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "both" / "adapter_model.safetensors"))
    u_s, v = load_safety_module(outer), load_safety_module(inner)
    for m in report["modules"]:
        name = m["module"]
        key = f"base_model.model.{name}"
        dw0 = before[f"{key}.lora_B.weight"].double() @ before[f"{key}.lora_A.weight"].double()
        dw = after[f"{key}.lora_B.weight"].double() @ after[f"{key}.lora_A.weight"].double()
        u, vv = u_s.bases[name].double(), v.bases[name].double()
        assert (u.T @ dw).abs().max() < 1e-6 * dw0.abs().max()
        assert (dw @ vv).abs().max() < 1e-6 * dw0.abs().max()
        # Dense reference: (I - U U^T) dW0 (I - V V^T).
        want = (dw0 - u @ (u.T @ dw0)) - (dw0 - u @ (u.T @ dw0)) @ vv @ vv.T
        assert torch.allclose(dw, want, atol=1e-6 * dw0.abs().max().item())
        assert m["energy_removed"] == pytest.approx(1 - float(dw.norm() ** 2 / dw0.norm() ** 2), abs=1e-6)
    wrong = CliRunner().invoke(main, ["realign", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                      "--safety", str(outer), "--input-safety", str(outer), "-o", str(tmp_path / "x")])
    assert wrong.exit_code == 1 and "must be an input-side module" in wrong.output
    assert not (tmp_path / "x").exists()
