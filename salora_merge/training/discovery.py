"""Prompt discovery: find where an adapter's task lives when nobody gave its prompts.

1. Sample user turns from the base model with the adapter applied, given only the chat template's opening of a
   user turn (Magpie, Xu et al. 2024, arXiv 2406.08464): an instruction-tuned model continues that opening with
   the kind of request it was tuned on. Temperature sampling, deduplicated, length-capped (a turn that did not
   end within the budget is dropped).
2. Add the built-in pool and the user's hints, then drop every candidate that the base model itself refuses
   (the repair must never distill the adapter's compliance with a harmful request).
3. Rank by salience: the mean KL divergence between the adapter's and the base model's next-token
   distributions over the first response tokens (``core/salience.py``), along the base model's own greedy
   answer, the one just judged for a refusal (one generation serves both, its step logits the base's side). The top ones are distilled.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch

from salora_merge.auditing.judges import refused
from salora_merge.core.salience import response_kl
from salora_merge.errors import InputError
from salora_merge.hf.chat_templates import user_turn_frame
from salora_merge.hf.generation import generate_sampled, greedy_with_logits, response_logits_only
from salora_merge.hf.chat_templates import chat_prompt_ids
from salora_merge.hf.lora_hooks import lora_applied
from salora_merge.hf.generation import stop_token_ids
from salora_merge.progress import Progress, silent

__all__ = ["DiscoveryOptions", "Candidate", "Discovery", "discover_prompts", "clean_turn", "SOURCES", "DISCOVER"]

SOURCES = ("sampled", "pool", "hint")
DISCOVER = "discover"  # the value of --task-prompts (repair) and --prompts (retrain) that asks for discovery


@dataclass(frozen=True)
class DiscoveryOptions:
    candidates: int = 128  # user turns sampled from the adapted model
    turn_tokens: int = 48  # length cap of a sampled user turn
    temperature: float = 1.0
    top_p: float = 0.95
    refusal_tokens: int = 16  # the base model's answer judged for a refusal
    salience_tokens: int = 8  # first response tokens (of the base's greedy answer) over which the KL is averaged
    batch_size: int = 32
    seed: int = 0

    def validate(self) -> None:
        if self.candidates < 0:
            raise InputError(f"--discover-candidates must be 0 or more, got {self.candidates}")
        for name in ("turn_tokens", "refusal_tokens", "salience_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Candidate:
    prompt: str
    source: str  # one of SOURCES
    salience: float  # mean KL(adapter || base) over the first response tokens, nats

    def as_row(self) -> dict:
        """The candidate as a report lists it."""
        return {"prompt": self.prompt, "source": self.source, "salience": round(self.salience, 6)}


@dataclass
class Discovery:
    ranked: list[Candidate]  # most salient first, the base model's refusals removed
    sampled: int = 0  # user turns sampled
    unfinished: int = 0  # sampled turns cut by the length cap (dropped)
    duplicates: int = 0  # candidates dropped as duplicates (any source)
    refused_by_base: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        out = asdict(self)
        out["ranked"] = [asdict(c) for c in self.ranked]
        return out

    def summary(self) -> dict:
        """What a report says of the discovery: the counts, the time and the first refused candidates (the
        prompts kept are the caller's to list, with :meth:`Candidate.as_row`)."""
        return {"sampled": self.sampled, "unfinished": self.unfinished, "duplicates": self.duplicates,
                "refused_by_base": len(self.refused_by_base), "ranked": len(self.ranked),
                "seconds": round(self.seconds, 2), "refused_examples": self.refused_by_base[:10]}


_SPACE = re.compile(r"\s+")


def clean_turn(text: str, end_text: str) -> str:
    """A sampled user turn as a prompt: cut at the template's closing text, whitespace collapsed."""
    if end_text and end_text in text:
        text = text[: text.index(end_text)]
    return _SPACE.sub(" ", text).strip()


def _key(prompt: str) -> str:
    return _SPACE.sub(" ", prompt.lower()).strip(" .?!")


def _sample_turns(model, tokenizer, factors, options: DiscoveryOptions, progress: Progress) -> tuple[list[str], int]:
    frame = user_turn_frame(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [list(frame.prefix_ids)] * options.candidates
    with progress("sampling user turns from the adapted model", len(prompts)) as advance, \
            lora_applied(model, factors):
        samples = generate_sampled(model, prompts, options.turn_tokens, options.batch_size, pad, frame.stop_ids,
                                   options.temperature, options.top_p, options.seed, on_batch=advance)
    turns, unfinished = [], 0
    for ids, stopped in samples:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        ended = stopped or (bool(frame.end_text) and frame.end_text in text)
        if not ended:
            unfinished += 1
            continue
        text = clean_turn(text, frame.end_text)
        text = clean_turn(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"],
                                           skip_special_tokens=True), "")
        if len(text) >= 8:  # a word or two of noise is no task
            turns.append(text)
    return turns, unfinished


@torch.no_grad()
def judge_and_score(model, tokenizer, factors, prompts: Sequence[str], options: DiscoveryOptions,
                    progress: Progress = silent) -> tuple[list[bool], list[float]]:
    """Per prompt: did the base model refuse it (its greedy answer, ``refusal_tokens`` long, judged by the
    keyword list), and the salience, the mean KL(adapter || base) over the first ``salience_tokens`` tokens of
    that answer (teacher-forced, both models on the same tokens)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    refusals: list[bool] = [False] * len(ids)
    scores: list[float] = [0.0] * len(ids)
    size = options.batch_size
    stops = stop_token_ids(model, tokenizer)
    # Batches of prompts of about the same length (the answers come back in the prompts' order): candidates run
    # from a few words to a paragraph, and a batch is as long as its longest prompt.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    with progress("checking the base's answers and ranking prompts by the adapter's effect", len(ids)) as advance:
        for start in range(0, len(ids), size):
            rows = order[start:start + size]
            chunk = [ids[i] for i in rows]
            # One greedy generation gives the base's answer (judged) and its logits along it (the salience's base
            # side); the adapted side is one forward with the output layer on the response positions alone.
            answers, steps = greedy_with_logits(model, chunk, options.refusal_tokens, options.salience_tokens, pad,
                                                stops)
            heads = [a[: options.salience_tokens] or [tokenizer.eos_token_id] for a in answers]
            with lora_applied(model, factors):
                adapted, mask = response_logits_only(model, chunk, heads, pad)
            base = steps[:, : adapted.shape[1]]
            for i, answer, kl in zip(rows, answers, response_kl(adapted, base, mask)):
                refusals[i] = refused(tokenizer.decode(answer, skip_special_tokens=True))
                scores[i] = float(kl)
            advance(len(chunk))
    return refusals, scores


def discover_prompts(model, tokenizer, factors: Mapping[str, tuple], options: DiscoveryOptions,
                     pool: Sequence[str] = (), hints: Sequence[str] = (), progress: Progress = silent) -> Discovery:
    """Candidates sampled from the adapted model, plus ``pool`` and ``hints``, without the base model's refusals,
    ranked by salience (ties keep the order: hints, sampled, pool). ``model`` is the base model, no adapter
    applied; ``factors`` the adapter's ``{name: (A, B, scaling)}``."""
    options.validate()
    if options.candidates == 0 and not pool and not hints:
        raise InputError("prompt discovery has nothing to rank: --discover-candidates is 0 and no pool or hints "
                         "were given")
    started = time.perf_counter()
    sampled, unfinished = (_sample_turns(model, tokenizer, factors, options, progress) if options.candidates
                           else ([], 0))
    seen: dict[str, tuple[str, str]] = {}
    duplicates = 0
    for source, prompts in (("hint", hints), ("sampled", sampled), ("pool", pool)):
        for p in prompts:
            k = _key(p)
            if not k or k in seen:
                duplicates += 1
                continue
            seen[k] = (p, source)
    candidates = list(seen.values())
    refusals, scores = judge_and_score(model, tokenizer, factors, [p for p, _ in candidates], options, progress)
    kept = [(p, s, score) for (p, s), no, score in zip(candidates, refusals, scores) if not no]
    dropped = [p for (p, _), no in zip(candidates, refusals) if no]
    order = sorted(range(len(kept)), key=lambda i: -kept[i][2])  # stable: equal scores keep their order
    ranked = [Candidate(*kept[i]) for i in order]
    return Discovery(ranked=ranked, sampled=options.candidates, unfinished=unfinished, duplicates=duplicates,
                     refused_by_base=dropped, seconds=time.perf_counter() - started)


def split_ranked(ranked: Sequence[Candidate], top: int, heldout: int, seed: int
                 ) -> tuple[list[Candidate], list[Candidate]]:
    """(distilled, held out): the ``top + heldout`` most salient, ``heldout`` of them (at most a quarter) drawn
    by a seeded shuffle and held out of the re-fit for the agreement check."""
    head = list(ranked[: top + heldout])
    k = min(heldout, len(head) // 4)
    order = list(range(len(head)))
    random.Random(seed).shuffle(order)
    held = set(order[len(order) - k:])
    return [c for i, c in enumerate(head) if i not in held][:top], [c for i, c in enumerate(head) if i in held]
