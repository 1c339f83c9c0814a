"""Streamed second moments of layer inputs through forward pre-hooks.

Hooks live only inside ``record_moments`` (removed in ``finally``); they add ``X^T X`` of the
selected token positions to per-site accumulators and never keep activations, so memory does not
grow with the number of calibration tokens. Layers that read the same tensor (q/k/v, gate/up)
share one site and one accumulator.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from salora_merge.errors import InputError

__all__ = [
    "TOKEN_POLICIES",
    "token_masks",
    "MomentAccumulator",
    "symmetric_gram",
    "MaskSlot",
    "masked_rows",
    "expert_site",
    "routed_expert_inputs",
    "expert_output",
    "record_moments",
    "group_modules_by_input",
]

TOKEN_POLICIES = ("response", "prompt", "last_prompt", "all")


def token_masks(
    prompt_lengths: Sequence[int], lengths: Sequence[int], width: int, policies: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Boolean ``(B, width)`` masks, one per token policy, for right-padded sequences.

    Row ``b`` holds ``prompt_lengths[b]`` prompt tokens, then response tokens up to ``lengths[b]``,
    then padding (never selected).
    """
    positions = torch.arange(width).unsqueeze(0)  # (1, T)
    p = torch.tensor(list(prompt_lengths)).unsqueeze(1)  # (B, 1)
    n = torch.tensor(list(lengths)).unsqueeze(1)  # (B, 1)
    masks = {}
    for policy in policies:
        if policy == "response":
            masks[policy] = (positions >= p) & (positions < n)
        elif policy == "prompt":
            masks[policy] = positions < p
        elif policy == "last_prompt":
            masks[policy] = positions == (p - 1)
        elif policy == "all":
            masks[policy] = positions < n
        else:
            raise ValueError(f"unknown token policy {policy!r}; expected one of {TOKEN_POLICIES}")
    return masks


