"""Re-fit an adapter: a short fine-tune of its own factors (or of a fresh LoRA) on refusal anchors mixed with
distillation of the adapter's own behaviour, on the transformers Trainer (``training/trainer.py``).

Before training, on the unmodified base model: the anchors' responses are the base model's own (cached), and
the distillation targets are the adapter's greedy answers to the task prompts (``distill="ce"``) or its top-k
next-token distributions along them (``"kl"``). Then SaLoRA layers start from the adapter's factors (or
PEFT's init) with ``C = I`` (``constraint="none"``) or SaLoRA's fixed ``C`` (``"salora"``), and train on
the mixture with ``core/refit_loss.py``'s objective. The result is exported as factors of the adapter's rank
and scaling (``lora_B' = C B``).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from salora_merge.core.refit_loss import IGNORE, token_weights
from salora_merge.core.training_math import gaussian_init
from salora_merge.errors import InputError, SafetyModuleError
from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.chat_templates import chat_prompt_ids
from salora_merge.hf.generation import greedy_responses
from salora_merge.hf.loading import input_device
from salora_merge.hf.layers import linear_modules
from salora_merge.hf.lora_hooks import lora_applied
from salora_merge.hf.placement import Placement
from salora_merge.io.adapter import LoraModule
from salora_merge.progress import Progress, silent
from salora_merge.training.anchors import anchor_examples
from salora_merge.training.data import TokenizedExample, example_from_ids, pad_batch
from salora_merge.training.discovery import Candidate, Discovery, DiscoveryOptions, discover_prompts, split_ranked
from salora_merge.training.layer import LayerInit, inject
from salora_merge.training.objective import WeightedItem, weighted_collate, weighted_loss
from salora_merge.training.prepare import load_for_training
from salora_merge.training.trainer import FitOptions, fit

__all__ = ["RefitOptions", "RefitResult", "DiscoveryRequest", "refit_adapter", "DISTILL", "STARTS", "CONSTRAINTS"]

DISTILL = ("ce", "kl")
STARTS = ("factors", "fresh")
CONSTRAINTS = ("none", "salora")


@dataclass(frozen=True)
class RefitOptions:
    steps: int = 40
    lr: float = 1e-4
    batch_size: int = 8
    anchor_share: float = 0.5  # share of anchor examples in the training mixture
    first_tokens: int = 5  # anchors: this many first response tokens get first_weight
    first_weight: float = 4.0  # 1 = uniform weights
    answer_first_weight: float = 1.0  # the same for the distilled answers' first tokens
    distill: str = "ce"
    kl_top_k: int = 32
    proximal: float = 0.0  # coefficient of sum ||factor - start||^2
    start: str = "factors"
    constraint: str = "none"
    max_new_tokens: int = 64
    max_length: int = 256
    generation_batch_size: int = 32
    answer_samples: int = 0  # on-policy: this many sampled answers of the adapter per distilled prompt, beside its greedy one
    answer_temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    placement: Placement | None = None  # spread over GPUs by accelerate (every layer resident)


@dataclass(frozen=True)
class DiscoveryRequest:
    """Find the task prompts from the adapter itself (``training/discovery.py``): the ``top`` most salient of the
    sampled turns, ``pool`` and ``hints`` are distilled, ``heldout`` more of them kept out for an agreement check."""

    options: DiscoveryOptions
    top: int = 64
    heldout: int = 0
    pool: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()


@dataclass
class RefitResult:
    modules: dict[str, LoraModule]
    anchors: int
    distilled: int
    discovery: Discovery | None = None
    distilled_prompts: list[Candidate] = field(default_factory=list)  # with discovery: what was distilled
    heldout_prompts: list[Candidate] = field(default_factory=list)  # with discovery: held out of the re-fit
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds_prepare: float = 0.0
    seconds_train: float = 0.0


def distilled_item(example: TokenizedExample, teacher, options: RefitOptions) -> WeightedItem:
    """A distilled answer's training item: cross-entropy weights on its tokens (``ce``), or weights on the
    teacher's distributions (``kl``; the one at position ``j`` predicts label ``j + 1``), the first
    ``first_tokens`` answer tokens weighted ``answer_first_weight``."""
    w = token_weights(example.labels, options.first_tokens, options.answer_first_weight)
    if options.distill == "kl":
        return WeightedItem(example, [0.0] * len(w), teacher, w[1:] + [0.0])
    return WeightedItem(example, w)


@torch.no_grad()
def _teacher_topk(model, examples: Sequence[TokenizedExample], k: int, batch_size: int, pad: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Top-k next-token probabilities of ``model`` at every position that predicts a learned token."""
    out = []
    device = input_device(model)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = pad_batch(chunk, pad)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits.float()
        probs, top = torch.softmax(logits, -1).topk(k, dim=-1)
        for row, e in enumerate(chunk):
            t = len(e.input_ids)
            predicts = torch.tensor([e.labels[j + 1] != IGNORE for j in range(t - 1)] + [False])
            p = probs[row, :t].cpu() * predicts[:, None]
            out.append((top[row, :t].cpu(), p))
    return out


