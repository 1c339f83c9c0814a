"""The wider evaluation sets: their sizes, and that no prompt of theirs is in any other shipped set."""

from __future__ import annotations

import re

from salora_merge.io.prompts import BUILTIN_SETS, load_prompt_set

EVAL_ONLY = ("benign-eval", "harmful-eval")


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def test_the_evaluation_sets_are_large_and_disjoint_from_every_other_set():
    benign, harmful = (load_prompt_set(n).prompts for n in EVAL_ONLY)
    assert len(benign) >= 300 and len(harmful) >= 150
    assert len({_key(p) for p in benign}) == len(benign) and len({_key(p) for p in harmful}) == len(harmful)
    others = {_key(p) for name in BUILTIN_SETS if name not in EVAL_ONLY for p in load_prompt_set(name).prompts}
    assert not ({_key(p) for p in benign} & others) and not ({_key(p) for p in harmful} & others)
    assert not ({_key(p) for p in benign} & {_key(p) for p in harmful})
