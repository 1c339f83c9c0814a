"""Generation from a model (greedy and sampled, batched with left padding) and scoring its next-token
distributions along given sequences, on the device the model's inputs go to."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from salora_merge.hf.loading import input_device

__all__ = ["batches", "stop_token_ids", "generate_greedy", "greedy_responses", "generate_sampled", "response_logits",
           "greedy_with_logits", "response_logits_only"]


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The ids that end an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    configured = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    return sorted(ids - {None})


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Greedy continuations of tokenized prompts, batched with left padding; EOS and after dropped."""
    device = input_device(model)
    pad = tokenizer.pad_token_id
    eos = set(stop_token_ids(model, tokenizer))
    outputs: list[list[int]] = []
    for batch in batches(list(prompts), batch_size):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
        )
        for row in generated[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            outputs.append(row[:cut])
        if on_batch:
            on_batch(len(batch))
    return outputs


def greedy_responses(model: nn.Module, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int,
                     batch_size: int, on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """``generate_greedy``, with the end-of-turn token kept on a response that stopped on it (as in supervised
    fine-tuning data, so that training and statistics see where an answer ends)."""
    eos = tokenizer.eos_token_id
    out = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, on_batch=on_batch)
    return [r + [eos] if len(r) < max_new_tokens else r for r in out]


def _left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_sampled(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int,
                     pad: int, stop_ids: Sequence[int], temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     on_batch: Callable[[int], None] | None = None) -> list[tuple[list[int], bool]]:
    """A sampled continuation of each prompt (left-padded batches) as ``(ids before the first stop id, stopped)``;
    ``stopped`` is False for one cut by ``max_new_tokens``. Seeded: the same seed gives the same samples."""
    device = input_device(model)
    stops = set(stop_ids)
    out: list[tuple[list[int], bool]] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = _left_padded(chunk, pad)
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                       top_p=top_p, top_k=None, pad_token_id=pad, eos_token_id=sorted(stops))
            for row in generated[:, ids.shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), None)
                out.append((row[:cut], True) if cut is not None else (row, False))
            if on_batch:
                on_batch(len(chunk))
    return out


@torch.no_grad()
def response_logits(model: nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict each response token, ``(n, t, V)`` with ``t`` the longest response, and the mask
    ``(n, t)`` of real positions: one batch, right-padded (position ``j`` predicts ``responses[i][j]``)."""
    device = input_device(model)
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention[row, :len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
    t = max(1, max(len(r) for r in responses))
    out = torch.zeros((len(seqs), t, logits.shape[-1]), dtype=torch.float32)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        if r:
            out[row, :len(r)] = logits[row, len(p) - 1:len(p) - 1 + len(r)].float().cpu()
            mask[row, :len(r)] = True
    return out, mask


@torch.no_grad()
def greedy_with_logits(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, keep: int,
                       pad: int, stop_ids: Sequence[int]) -> tuple[list[list[int]], torch.Tensor]:
    """One batch: the greedy answer of each prompt (cut before the first stop id) and the logits of the first
    ``keep`` generation steps, ``(n, keep, V)`` float32 on the CPU (step ``j`` predicts answer token ``j``; zeros
    after the last step taken). The same logits a teacher-forced forward along the answer gives, without its
    second pass over the prompt."""
    device = input_device(model)
    ids, mask = _left_padded(prompts, pad)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                         eos_token_id=list(stop_ids), output_logits=True, return_dict_in_generate=True)
    stops = set(stop_ids)
    answers = []
    for row in out.sequences[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        answers.append(row[:cut])
    steps = out.logits[:keep]
    logits = torch.zeros((len(prompts), keep, steps[0].shape[-1]), dtype=torch.float32)
    for j, step in enumerate(steps):
        logits[:, j] = step.float().cpu()
    return answers, logits


def _keeps_logits(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def response_logits_only(model: nn.Module, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                         pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``response_logits`` with the output layer applied only where a response token is predicted: the
    sequences left-padded so that every response ends in the last column (positions counted from each row's
    first real token), and the model asked for the last ``t + 1`` columns' logits alone. On a 49k vocabulary the
    output layer over every prompt position is about a fifth of the forward."""
    device = input_device(model)
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
    ids, attention = _left_padded(seqs, pad)
    t = max(1, max(len(r) for r in responses))
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    extra = {"logits_to_keep": t + 1} if _keeps_logits(model) else {}
    logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=positions.to(device),
                   use_cache=False, **extra).logits[:, -(t + 1):]
    out = torch.zeros((len(seqs), t, logits.shape[-1]), dtype=torch.float32)
    mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for row, r in enumerate(responses):
        if r:  # response token j is predicted at column width - len(r) - 1 + j: kept index t - len(r) + j
            out[row, :len(r)] = logits[row, t - len(r):t].float().cpu()
            mask[row, :len(r)] = True
    return out, mask