def _blocks(d: int, blocks: int = 4) -> list[tuple[int, int]]:
    """Column ranges of the blocked symmetric product (one range below 256 features, where blocking does not pay)."""
    if d < 256:
        return [(0, d)]
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _mirror_upper(out: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Fill the blocks below the diagonal blocks from those above them (in place)."""
    for lo, hi in spans:
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


def symmetric_gram(rows: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``rows^T rows`` for ``rows: (N, d)``, computing only the upper block triangle (a blocked SYRK).

    About 1.4x faster than one full GEMM on CPU for ``d`` in the hundreds to thousands; exact up to
    float round-off (each block is one GEMM); the basis solver symmetrizes before eigh.
    """
    spans = _blocks(rows.shape[1], blocks)
    out = torch.empty(rows.shape[1], rows.shape[1], dtype=rows.dtype, device=rows.device)
    for lo, hi in spans:
        out[lo:hi, lo:].addmm_(rows[:, lo:hi].T, rows[:, lo:], beta=0)
    return _mirror_upper(out, spans)


@dataclass
class MomentAccumulator:
    """``S[site, statistic] = sum_i x_i x_i^T`` and the token count, accumulated in ``dtype``.

    Each batch's product is one blocked SYRK in the rows' precision (float32 for half or single precision
    activations, float64 for float64) written into a reusable scratch matrix; its upper block triangle is
    added to the running sum in ``dtype``, and the lower blocks are mirrored once, when ``sums`` is read.
    Nothing is allocated per batch but the selected rows.
    """

    dims: Mapping[str, int]  # site -> d_in
    statistics: tuple[str, ...]
    dtype: torch.dtype = torch.float64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    counts: dict[tuple[str, str], int] = field(init=False)
    _totals: dict[tuple[str, str], torch.Tensor] = field(init=False, repr=False)
    _unmirrored: set[tuple[str, str]] = field(init=False, repr=False)
    _scratch: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # a sum is allocated by its first batch (a copy, no zero fill); a site no batch reached reads as zeros
        self._totals = {}
        self.counts = {(site, stat): 0 for site in self.dims for stat in self.statistics}
        self._unmirrored = set()
        self._scratch = {}

    @property
    def sums(self) -> dict[tuple[str, str], torch.Tensor]:
        """The full symmetric sums, ``{(site, statistic): (d, d)}``, completed from their upper block triangles."""
        for site, stat in self.counts:
            if (site, stat) not in self._totals:
                d = self.dims[site]
                self._totals[(site, stat)] = torch.zeros(d, d, dtype=self.dtype, device=self.device)
        for key in self._unmirrored:
            _mirror_upper(self._totals[key], _blocks(self._totals[key].shape[0]))
        self._unmirrored.clear()
        return self._totals

    def add(self, site: str, statistic: str, rows: torch.Tensor) -> None:
        """Add ``rows^T rows`` for ``rows`` of shape ``(N, d_in)``."""
        if rows.shape[0] == 0:
            return
        rows = rows.to(torch.float32) if rows.dtype != torch.float64 else rows
        key = (site, statistic)
        d = rows.shape[1]
        if d != self.dims[site]:
            raise ValueError(f"site {site}: rows of width {d}, expected {self.dims[site]}")
        total = self._totals.get(key)
        first = total is None
        if first:  # accumulated where the layer runs (device maps); the lower blocks are filled by the mirror
            total = self._totals[key] = torch.empty(d, d, dtype=self.dtype, device=rows.device)
        scratch = self._scratch.get((d, rows.dtype, rows.device))
        if scratch is None:
            scratch = self._scratch[(d, rows.dtype, rows.device)] = torch.empty(
                d, d, dtype=rows.dtype, device=rows.device)
        for lo, hi in _blocks(d):
            block = scratch[lo:hi, lo:].addmm_(rows[:, lo:hi].T, rows[:, lo:], beta=0)
            if first:
                total[lo:hi, lo:].copy_(block)
            else:
                total[lo:hi, lo:] += block
        self._unmirrored.add(key)
        self.counts[key] += int(rows.shape[0])


def masked_rows(x: torch.Tensor, mask: torch.Tensor, site: str = "layer",
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of a layer input ``x: (..., d)`` at the selected token positions of ``mask: (B, T)``.

    ``x`` may keep the batch and token axes (``(B, T, d)``) or flatten them in order (``(B * T, d)``, as OPT's
    decoder and the MoE blocks' shared experts do); the mask is flattened the same way, so exactly the selected
    tokens are counted. Any other leading shape (a layer that sees only some of the tokens) cannot be matched to
    the mask and is an error naming the site, never a silent skip. ``positions`` (the flat indices of the mask's
    selected tokens, on ``x``'s device) replaces the boolean indexing by one gather.
    """
    lead = tuple(x.shape[:-1])
    if len(lead) >= 1 and x.shape[:-1].numel() == mask.numel():
        if positions is not None:
            return x.reshape(-1, x.shape[-1]).index_select(0, positions)
        return x[mask] if lead == tuple(mask.shape) else x.reshape(-1, x.shape[-1])[mask.reshape(-1)]
    raise InputError(f"layer {site}: its input has {tuple(x.shape)} (tokens, features) where the batch is "
                     f"{tuple(mask.shape)}; a layer that sees only some of the tokens (a routed expert) cannot be "
                     "calibrated by token masks")


EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def expert_site(module: str, param: str, expert: int) -> str:
    """The name of one expert's matrix of a fused expert parameter (a site, a safety basis, an audited module)."""
    return f"{module}.{param}[{expert}]"


def routed_expert_inputs(hidden: torch.Tensor, top_k_index: torch.Tensor, gate_up: torch.Tensor,
                         act: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per expert that receives tokens: ``(token indices, gate_up_proj's input rows, down_proj's input rows)``.

    The fused-expert MoE pattern (Mixtral, Qwen2/3-MoE in transformers 5): expert ``e`` sees the tokens routed to
    it, ``gate, up = (x W_gu[e]^T).chunk(2)`` and ``down_proj`` reads ``act(gate) * up``. ``hidden: (N, d)``,
    ``top_k_index: (N, k)``, ``gate_up: (E, 2F, d)``."""
    out = {}
    for e in range(gate_up.shape[0]):
        idx = (top_k_index == e).any(-1).nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        x = hidden[idx]
        gate, up = torch.nn.functional.linear(x, gate_up[e]).chunk(2, dim=-1)
        out[e] = (idx, x, act(gate) * up)
    return out


def expert_output(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                  gate_up: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
                  ) -> torch.Tensor:
    """The experts' output under that pattern (``sum`` over each token's experts of weight * down(act * up)):
    the check that a model's experts compute what the routed inputs above assume."""
    out = torch.zeros_like(hidden)
    for e, (idx, _, inter) in routed_expert_inputs(hidden, top_k_index, gate_up, act).items():
        weight = (top_k_weights[idx] * (top_k_index[idx] == e)).sum(-1, keepdim=True)
        out.index_add_(0, idx, (torch.nn.functional.linear(inter, down[e]) * weight).to(out.dtype))
    return out


@dataclass
class MaskSlot:
    """The token masks of the batch being run, on the model's device, set before each forward pass."""

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    _positions: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False)

    def positions(self, statistic: str, device: torch.device) -> torch.Tensor:
        """The flat indices of the selected tokens of ``masks[statistic]`` on ``device``, found once per batch and
        device rather than once per hooked layer."""
        mask = self.masks[statistic]
        cached = self._positions.get((statistic, device))
        if cached is None or cached[0] is not mask:
            cached = self._positions[(statistic, device)] = (mask, mask.reshape(-1).nonzero().squeeze(1).to(device))
        return cached[1]


@contextmanager
def record_moments(
    site_modules: Mapping[str, nn.Module],
    accumulator: MomentAccumulator,
    slot: MaskSlot,
    output_sites: frozenset[str] = frozenset(),
    input_from_output: Mapping[str, nn.Module] | None = None,
    experts: Mapping[str, nn.Module] | None = None,
) -> Iterator[None]:
    """Accumulate second moments at the masked positions while inside; hooks removed on exit.

    A site in ``input_from_output`` takes its input from another module's output (its first element when a
    tuple or model output): the output layer's input is the backbone's last hidden state, so the statistics
    need no logits.

    ``experts`` (module name -> a fused-experts module, called as ``(hidden, top_k_index, top_k_weights)``):
    each expert's matrices are sites of their own (:func:`expert_site`), fed the rows of the tokens routed to
    it; the first call checks that the module computes the pattern those rows assume.

    For most sites the statistic is the module's input ``x``. For sites in ``output_sites`` it is the
    module's output without bias, ``y = W x``, whose second moment ``sum y y^T = W S W^T`` is all the
    output-side basis needs; it is cheaper when ``d_out < d_in`` (for Llama's ``down_proj``, 576^2
    instead of 1536^2 per token).
    """
    handles = []

    def add(site: str, x: torch.Tensor) -> None:
        for statistic, mask in slot.masks.items():
            accumulator.add(site, statistic, masked_rows(x, mask, site, slot.positions(statistic, x.device)))

    def make_pre_hook(site: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            add(site, args[0])  # (B, T, d_in), or (B * T, d_in) where the model flattens the tokens (OPT)

        return hook

    def make_post_hook(site: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            bias = getattr(module, "bias", None)
            add(site, output - bias if bias is not None else output)  # (B, T, d_out)

        return hook

    def make_output_hook(site: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output) -> None:
            add(site, output[0] if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple") else output)

        return hook

    def make_expert_hook(name: str, module: nn.Module) -> Callable:
        wanted = {(p, e) for p in EXPERT_PARAMS for e in range(getattr(module, p).shape[0])
                  if (expert_site(name, p, e), next(iter(accumulator.statistics))) in accumulator.sums}
        checked = []

        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            hidden, top_k_index, top_k_weights = args[:3]
            if not checked:
                expected = expert_output(hidden, top_k_index, top_k_weights, mod.gate_up_proj, mod.down_proj,
                                         mod.act_fn)
                scale = float(expected.abs().max()) or 1.0
                if not torch.allclose(output.to(expected.dtype), expected, atol=1e-4 * scale, rtol=1e-3):
                    raise InputError(f"layer {name}: {type(mod).__name__} does not compute the fused-expert pattern "
                                     "(gate_up_proj, act, down_proj) salora-merge calibrates its experts through")
                checked.append(True)
            routed = routed_expert_inputs(hidden, top_k_index, mod.gate_up_proj, mod.act_fn)
            for e, (idx, x, inter) in routed.items():
                for statistic, mask in slot.masks.items():
                    keep = mask.reshape(-1)[idx]
                    for param, rows in (("gate_up_proj", x), ("down_proj", inter)):
                        if (param, e) in wanted:
                            accumulator.add(expert_site(name, param, e), statistic, rows[keep])

        return hook

    try:
        for name, module in (experts or {}).items():
            handles.append(module.register_forward_hook(make_expert_hook(name, module)))
        for site, module in site_modules.items():
            if input_from_output and site in input_from_output:
                handles.append(input_from_output[site].register_forward_hook(make_output_hook(site)))
            elif site in output_sites:
                handles.append(module.register_forward_hook(make_post_hook(site)))
            else:
                handles.append(module.register_forward_pre_hook(make_pre_hook(site)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def group_modules_by_input(
    modules: Mapping[str, nn.Module], run_forward: Callable[[], None]
) -> dict[str, list[str]]:
    """Group modules that receive the very same input tensor, by running one small forward pass.

    Returns ``{site: [module names]}`` with the site named after its first module (in the order of
    ``modules``). Modules not called by the forward pass get a site of their own.
    """
    seen: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {}
    # Every probed input stays referenced until grouping is done: otherwise a freed activation's
    # address is reused by a later layer's input and unrelated layers would look like one site.
    alive: list[torch.Tensor] = []
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in seen:
                x = args[0]
                alive.append(x)
                seen[name] = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(make_hook(name)))
        run_forward()
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[object, list[str]] = {}
    for name in modules:
        key = seen.get(name, name)
        groups.setdefault(key, []).append(name)
    alive.clear()
    return {members[0]: members for members in groups.values()}
