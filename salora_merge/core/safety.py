"""The safety module: per-module safety bases, how they were computed, and derivation from moments."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from salora_merge.core.subspace import (
    energy_total,
    input_basis,
    output_basis,
    output_basis_from_output_moment,
    random_basis,
    rank_for_energy,
)
from salora_merge.errors import SafetyModuleError

__all__ = ["SIDES", "SafetyModule", "compute_safety_bases", "random_control", "check_same_base"]

SIDES = ("output", "input")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SafetyModule:
    """Orthonormal safety bases per target module.

    ``side == "output"``: ``bases[m]`` is ``U_s``, ``(d_out, r_s)``, and an adapter is made to leave
    ``U_s^T W x`` unchanged (``B' = B - U_s U_s^T B``). ``side == "input"``: ``bases[m]`` is ``V``,
    ``(d_in, r_s)``, and the adapter is made to vanish on ``span(V)`` (``A' = A - A V V^T``).
    """

    bases: Mapping[str, torch.Tensor]
    eigenvalues: Mapping[str, torch.Tensor]
    side: str
    metadata: Mapping[str, Any]
    sites: Mapping[str, str] = field(default_factory=dict)  # module -> input site
    moments: Mapping[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (site, statistic)
    counts: Mapping[tuple[str, str], int] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.metadata.get("rank", 0))


def compute_safety_bases(
    weights: Mapping[str, torch.Tensor],
    moments: Mapping[str, torch.Tensor],
    rank: int,
    side: str = "output",
    output_moments: frozenset[str] = frozenset(),
    energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Safety bases for every module from its weight ``(d_out, d_in)`` and input second moment.

    ``ranks`` overrides ``rank`` per module (a layer smaller than the rank gets its own size).
    Modules named in ``output_moments`` carry the output moment ``W S W^T`` instead of ``S``
    (output side only). With ``energy``, each module keeps the fewest directions that capture that share
    of its whole spectrum (``rank`` is then the cap). Returns float32 bases and float64 eigenvalues,
    keyed like ``weights``.
    """
    if output_moments and side != "output":
        raise ValueError("output moments only determine output-side bases")
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    bases, values = {}, {}
    for name, weight in weights.items():
        k = (ranks or {}).get(name, rank)
        if name in output_moments:
            basis, eig = output_basis_from_output_moment(moments[name], k)
        elif side == "output":
            basis, eig = output_basis(weight, moments[name], k)
        else:
            basis, eig = input_basis(moments[name], k)
        if energy is not None:
            total = energy_total(weight, moments[name], name in output_moments, side)
            k = rank_for_energy(eig, energy, total)
            basis, eig = basis[:, :k], eig[:k]
        bases[name] = basis.to(torch.float32).contiguous()
        values[name] = eig
    return bases, values


def random_control(safety: SafetyModule, seed: int = 0) -> SafetyModule:
    """The same module with every basis replaced by a random orthonormal one of the same shape (seeded per
    module name): the control a safety basis must beat in any evaluation."""
    bases = {}
    for name, basis in safety.bases.items():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bases[name] = random_basis(basis.shape[0], basis.shape[1], generator).to(torch.float32).contiguous()
    metadata = {**safety.metadata, "method": f"random control (seed {seed}) of: {safety.metadata.get('method')}",
                "random_control_seed": seed}
    return SafetyModule(bases=bases, eigenvalues={n: torch.zeros(b.shape[1], dtype=torch.float64)
                                                  for n, b in bases.items()},
                        side=safety.side, metadata=metadata, sites=dict(safety.sites))


def check_same_base(safety: SafetyModule, fingerprint: str, base_label: str, source: str) -> None:
    """Refuse a safety module computed for another base model."""
    expected = safety.metadata.get("base_fingerprint")
    if expected != fingerprint:
        raise SafetyModuleError(
            f"{source}: this safety module was computed for base model "
            f"{safety.metadata.get('base_model')!r} (weights fingerprint {str(expected)[:12]}), not for "
            f"{base_label!r} (fingerprint {fingerprint[:12]}); recompute it with salora-merge calibrate"
        )
