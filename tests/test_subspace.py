"""Invariants of the pure math on seeded random tensors, checked against dense float64 references."""

from __future__ import annotations

import pytest
import torch

from salora_merge.core.projection import project_lora_A, project_lora_B, subspace_energy_fraction, update_norm_sq
from salora_merge.core.subspace import input_basis, output_basis, rank_for_energy


def _data(d_out, d_in, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(d_in, n, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, d_in, dtype=torch.float64)[:, None]
    return w, x


@pytest.mark.parametrize("d_out,d_in", [(24, 40), (40, 24), (32, 32)])
def test_output_basis_matches_dense_svd_of_output_features(d_out, d_in):
    w, x = _data(d_out, d_in, 200)
    rank = 6
    u, values = output_basis(w, x @ x.T, rank)
    assert u.shape == (d_out, rank)
    assert torch.allclose(u.T @ u, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    # Reference: left singular vectors of W X (method.md section 1), compared as projectors.
    ref_u, ref_s, _ = torch.linalg.svd(w @ x, full_matrices=False)
    ref = ref_u[:, :rank]
    assert torch.allclose(u @ u.T, ref @ ref.T, atol=1e-8)
    assert torch.allclose(values, ref_s[:rank] ** 2, rtol=1e-9)


def test_output_basis_is_deterministic_and_sign_canonical():
    w, x = _data(30, 20, 100, seed=3)
    u1, _ = output_basis(w, x @ x.T, 5)
    u2, _ = output_basis(w.clone(), (x @ x.T).clone(), 5)
    assert torch.equal(u1, u2)
    idx = u1.abs().argmax(dim=0)
    assert (u1[idx, torch.arange(5)] > 0).all()


def test_output_basis_with_fewer_tokens_than_rank_is_still_orthonormal():
    w, x = _data(40, 24, 3)  # S has rank 3 < requested 8; the rest of the basis is completed
    u, values = output_basis(w, x @ x.T, 8)
    assert torch.allclose(u.T @ u, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert (values[3:] < 1e-8 * values[0]).all()


def test_output_basis_rejects_rank_above_dimensions():
    w, x = _data(10, 12, 50)
    with pytest.raises(ValueError, match="rank 11"):
        output_basis(w, x @ x.T, 11)


def test_realign_invariant_idempotence_and_least_change():
    g = torch.Generator().manual_seed(1)
    d_out, d_in, r, rs = 48, 32, 8, 10
    w, x = _data(d_out, d_in, 300)
    u, _ = output_basis(w, x @ x.T, rs)
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    s = 2.0
    b2 = project_lora_B(b, u)
    # U_s^T (W + s B' A) == U_s^T W
    assert torch.allclose(u.T @ (w + s * b2 @ a), u.T @ w, atol=1e-10)
    # Idempotent.
    assert torch.allclose(project_lora_B(b2, u), b2, atol=1e-12)
    # B' A is the orthogonal projection of B A: the residual is orthogonal to the result.
    dw, dw2 = b @ a, b2 @ a
    assert abs(float(((dw - dw2) * dw2).sum())) < 1e-8 * float((dw * dw).sum())


def test_projection_keeps_dtype_and_shape():
    b = torch.randn(16, 4, dtype=torch.bfloat16)
    u, _ = torch.linalg.qr(torch.randn(16, 3, dtype=torch.float64))
    out = project_lora_B(b, u)
    assert out.dtype == torch.bfloat16 and out.shape == b.shape


def test_input_side_projection_makes_update_vanish_on_subspace():
    g = torch.Generator().manual_seed(2)
    _, x = _data(8, 20, 100)
    v, _ = input_basis(x @ x.T, 5)
    a = torch.randn(4, 20, generator=g, dtype=torch.float64)
    b = torch.randn(12, 4, generator=g, dtype=torch.float64)
    a2 = project_lora_A(a, v)
    assert torch.allclose(b @ a2 @ v, torch.zeros(12, 5, dtype=torch.float64), atol=1e-10)


def test_energy_fraction_equals_dense_reference():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(6, 30, generator=g, dtype=torch.float64)
    b = torch.randn(50, 6, generator=g, dtype=torch.float64)
    u, _ = torch.linalg.qr(torch.randn(50, 7, generator=g, dtype=torch.float64))
    dw = b @ a
    reference = float(torch.linalg.norm(u.T @ dw) ** 2 / torch.linalg.norm(dw) ** 2)
    assert subspace_energy_fraction(b, a, u) == pytest.approx(reference, rel=1e-10)
    assert update_norm_sq(b, a) == pytest.approx(float(torch.linalg.norm(dw) ** 2), rel=1e-10)


def test_energy_fraction_reference_points():
    g = torch.Generator().manual_seed(5)
    d_out, d_in, r, k = 400, 64, 8, 20
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=g, dtype=torch.float64))
    a = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    # Random update: about k / d_out.
    fractions = [subspace_energy_fraction(torch.randn(d_out, r, generator=g, dtype=torch.float64), a, u) for _ in range(20)]
    assert sum(fractions) / len(fractions) == pytest.approx(k / d_out, rel=0.25)
    # Inside the subspace: 1. Orthogonal to it: 0.
    inside = u @ torch.randn(k, r, generator=g, dtype=torch.float64)
    assert subspace_energy_fraction(inside, a, u) == pytest.approx(1.0, abs=1e-10)
    outside = project_lora_B(torch.randn(d_out, r, generator=g, dtype=torch.float64), u)
    assert subspace_energy_fraction(outside, a, u) == pytest.approx(0.0, abs=1e-12)
    assert subspace_energy_fraction(torch.zeros(d_out, r, dtype=torch.float64), a, u) == 0.0


def test_rank_for_energy():
    values = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert rank_for_energy(values, 0.5) == 1
    assert rank_for_energy(values, 0.8) == 2
    assert rank_for_energy(values, 1.0) == 4
    with pytest.raises(ValueError):
        rank_for_energy(values, 0.0)
