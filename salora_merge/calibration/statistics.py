"""The statistics pass: calibration sequences batched, run through the model with the moment hooks, and the
second moments per input site summed (over processes too, under torchrun)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

import salora_merge.parallel as parallel
from salora_merge.core.moments import MaskSlot, MomentAccumulator, group_modules_by_input, record_moments, token_masks
from salora_merge.hf.loading import input_device
from salora_merge.hf.layers import output_layer_name, weight_matrix
from salora_merge.progress import Progress, silent

__all__ = ["build_sequences", "batch_tensors", "length_sorted_batches", "backbone_of", "accumulate_moments"]


def build_sequences(
    prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]] | None, max_length: int
) -> list[tuple[list[int], int]]:
    """``(token ids, prompt length)`` per example, cut to ``max_length`` tokens."""
    out = []
    for i, prompt in enumerate(prompt_ids):
        ids = list(prompt) + (list(response_ids[i]) if response_ids is not None else [])
        out.append((ids[:max_length], min(len(prompt), max_length)))
    return out


def batch_tensors(
    sequences: Sequence[tuple[list[int], int | list[bool]]], pad: int, policies: Sequence[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Right-padded ``(B, T)`` ids and attention mask, and the token-policy masks, for one batch.

    Each sequence is ``(ids, prompt_length)``, or ``(ids, response_mask)`` with one bool per token.
    """
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, _) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    if all(isinstance(p, int) for _, p in sequences):
        masks = token_masks([p for _, p in sequences], [len(ids) for ids, _ in sequences], width, policies)
    else:  # explicit per-token masks of the learned (response) tokens, e.g. multi-turn training data
        if tuple(policies) != ("response",):
            raise ValueError("explicit token masks only define the 'response' policy")
        response = torch.zeros((len(sequences), width), dtype=torch.bool)
        for row, (_, mask) in enumerate(sequences):
            response[row, : len(mask)] = torch.tensor(mask, dtype=torch.bool)
        masks = {"response": response}
    # Masks go to the device once per batch, not once per hooked layer.
    return input_ids.to(device), attention.to(device), {k: m.to(device) for k, m in masks.items()}


def length_sorted_batches(sequences: Sequence[tuple[list[int], int]], batch_size: int) -> list[list[tuple[list[int], int]]]:
    """Batches of similar length (less padding); the sums do not depend on the order."""
    ordered = sorted(sequences, key=lambda item: len(item[0]))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the output layer (its logits are not needed for statistics)."""
    return getattr(model, model.base_model_prefix, model)


PROBE_TOKENS = 16


@torch.no_grad()
def accumulate_moments(
    model: torch.nn.Module,
    modules: dict[str, torch.nn.Module],
    sequences: Sequence[tuple[list[int], int]],
    policies: Sequence[str],
    batch_size: int,
    pad: int,
    dtype: torch.dtype = torch.float64,
    progress: Progress = silent,
    allow_output_moments: bool = False,
    experts: Mapping[str, torch.nn.Module] | None = None,
    expert_sites: Mapping[str, int] | None = None,
) -> tuple[dict[str, list[str]], MomentAccumulator, frozenset[str]]:
    """Stream ``sequences`` through the model and accumulate second moments per input site.

    With ``allow_output_moments``, a site read by a single module with ``d_out < d_in`` accumulates
    the module's output moment ``W S W^T`` instead of ``S`` (enough for output-side bases, and
    cheaper). ``expert_sites`` (site -> d_in): experts' matrices (``expert_site`` names) of the fused-experts
    modules ``experts``, fed the tokens routed to each. Returns the sites (``{site: [modules reading that
    input]}``), the filled accumulator and the set of output-moment sites.
    """
    device = input_device(model)
    backbone = backbone_of(model)
    batches = length_sorted_batches(sequences, batch_size)
    probe_ids, probe_attention, _ = batch_tensors(batches[0][:1], pad, policies, device)
    # Which modules share an input does not depend on the length: the probe runs the first 16 tokens only.
    probe_ids, probe_attention = probe_ids[:, :PROBE_TOKENS], probe_attention[:, :PROBE_TOKENS]
    # The output layer (lm_head, tied or not) reads the backbone's last hidden state: taken from there, so no
    # logits are computed.
    head = output_layer_name(model)
    from_output = {head: backbone} if head in modules and backbone is not model else {}
    groups = group_modules_by_input(
        {n: m for n, m in modules.items() if n not in from_output},
        lambda: backbone(input_ids=probe_ids, attention_mask=probe_attention, use_cache=False)
    ) if modules else {}
    groups.update({n: [n] for n in from_output})
    shapes = {site: tuple(weight_matrix(modules[site]).shape) for site in groups}  # (d_out, d_in)
    output_sites = frozenset(
        site for site, members in groups.items()
        if allow_output_moments and len(members) == 1 and shapes[site][0] < shapes[site][1]
        and (isinstance(modules[site], torch.nn.Linear) or type(modules[site]).__name__ == "Conv1D")  # y = W x
    )
    dims = {site: shapes[site][0] if site in output_sites else shapes[site][1] for site in groups}
    dims.update(expert_sites or {})
    accumulator = MomentAccumulator(dims, tuple(policies), dtype, device)
    wanted = {m: e for m, e in (experts or {}).items() if any(n.startswith(f"{m}.") for n in expert_sites or {})}
    slot = MaskSlot()
    with progress("accumulating second moments", len(sequences)) as advance:
        with record_moments({site: modules[site] for site in groups}, accumulator, slot, output_sites, from_output,
                            wanted):
            for batch in batches:
                input_ids, attention, slot.masks = batch_tensors(batch, pad, policies, device)
                backbone(input_ids=input_ids, attention_mask=attention, use_cache=False)
                advance(len(batch))
    groups.update({n: [n] for n in expert_sites or {}})
    if parallel.world_size() > 1:  # one all-reduce per site and statistic (float64), and one for the counts
        keys = sorted(accumulator.sums)
        for key in keys:
            parallel.all_reduce_sum_(accumulator.sums[key])
        counts = parallel.all_reduce_sum_(torch.tensor([accumulator.counts[k] for k in keys], dtype=torch.int64))
        accumulator.counts.update({k: int(c) for k, c in zip(keys, counts)})
    return groups, accumulator, output_sites