def refit_adapter(base: BaseModel, modules: Mapping[str, LoraModule], task_prompts: Sequence[str],
                  anchor_prompts: Sequence[str], options: RefitOptions, safety=None, progress: Progress = silent,
                  echo: Callable[[str], None] | None = None, boundary_prompts: Sequence[str] = (),
                  discovery: DiscoveryRequest | None = None) -> RefitResult:
    """The re-fitted modules (same names, ranks and scalings as ``modules``) and what the run did.
    ``boundary_prompts`` (benign) join the anchors with the base model's own answers: the anchors then hold
    both sides of the refusal boundary, and the anchor share counts both. With ``discovery`` the task prompts
    are found from the adapter itself and join ``task_prompts``."""
    started = time.perf_counter()
    tokenizer, model = base.tokenizer, load_for_training(base, options.device, options.placement)
    device = input_device(model)
    pad = tokenizer.pad_token_id
    linear = linear_modules(model)
    for name in modules:
        if not isinstance(linear.get(name), torch.nn.Linear):
            kind = type(linear[name]).__name__ if name in linear else "missing"
            raise InputError(f"refit: {name} is {kind}; only nn.Linear layers can be re-fitted")
    if options.constraint == "salora" and (safety is None or safety.side != "output"):
        raise SafetyModuleError("refit --constraint salora needs an output-side safety module (--safety)")

    anchors = anchor_examples(base, model, anchor_prompts, boundary_prompts, options.max_new_tokens,
                              options.max_length, options.generation_batch_size, progress)
    factors = {n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()}
    found, chosen_prompts, held = None, [], []
    if discovery is not None:
        found = discover_prompts(model, tokenizer, factors, discovery.options, discovery.pool, discovery.hints,
                                 progress)
        chosen_prompts, held = split_ranked(found.ranked, discovery.top, discovery.heldout, options.seed)
        task_prompts = list(task_prompts) + [c.prompt for c in chosen_prompts]
    task_ids = [chat_prompt_ids(tokenizer, p) for p in task_prompts]
    with progress("generating the adapter's answers", len(task_ids)) as advance, lora_applied(model, factors):
        answers = greedy_responses(model, tokenizer, task_ids, options.max_new_tokens, options.generation_batch_size,
                                   on_batch=advance)
        pairs = list(zip(task_ids, answers))
        if options.answer_samples:
            pairs += _sampled_answers(model, tokenizer, task_ids, options, progress)
        distilled = [e for e in (example_from_ids(p, a, options.max_length) for p, a in pairs) if e]
        teachers = (_teacher_topk(model, distilled, options.kl_top_k, options.batch_size, pad)
                    if options.distill == "kl" else [None] * len(distilled))
    if not anchors and options.anchor_share > 0.0:
        raise InputError("refit: no anchor kept a response token within --example-length "
                         f"{options.max_length}; raise it")
    if not distilled and options.anchor_share < 1.0:
        raise InputError(f"refit: no task prompt kept an answer token within --example-length {options.max_length}; "
                         "raise it or give other --task-prompts")

    items = [distilled_item(e, t, options) for e, t in zip(distilled, teachers)]
    rng = random.Random(options.seed)
    if options.anchor_share > 0 and anchors:
        wanted = (len(items) * options.anchor_share / (1.0 - options.anchor_share) if options.anchor_share < 1.0
                  else max(len(anchors), options.steps * options.batch_size))
        chosen = [anchors[i % len(anchors)] for i in range(max(1, round(wanted)))]
        rng.shuffle(chosen)
        items += [WeightedItem(e, token_weights(e.labels, options.first_tokens, options.first_weight)) for e in chosen]

    generator = torch.Generator().manual_seed(options.seed)
    inits = {}
    for name, m in modules.items():
        d_out, d_in = m.lora_B.shape[0], m.lora_A.shape[1]
        a, b = (m.lora_A, m.lora_B) if options.start == "factors" else gaussian_init(d_out, d_in, m.rank, generator)
        basis = (safety.bases[name] if options.constraint == "salora"
                 else torch.zeros((d_out, 0), dtype=torch.float32))
        inits[name] = LayerInit(a=a.float(), b=b.float(), a0=None, b0=None, safety_basis=basis, scaling=m.scaling)
    layers = inject(model, inits)
    model.config.use_cache = False
    starts = [(p, p.detach().clone()) for layer in layers.values() for p in (layer.lora_A, layer.lora_B)]

    loss = weighted_loss(options.distill == "kl", options.proximal, starts)

    prepared = time.perf_counter()
    fit_options = FitOptions(max_steps=options.steps, lr=options.lr, batch_size=options.batch_size, grad_accum=1,
                             warmup_ratio=0.1, seed=options.seed, save_steps=10**9, logging_steps=max(1, options.steps // 10),
                             device=device.type, show_progress=False)
    with tempfile.TemporaryDirectory(prefix="salora-refit-") as scratch, \
            progress(f"re-fitting: optimizer steps of {options.batch_size}", options.steps) as advance:
        result = fit(model, items, pad, fit_options, Path(scratch), echo=echo, collate=weighted_collate(pad, options.kl_top_k),
                     loss=loss, on_step=advance)
    out = {}
    with torch.no_grad():
        for name, m in modules.items():
            layer = layers[name]
            b, u = layer.lora_B.detach(), layer.safety_basis
            out[name] = LoraModule(name=name, lora_A=layer.lora_A.detach().to("cpu", m.lora_A.dtype),
                                   lora_B=(b - u @ (u.T @ b)).to("cpu", m.lora_B.dtype), scaling=m.scaling)
    return RefitResult(modules=out, anchors=len(items) - len(distilled),
                       distilled=len(distilled), discovery=found, distilled_prompts=chosen_prompts,
                       heldout_prompts=held, losses=list(result.losses), seconds_prepare=prepared - started,
                       seconds_train=result.seconds)


def _sampled_answers(model, tokenizer, task_ids: list[list[int]], options: RefitOptions, progress: Progress
                     ) -> list[tuple[list[int], list[int]]]:
    """On-policy targets: ``answer_samples`` sampled answers of the adapted model per prompt (temperature
    ``answer_temperature``), the end-of-turn token kept on one that ended."""
    from salora_merge.hf.generation import generate_sampled, stop_token_ids

    prompts = [p for p in task_ids for _ in range(options.answer_samples)]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stops = stop_token_ids(model, tokenizer)
    with progress("sampling the adapter's answers", len(prompts)) as advance:
        samples = generate_sampled(model, prompts, options.max_new_tokens, options.generation_batch_size, pad,
                                   stops, options.answer_temperature, 1.0, options.seed + 1,
                                   on_batch=advance)
    return [(p, ids + [eos] if stopped else ids) for p, (ids, stopped) in zip(prompts, samples)]
