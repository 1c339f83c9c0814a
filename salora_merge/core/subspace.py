"""Safety subspaces from second moments: pure functions over tensors, no I/O.

Notation (per linear layer): ``W`` is ``(d_out, d_in)``; ``S = sum_i x_i x_i^T`` is the uncentred
second moment of the layer's inputs at the calibration positions, ``(d_in, d_in)``. The output-side
safety basis ``U_s`` holds the top ``r_s`` eigenvectors of ``W S W^T``, i.e. the top left singular
vectors of the output features ``W X`` (method.md section 1).
"""

from __future__ import annotations

import torch

__all__ = [
    "output_basis",
    "output_basis_from_output_moment",
    "input_basis",
    "rank_for_energy",
    "energy_total",
    "random_basis",
    "contrastive_output_basis",
]


def _canonical_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each column so that its largest-magnitude entry is positive (deterministic output)."""
    idx = vectors.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(vectors[idx, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs


def _top_eigh(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenpairs of a symmetric matrix, largest first. Returns ``(vectors, values)``."""
    sym = (matrix + matrix.T) * 0.5  # remove round-off asymmetry before the exact solver
    values, vectors = torch.linalg.eigh(sym)  # ascending
    values = values.flip(0)[:rank]
    vectors = vectors.flip(1)[:, :rank]
    return vectors, values.clamp_min(0.0)


