"""Refusal anchors: harmful prompts with the base model's own greedy responses (its refusals), and benign
boundary prompts with its own answers, generated once per base model and prompt set and cached under the
salora-merge cache. Shared by ``refit`` (repair) and anchored ``train``/``retrain``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from salora_merge.hf.base_model import BaseModel
from salora_merge.hf.chat_templates import chat_prompt_ids
from salora_merge.hf.generation import greedy_responses
from salora_merge.hf.resolve import cache_dir
from salora_merge.io.atomic import atomic_output_file
from salora_merge.progress import Progress, silent
from salora_merge.training.data import TokenizedExample, example_from_ids
from salora_merge.version import __version__

__all__ = ["base_responses", "anchor_examples", "alternate"]


def _key(base: BaseModel, prompt_ids: Sequence[list[int]], max_new_tokens: int) -> str:
    payload = json.dumps({"base": base.fingerprint, "prompts": [list(p) for p in prompt_ids],
                          "max_new_tokens": max_new_tokens, "version": __version__})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def base_responses(base: BaseModel, model, prompt_ids: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                   progress: Progress = silent, cache: Path | None = None,
                   label: str = "generating the base model's answers to the anchor prompts") -> list[list[int]]:
    """The base model's greedy responses (token ids; the end-of-turn token kept when it stopped on it) to
    ``prompt_ids``, from the cache when this base model answered these prompts before. ``model`` is the base
    model as loaded, without any adapter."""
    folder = Path(cache) if cache is not None else cache_dir() / "anchors"
    path = folder / f"{_key(base, prompt_ids, max_new_tokens)}.json"
    try:
        return [list(map(int, r)) for r in json.loads(path.read_text())["responses"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not cached yet (or unreadable): generate
    with progress(f"{label} (cached for next time)", len(prompt_ids)) as advance:
        responses = greedy_responses(model, base.tokenizer, list(prompt_ids), max_new_tokens, batch_size,
                                     on_batch=advance)
    with atomic_output_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"responses": responses}))
    return responses


def alternate(first: list, second: list) -> list:
    """``first`` and ``second`` interleaved item by item, then the rest of the longer one."""
    return [x for pair in zip(first, second) for x in pair] + first[len(second):] + second[len(first):]


def anchor_examples(base: BaseModel, model, anchor_prompts: Sequence[str], boundary_prompts: Sequence[str],
                    max_new_tokens: int, max_length: int, batch_size: int, progress: Progress = silent,
                    response_tokens: int | None = None) -> list[TokenizedExample]:
    """The anchors as training examples: each harmful prompt with the base model's own response (its refusal),
    alternating with each boundary prompt with the base model's own answer; examples with no response token
    within ``max_length`` are dropped. ``model`` is the base model as loaded, without any adapter. The responses
    are generated (and cached) ``max_new_tokens`` long; ``response_tokens`` keeps only their first tokens in
    the examples (shorter anchors pad a batch of short examples less)."""
    tokenizer = base.tokenizer
    cut = (lambda r: r[:response_tokens]) if response_tokens else (lambda r: r)  # noqa: E731
    anchor_ids = [chat_prompt_ids(tokenizer, p) for p in anchor_prompts]
    refusals = base_responses(base, model, anchor_ids, max_new_tokens, batch_size, progress)
    anchors = [e for e in (example_from_ids(p, cut(r), max_length) for p, r in zip(anchor_ids, refusals)) if e]
    if boundary_prompts:
        boundary_ids = [chat_prompt_ids(tokenizer, p) for p in boundary_prompts]
        answers = base_responses(base, model, boundary_ids, max_new_tokens, batch_size, progress,
                                 label="generating the base model's answers to the boundary prompts")
        kept = [e for e in (example_from_ids(p, cut(r), max_length) for p, r in zip(boundary_ids, answers)) if e]
        anchors = alternate(anchors, kept)
    return anchors
