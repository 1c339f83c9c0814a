"""Calibration: compute the safety module of a base model from calibration prompts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Mapping

import torch

from salora_merge.core.moments import (
    EXPERT_PARAMS,
    TOKEN_POLICIES,
    expert_site,
)
from salora_merge.core.safety import SIDES, SafetyModule, compute_safety_bases
from salora_merge.core.subspace import contrastive_output_basis
from salora_merge.errors import InputError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.chat_templates import apply_chat_template_choice
from salora_merge.hf.chat_templates import chat_prompt_ids
from salora_merge.hf.layers import expert_modules, output_layer_name, router_modules, linear_modules, weight_matrix
from salora_merge.hf.generation import greedy_responses
from salora_merge.hf.loading import pick_device
from salora_merge.hf.placement import placement_of, placement_problems
from salora_merge.calibration.statistics import (
    accumulate_moments,
    backbone_of,
    batch_tensors,
    build_sequences,
    length_sorted_batches,
)
from salora_merge.calibration.targets import is_default_targets, select_targets, small_layer_ranks, stored_weight
from salora_merge.io.prompts import PromptSet, load_prompt_set
import salora_merge.parallel as parallel
from salora_merge.progress import Progress, silent
from salora_merge.version import __version__

__all__ = [
    "CalibrationOptions",
    "Calibration",
    "calibrate",
    "select_targets",
    "build_sequences",
    "accumulate_moments",
    "batch_tensors",
    "length_sorted_batches",
    "backbone_of",
]

RESPONSE_MODES = ("self", "none", "given")


@dataclass(frozen=True)
class CalibrationOptions:
    prompts: str = "advbench-calibration"
    responses: str = "self"  # self | none | given | path to a file of prompt/response pairs
    rank: int = 32
    side: str = "output"
    targets: tuple[str, ...] | None = None  # module names or suffixes; None = every linear layer
    # Layers smaller than the rank (a router, a gate with d_out = 1): None caps their rank at their size when the
    # targets are the default ones and refuses them when named in --targets; True caps, False refuses.
    cap_small_layers: bool | None = None
    token_policy: str | None = None  # None: "response", or "prompt" with responses=none
    extra_policies: tuple[str, ...] = ()  # more statistics accumulated in the same pass (kept moments)
    keep_moments: bool = False
    max_prompts: int | None = None
    batch_size: int = 16
    generation_batch_size: int = 64  # greedy decoding is latency-bound: wider batches pay off
    max_length: int = 512
    max_new_tokens: int = 64
    device: str = "auto"
    accumulate_dtype: str = "float64"
    energy: float | None = None  # keep the fewest directions capturing this share (rank = the cap)
    contrast: str | None = None  # benign/task prompts: contrastive bases (generalized eigenproblem)
    contrast_ridge: float = 1e-3
    chat_template: str | None = None  # None: the model's own (raw prompt text when it has none); a name or a file
    device_map: str | None = None  # accelerate's big-model loading: auto, balanced, balanced_low_0, sequential
    max_memory: str | None = None  # "0=20GiB,cpu=30GiB"
    offload_folder: str | None = None

    def policy(self) -> str:
        if self.token_policy:
            return self.token_policy
        return "prompt" if self.responses == "none" else "response"

    def validate(self) -> None:
        problems = placement_problems(self.device_map, self.max_memory, self.offload_folder)
        if self.rank <= 0:
            problems.append(f"--rank must be positive, got {self.rank}")
        if self.side not in SIDES:
            problems.append(f"--side must be one of {', '.join(SIDES)}, got {self.side!r}")
        for policy in (self.policy(), *self.extra_policies):
            if policy not in TOKEN_POLICIES:
                problems.append(f"--token-policy {policy!r}: expected one of {', '.join(TOKEN_POLICIES)}")
        if self.responses == "none" and self.policy() == "response":
            problems.append("--responses none leaves no response tokens; use --token-policy prompt, last_prompt or all")
        for name, value in (("--batch-size", self.batch_size), ("--generation-batch-size", self.generation_batch_size),
                            ("--max-length", self.max_length),
                            ("--max-new-tokens", self.max_new_tokens)):
            if value <= 0:
                problems.append(f"{name} must be positive, got {value}")
        if self.max_prompts is not None and self.max_prompts <= 0:
            problems.append(f"--max-prompts must be positive, got {self.max_prompts}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            problems.append(f"--energy must be in (0, 1], got {self.energy}")
        if self.contrast is not None and self.side != "output":
            problems.append("--contrast-prompts gives output-side bases; drop --side input")
        if self.contrast is not None and self.energy is not None:
            problems.append("--energy and --contrast-prompts cannot be combined (generalized eigenvalues are "
                            "not shares of energy)")
        if not 0 < self.contrast_ridge < float("inf"):  # also NaN
            problems.append(f"--contrast-ridge must be positive, got {self.contrast_ridge}")
        if self.accumulate_dtype not in ("float32", "float64"):
            problems.append(f"--accumulate-dtype must be float32 or float64, got {self.accumulate_dtype!r}")
        if problems:
            raise InputError("; ".join(problems))


@dataclass(frozen=True)
class Calibration:
    safety: SafetyModule
    seconds_generate: float
    seconds_forward: float
    n_tokens: int
    capped: Mapping[str, int] = field(default_factory=dict)  # layers smaller than the rank -> the rank they got

    def render(self) -> str:
        s = self.safety
        return (f"Safety module: {len(s.bases)} modules, rank {s.rank}, {s.side} side, from {self.n_tokens} tokens "
                f"(generation {self.seconds_generate:.1f}s, forward passes {self.seconds_forward:.1f}s)")

    def __str__(self) -> str:
        return self.render()



def _load_calibration_set(options: CalibrationOptions) -> PromptSet:
    if options.responses in RESPONSE_MODES:
        prompt_set = load_prompt_set(options.prompts)
        if options.responses == "given" and prompt_set.responses is None:
            raise InputError(f"--responses given: {options.prompts} has no response field; use --responses self")
    else:
        prompt_set = load_prompt_set(options.responses)  # a file of prompt/response pairs
        if prompt_set.responses is None:
            raise InputError(f"--responses {options.responses}: the file has no 'response' field for its prompts")
    return prompt_set.head(options.max_prompts)




def _responses(model, tokenizer, prompt_ids, prompt_set: PromptSet, mode: str, options: CalibrationOptions,
               progress: Progress) -> list[list[int]] | None:
    """Response token ids per prompt: the model's own greedy answers, none, or the given texts."""
    eos = tokenizer.eos_token_id
    if mode == "self":
        with progress("generating the base model's responses", len(prompt_ids)) as advance:
            return greedy_responses(model, tokenizer, prompt_ids, options.max_new_tokens,
                                    options.generation_batch_size, on_batch=advance)
    if mode == "none":
        return None
    return [list(tokenizer(r, add_special_tokens=False)["input_ids"]) + [eos] for r in prompt_set.responses or ()]