def _complete_orthonormal(basis: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """Extend an orthonormal ``(dim, k)`` basis to ``(dim, rank)`` with deterministic directions."""
    if basis.shape[1] >= rank:
        return basis
    eye = torch.eye(dim, dtype=basis.dtype, device=basis.device)
    rest = eye - basis @ basis.T  # projector onto the complement, (dim, dim)
    q, r = torch.linalg.qr(rest)
    # Columns of q with the largest |diag r| span the complement best.
    order = r.diagonal().abs().argsort(descending=True)[: rank - basis.shape[1]]
    return torch.cat([basis, q[:, order]], dim=1)


def output_basis(
    weight: torch.Tensor, second_moment: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``rank`` eigenvectors of ``W S W^T``: the output-side safety basis ``U_s``.

    Args:
        weight: ``(d_out, d_in)`` layer weight.
        second_moment: ``(d_in, d_in)`` symmetric positive semi-definite ``S``.
        rank: ``r_s``, at most ``min(d_out, d_in)``.

    Returns:
        ``(U_s, eigenvalues)``: ``(d_out, rank)`` with orthonormal columns and ``(rank,)``
        descending, both float64. Exact (``eigh``), deterministic up to canonical signs.
        When ``d_out > d_in`` the same eigenvectors are obtained on the smaller ``d_in`` side:
        with ``S = L L^T``, ``W S W^T = M M^T`` for ``M = W L``, whose left singular vectors are
        ``M v / sqrt(mu)`` for the eigenpairs ``(mu, v)`` of ``M^T M``.
    """
    d_out, d_in = weight.shape
    if second_moment.shape != (d_in, d_in):
        raise ValueError(
            f"second moment has shape {tuple(second_moment.shape)}, expected ({d_in}, {d_in})"
        )
    if not 0 < rank <= min(d_out, d_in):
        raise ValueError(f"rank {rank} must be between 1 and min(d_out, d_in) = {min(d_out, d_in)}")
    w = weight.to(torch.float64)
    s = second_moment.to(torch.float64)
    if d_out <= d_in:
        vectors, values = _top_eigh(w @ s @ w.T, rank)  # (d_out, d_out) problem
    else:
        s_vals, s_vecs = torch.linalg.eigh((s + s.T) * 0.5)
        root = s_vecs * s_vals.clamp_min(0.0).sqrt()  # L, (d_in, d_in), S = L L^T
        m = w @ root  # (d_out, d_in)
        v, values = _top_eigh(m.T @ m, rank)  # (d_in, rank)
        tol = values.max().clamp_min(1e-300) * max(d_out, d_in) * torch.finfo(torch.float64).eps
        keep = values > tol
        vectors = (m @ v[:, keep]) / values[keep].sqrt()
        # Re-orthonormalise against round-off; the span is unchanged.
        vectors, _ = torch.linalg.qr(vectors)
        vectors = _complete_orthonormal(vectors, d_out, rank)
    return _canonical_signs(vectors), values


def output_basis_from_output_moment(output_moment: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``rank`` eigenvectors of an accumulated output moment ``sum y y^T = W S W^T``, ``(d_out, d_out)``.

    The same basis as ``output_basis(W, S, rank)`` when ``y = W x`` was accumulated instead of ``x``.
    """
    d_out = output_moment.shape[0]
    if not 0 < rank <= d_out:
        raise ValueError(f"rank {rank} must be between 1 and d_out = {d_out}")
    vectors, values = _top_eigh(output_moment.to(torch.float64), rank)
    return _canonical_signs(vectors), values


def input_basis(second_moment: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``rank`` eigenvectors of ``S`` itself: the dominant input directions ``V``, ``(d_in, rank)``.

    Used by input-side projection (``dW' = dW (I - V V^T)``), which makes an update vanish on
    the calibration inputs.
    """
    d_in = second_moment.shape[0]
    if not 0 < rank <= d_in:
        raise ValueError(f"rank {rank} must be between 1 and d_in = {d_in}")
    vectors, values = _top_eigh(second_moment.to(torch.float64), rank)
    return _canonical_signs(vectors), values


def rank_for_energy(eigenvalues: torch.Tensor, fraction: float, total: float | None = None) -> int:
    """Smallest ``k`` whose top-``k`` eigenvalues hold at least ``fraction`` of the total energy.

    ``total`` is the whole spectrum's sum (a trace) when ``eigenvalues`` holds only the top part; if the
    given eigenvalues cannot reach ``fraction`` of it, all of them are used.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"energy fraction must be in (0, 1], got {fraction}")
    values = eigenvalues.to(torch.float64).clamp_min(0.0)
    denominator = float(values.sum()) if total is None else float(total)
    if denominator <= 0:
        return 1
    cumulative = values.cumsum(0) / denominator
    return min(int((cumulative < fraction - 1e-12).sum().item()) + 1, int(values.numel()))


def energy_total(weight: torch.Tensor | None, moment: torch.Tensor, output_moment: bool, side: str) -> float:
    """The whole spectrum's sum, ``tr(W S W^T) = sum(S * (W^T W))`` (or ``tr`` of the given moment)."""
    m = moment.to(torch.float64)
    if output_moment or side == "input" or weight is None:
        return float(torch.diagonal(m).sum())
    w = weight.to(torch.float64)
    return float((m * (w.T @ w)).sum())


def random_basis(dim: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random ``(dim, rank)`` orthonormal basis (QR of a Gaussian matrix, signs fixed): the
    control a safety basis must beat."""
    q, r = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).clamp_min(0).mul(2).sub(1)


def contrastive_output_basis(harmful: torch.Tensor, benign: torch.Tensor, rank: int, ridge: float = 1e-3
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Output directions strong on harmful inputs and weak on benign ones: the generalized eigenproblem
    ``M_h u = lambda (M_b + eps I) u`` for per-token output moments ``M = W S W^T / N``.

    ``eps = ridge * tr(M_b) / d`` keeps the benign side invertible. The top ``rank`` generalized
    eigenvectors are not orthogonal; the returned basis is an orthonormal basis of their span (QR), with
    the generalized eigenvalues, largest first.
    """
    h = harmful.to(torch.float64)
    b = benign.to(torch.float64)
    d = h.shape[0]
    if not 0 < rank <= d:
        raise ValueError(f"rank {rank} must be between 1 and d_out = {d}")
    b = (b + b.T) * 0.5
    b = b + ridge * float(torch.diagonal(b).sum()) / d * torch.eye(d, dtype=torch.float64)
    values_b, vectors_b = torch.linalg.eigh(b)
    inv_root = vectors_b * values_b.clamp_min(1e-300).rsqrt()  # B^{-1/2} up to rotation: inv_root^T B inv_root = I
    whitened = inv_root.T @ ((h + h.T) * 0.5) @ inv_root
    y, values = _top_eigh(whitened, rank)
    directions = inv_root @ y  # generalized eigenvectors, (d, rank)
    basis, _ = torch.linalg.qr(directions)
    return _canonical_signs(basis), values
