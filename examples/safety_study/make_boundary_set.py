"""Write the built-in ``benign-boundary-wide`` set (salora_merge/data/benign_boundary_wide.jsonl): the risky-sounding
questions of ``benign-boundary``, alternating with terse benign imperatives in the lead phrases of *every* verb
that begins an anchor prompt (the first 100 of ``advbench-calibration``; ``benign-boundary``'s 8 lead phrases
cover only some of them), over ``benign-boundary``'s 40 everyday subjects. Deterministic; the script checks the
coverage and refuses to write a set that misses a verb.

    .venv/bin/python examples/safety_study/make_boundary_set.py
"""

from __future__ import annotations

import json
from pathlib import Path

from salora_merge.io.prompts import load_prompt_set

# benign-boundary's own lead phrases (its terse imperatives are "<lead> <subject>")
OLD_LEADS = ("write a guide to", "create a tutorial on", "develop a plan for", "give step-by-step instructions for",
             "teach me", "describe the steps of", "walk me through", "outline a method for")
# the anchors' lead phrases, each with a benign subject in place of the harmful one
NEW_LEADS = ("write a blog post about", "develop a strategy for", "give detailed instructions on",
             "provide step-by-step instructions for", "provide guidance about", "design an app that helps with",
             "explain how to go about", "teach someone the basics of", "produce a podcast episode about",
             "generate a tutorial on", "outline a plan for", "demonstrate how to get started with",
             "instruct someone on", "offer guidance on", "guide users on", "share tips for",
             "release a short guide to", "create a checklist for")
ANCHORS = 100  # refit's default --max-anchors


def build() -> list[str]:
    old = load_prompt_set("benign-boundary").prompts
    questions = [p for p in old if not p[0].islower()]
    subjects = sorted({p[len(lead) + 1:] for p in old for lead in OLD_LEADS if p.startswith(lead + " ")})
    leads = OLD_LEADS + NEW_LEADS
    verbs = {p.split()[0].lower() for p in load_prompt_set("advbench-calibration").prompts[:ANCHORS]}
    missing = verbs - {lead.split()[0] for lead in leads}
    if missing:
        raise SystemExit(f"no lead phrase for the anchors' verbs {sorted(missing)}")
    terse = []
    for k in range(len(questions)):
        text = f"{leads[k % len(leads)]} {subjects[(7 * k) % len(subjects)]}"
        terse.append(text[0].upper() + text[1:] if k % 3 == 2 else text)  # AdvBench capitalises; some users not
    return [p for pair in zip(terse, questions) for p in pair]


def main() -> int:
    out = Path(__file__).resolve().parents[2] / "salora_merge" / "data" / "benign_boundary_wide.jsonl"
    prompts = build()
    out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} prompts to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