def _output_moment(weight: torch.Tensor, moment: torch.Tensor, is_output: bool, count: int) -> torch.Tensor:
    """Per-token output moment ``W S W^T / N`` (the accumulated moment itself at output-moment sites)."""
    m = moment.to(torch.float64)
    if not is_output:
        w = weight.to(torch.float64)
        m = w @ m @ w.T
    return m / max(count, 1)


def calibrate(base: BaseModel, options: CalibrationOptions, progress: Progress = silent) -> Calibration:
    """Run the calibration prompts through the base model and derive the safety module."""
    options.validate()
    prompt_set = _load_calibration_set(options)
    device = pick_device(options.device)
    tokenizer, template = apply_chat_template_choice(base.tokenizer, options.chat_template)
    placement = placement_of(options.device_map, options.max_memory, options.offload_folder)
    model = base.load_model(device, placement)
    linear = {**linear_modules(model, include_output=True), **router_modules(model)}
    experts = expert_modules(model)
    expert_weights = {expert_site(m, p, e): getattr(module, p)[e] for m, module in experts.items()
                      for p in EXPERT_PARAMS for e in range(getattr(module, p).shape[0])}
    head = output_layer_name(model)  # calibrated only when named (--targets lm_head, or an adapter on it)
    names = select_targets([n for n in linear if n != head or not is_default_targets(options.targets)]
                           + list(expert_weights), options.targets)

    def matrix(n: str) -> torch.Tensor:
        return expert_weights[n] if n in expert_weights else weight_matrix(linear[n])

    caps = small_layer_ranks({n: tuple(matrix(n).shape) for n in names}, options.rank,
                             options.cap_small_layers if options.cap_small_layers is not None
                             else is_default_targets(options.targets),
                             refuse_all=options.cap_small_layers is not True)
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompt_set.prompts]

    # Data-parallel (torchrun): each process takes every world_size-th prompt; the moments are summed at the end.
    if parallel.world_size() > len(prompt_ids):
        raise InputError(f"{parallel.world_size()} processes but {len(prompt_ids)} calibration prompts; give at "
                         "least one prompt per process")
    t0 = time.perf_counter()
    local = parallel.shard(range(len(prompt_ids)))
    local_ids = [prompt_ids[i] for i in local]
    responses = _responses(model, tokenizer, local_ids, prompt_set, options.responses, options, progress)
    if responses is not None and options.responses != "self":
        responses = [responses[i] for i in local]  # given responses are read for every prompt
    seconds_generate = time.perf_counter() - t0

    sequences = build_sequences(local_ids, responses, options.max_length)
    policies = tuple(dict.fromkeys((options.policy(), *options.extra_policies)))
    t1 = time.perf_counter()
    chosen_experts = {n: expert_weights[n].shape[1] for n in names if n in expert_weights}
    groups, accumulator, output_sites = accumulate_moments(
        model, {n: linear[n] for n in names if n in linear}, sequences, policies, options.batch_size,
        tokenizer.pad_token_id, getattr(torch, options.accumulate_dtype), progress,
        allow_output_moments=options.side == "output" and not options.keep_moments,
        experts=experts, expert_sites=chosen_experts,
    )
    seconds_forward = time.perf_counter() - t1
    site_of = {member: site for site, members in groups.items() for member in members}

    policy = options.policy()
    for site in groups:
        if accumulator.counts[(site, policy)] == 0:
            if site in chosen_experts:
                raise InputError(f"no calibration tokens were routed to expert {site} under token policy "
                                 f"{policy!r}; give more calibration prompts (--prompts, --max-prompts)")
            raise InputError(f"no calibration tokens reached {site} under token policy {policy!r}; "
                             "check the prompts, --responses and --max-length")
    weights = {n: stored_weight(base, n, linear.get(n), matrix(n)) for n in names}
    moments = {n: accumulator.sums[(site_of[n], policy)].to("cpu") for n in names}
    contrast_meta: dict = {}
    if options.contrast is None:
        with progress("eigendecompositions", 1) as advance:
            bases, values = compute_safety_bases(weights, moments, options.rank, options.side,
                                                 frozenset(n for n in names if site_of[n] in output_sites),
                                                 energy=options.energy, ranks=caps)
            advance(1)
    else:
        contrast_set = load_prompt_set(options.contrast).head(options.max_prompts)
        contrast_all = [chat_prompt_ids(tokenizer, p) for p in contrast_set.prompts]
        contrast_local = parallel.shard(range(len(contrast_all)))
        contrast_ids = [contrast_all[i] for i in contrast_local]
        mode = "none" if options.responses == "none" else ("given" if contrast_set.responses else "self")
        contrast_responses = _responses(model, tokenizer, contrast_ids, contrast_set, mode, options, progress)
        if contrast_responses is not None and mode == "given":
            contrast_responses = [contrast_responses[i] for i in contrast_local]
        c_groups, c_acc, c_output_sites = accumulate_moments(
            model, {n: linear[n] for n in names}, build_sequences(contrast_ids, contrast_responses, options.max_length),
            (policy,), options.batch_size, tokenizer.pad_token_id, getattr(torch, options.accumulate_dtype), progress,
            allow_output_moments=not options.keep_moments)
        c_site_of = {member: site for site, members in c_groups.items() for member in members}
        bases, values = {}, {}
        with progress("generalized eigenproblems", len(names)) as advance:
            for n in names:
                harmful = _output_moment(weights[n], moments[n], site_of[n] in output_sites,
                                         accumulator.counts[(site_of[n], policy)])
                benign = _output_moment(weights[n], c_acc.sums[(c_site_of[n], policy)].to("cpu"),
                                        c_site_of[n] in c_output_sites, c_acc.counts[(c_site_of[n], policy)])
                basis, eig = contrastive_output_basis(harmful, benign, caps.get(n, options.rank),
                                                      options.contrast_ridge)
                bases[n], values[n] = basis.to(torch.float32).contiguous(), eig
                advance(1)
        contrast_meta = {"contrast_prompt_set": contrast_set.name, "contrast_prompt_set_sha256": contrast_set.digest(),
                         "contrast_n_prompts": len(contrast_set.prompts), "contrast_ridge": options.contrast_ridge}

    n_tokens = accumulator.counts[(next(iter(groups)), policy)]
    metadata = {
        "tool": "salora-merge",
        "tool_version": __version__,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base_model": base.model_id,
        "base_revision": base.revision,
        "base_fingerprint": base.fingerprint,
        "prompt_set": prompt_set.name,
        "prompt_set_sha256": prompt_set.digest(),
        "n_prompts": len(prompt_set.prompts),
        "n_tokens": n_tokens,
        "responses": options.responses if options.responses in RESPONSE_MODES else "file",
        "max_new_tokens": options.max_new_tokens if options.responses == "self" else None,
        "max_length": options.max_length,
        "token_policy": policy,
        "chat_template": template,
        "statistics": list(policies),
        "rank": options.rank,
        "rank_capped": caps,  # layers smaller than the rank: their basis spans the whole layer
        "method": ("contrastive: generalized eigenvectors of W S_h W^T against W S_b W^T" if options.contrast
                   else f"{options.side}-side eigenvectors of W S W^T" if options.side == "output"
                   else "input-side eigenvectors of S"),
        "energy": options.energy,
        **contrast_meta,
        "accumulate_dtype": options.accumulate_dtype,
        "output_moment_sites": sorted(output_sites),
    }
    kept = {k: v.to("cpu", torch.float32) for k, v in accumulator.sums.items()} if options.keep_moments else {}
    safety = SafetyModule(
        bases=bases,
        eigenvalues=values,
        side=options.side,
        metadata=metadata,
        sites=site_of,
        moments=kept,
        counts=dict(accumulator.counts),
    )
    return Calibration(safety=safety, seconds_generate=seconds_generate, seconds_forward=seconds_forward,
                       n_tokens=n_tokens, capped=caps)
