"""Sequence classifiers for the classifier judges: loading one, and labelling (prompt, response) pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from salora_merge.errors import InputError
from salora_merge.hf.chat_templates import conversation_ids
from salora_merge.hf.generation import batches
from salora_merge.hf.loading import quiet_transformers

__all__ = ["load_sequence_classifier", "classify_pairs"]


def load_sequence_classifier(folder: Path):
    """A local sequence-classification model and its tokenizer, for classifier judges."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"--judge classifier:{folder}: transformers could not load it ({exc})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@torch.no_grad()
def classify_pairs(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int) -> list[int]:
    """Predicted label id for every (prompt, response), batched with padding."""
    out: list[int] = []
    pairs = [conversation_ids(tokenizer, p, r) for p, r in zip(prompts, responses)]
    pad = tokenizer.pad_token_id
    for batch in batches(pairs, batch_size):
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):  # right padding: sequence classifiers pool the last real token
            ids[row, : len(p)] = torch.tensor(p)
            mask[row, : len(p)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        out.extend(int(i) for i in logits.argmax(-1).tolist())
    return out
