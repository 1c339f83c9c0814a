"""Training data: JSONL conversations, tokenized through the chat template with the loss on responses.

Accepted records, one JSON object per line (formats may not be mixed within a file):

- ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: every assistant
  turn is learned; system and user turns are context.
- ``{"instruction": "...", "input": "...", "output": "..."}`` (Alpaca style; ``input`` optional): the
  user turn is the instruction, then a blank line and the input when there is one.
- ``{"prompt": "...", "response": "..."}``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from salora_merge.errors import InputError

__all__ = ["Conversation", "TokenizedExample", "load_conversations", "conversations_from_pairs",
           "tokenize_conversation", "tokenize_all", "conversations_digest", "examples_digest", "split_holdout",
           "example_from_ids", "pad_batch"]

IGNORE = -100
_ROLES = ("system", "user", "assistant")

Conversation = tuple[tuple[str, str], ...]  # ((role, content), ...)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the token is context

    @property
    def response_mask(self) -> list[bool]:
        return [label != IGNORE for label in self.labels]

    @property
    def prompt_length(self) -> int:
        """Tokens before the first learned token."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE), len(self.labels))


def _record_conversation(item: object, where: str) -> tuple[str, Conversation]:
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        turns = []
        for j, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES \
                    or not isinstance(message.get("content"), str):
                raise InputError(f"{where}: messages[{j}] must be {{\"role\": system|user|assistant, "
                                 "\"content\": string}")
            turns.append((message["role"], message["content"]))
        if not any(role == "assistant" for role, _ in turns):
            raise InputError(f"{where}: the conversation has no assistant turn, so nothing to learn")
        return "messages", tuple(turns)
    if "instruction" in item and "output" in item:
        instruction, extra, output = item["instruction"], item.get("input") or "", item["output"]
        if not all(isinstance(v, str) for v in (instruction, extra, output)) or not output.strip():
            raise InputError(f"{where}: 'instruction', 'input' and 'output' must be strings, 'output' non-empty")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return "instruction", (("user", user), ("assistant", output))
    if "prompt" in item and "response" in item:
        prompt, response = item["prompt"], item["response"]
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            raise InputError(f"{where}: 'prompt' and 'response' must be strings, 'response' non-empty")
        return "prompt", (("user", prompt), ("assistant", response))
    raise InputError(f"{where}: expected 'messages', 'instruction'/'output' or 'prompt'/'response' fields "
                     f"(got {', '.join(sorted(item)) or 'none'}); see docs/usage.md#training-data")


def load_conversations(path: Path) -> list[Conversation]:
    """Read a JSONL training file; one-line errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--data {path}: not UTF-8 text") from None
    out: list[Conversation] = []
    kind = None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg}); the data file must be JSONL") from None
        record_kind, conversation = _record_conversation(item, where)
        if kind is not None and record_kind != kind:
            raise InputError(f"{where}: a '{record_kind}' record in a file of '{kind}' records; use one format")
        kind = record_kind
        out.append(conversation)
    if not out:
        raise InputError(f"--data {path}: the file holds no records")
    return out


def conversations_from_pairs(prompts: Sequence[str], responses: Sequence[str]) -> list[Conversation]:
    return [(("user", p), ("assistant", r)) for p, r in zip(prompts, responses)]


def conversations_digest(conversations: Sequence[Conversation]) -> str:
    return hashlib.sha256(json.dumps(list(conversations), ensure_ascii=False).encode("utf-8")).hexdigest()


def examples_digest(examples: Sequence[TokenizedExample]) -> str:
    payload = json.dumps([[e.input_ids, e.labels] for e in examples])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def example_from_ids(prompt_ids: Sequence[int], response_ids: Sequence[int], max_length: int) -> TokenizedExample | None:
    """An example from token ids (a generated response kept exactly as generated, never re-tokenized)."""
    ids = (list(prompt_ids) + list(response_ids))[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + list(response_ids))[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return TokenizedExample(ids, labels)


def split_holdout(items: Sequence, fraction: float, at_most: int) -> tuple[list, list]:
    """``(train, held_out)``: the last ``fraction`` of the items (at least one, at most ``at_most``)."""
    if len(items) < 2:
        raise InputError(f"need at least 2 examples to hold some out for evaluation, got {len(items)}")
    n = min(max(1, round(len(items) * fraction)), at_most, len(items) - 1)
    return list(items[:-n]), list(items[-n:])


def _render(tokenizer, turns: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(tokenizer, conversation: Conversation, max_length: int) -> TokenizedExample | None:
    """Token ids and labels; only assistant turns (and their end-of-turn tokens) are learned.

    With a chat template, the text is cut at each assistant turn's start and end as the template
    renders it, and the pieces are tokenized one by one, so the context before a response is
    tokenized exactly as at inference (``chat_prompt_ids``). Returns None when truncation to
    ``max_length`` leaves no learned token.
    """
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE] * len(piece))

    if getattr(tokenizer, "chat_template", None):
        done = ""
        for i, (role, _) in enumerate(conversation):
            if role != "assistant":
                continue
            before = _render(tokenizer, conversation[:i], add_generation_prompt=True)
            after = _render(tokenizer, conversation[: i + 1], add_generation_prompt=False)
            if not before.startswith(done) or not after.startswith(before):
                raise InputError("the tokenizer's chat template does not render a conversation's turns as "
                                 "prefixes of each other, so response tokens cannot be located; use "
                                 "single-turn records")
            add(before[len(done):], learn=False)
            add(after[len(before):], learn=True)
            done = after
    else:
        if len(conversation) != 2 or conversation[0][0] != "user":
            raise InputError("the tokenizer has no chat template: only single-turn user/assistant records "
                             "can be used")
        prompt = list(tokenizer(conversation[0][1])["input_ids"])
        ids.extend(prompt)
        labels.extend([IGNORE] * len(prompt))
        add(conversation[1][1], learn=True)
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE for label in labels):
        return None
    return TokenizedExample(ids, labels)


def tokenize_all(tokenizer, conversations: Sequence[Conversation], max_length: int,
                 source: str) -> list[TokenizedExample]:
    """Tokenize every conversation; fail when truncation leaves none with a learned token."""
    out = [tokenize_conversation(tokenizer, c, max_length) for c in conversations]
    kept = [e for e in out if e is not None]
    if not kept:
        raise InputError(f"{source}: no example keeps a response token within --max-length {max_length}; "
                         "raise --max-length")
    return kept


def pad_batch(examples: Sequence[TokenizedExample], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` (with ``pad``), ``labels`` (with ``IGNORE``) and ``attention_mask``."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
