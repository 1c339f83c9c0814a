"""``salora-merge repair``: the agreement math, the task-prompt split, a run on a tiny model (stock PEFT output,
the report's before/after figures checked against a direct evaluation), and the bad inputs (one line, nothing
written)."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from click.testing import CliRunner

from salora_merge.cli import main
from salora_merge.core.agreement import agreement, prefix_share
from salora_merge.io.prompts import PromptSet, load_prompt_set
from salora_merge.repairing.run import split_task_prompts

EVAL = ["--max-eval-prompts", "3", "--eval-new-tokens", "4", "--heldout-task-prompts", "2"]
FAST = ["--max-anchors", "4", "--answer-tokens", "4", "--refit-batch", "4", "--steps", "2", "--example-length", "512",
        *EVAL]


def test_prefix_share_and_agreement_by_hand():
    assert prefix_share([1, 2, 3], [1, 2, 3]) == 1.0
    assert prefix_share([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5  # the common prefix stops at the first difference
    assert prefix_share([1, 2], [1, 2, 3, 4]) == 0.5  # over the longer answer
    assert prefix_share([5], [6]) == 0.0 and prefix_share([], []) == 1.0
    got = agreement([[1, 2], [3, 4], [5]], [[1, 2], [3, 0], [6]])
    assert got == {"exact": pytest.approx(1 / 3), "prefix": pytest.approx((1.0 + 0.5 + 0.0) / 3)}
    with pytest.raises(ValueError):
        agreement([[1]], [])


def test_split_task_prompts_is_seeded_disjoint_and_at_most_a_quarter():
    prompts = PromptSet("t", tuple(f"p{i}" for i in range(20)))
    keep, held = split_task_prompts(prompts, 16, seed=0)
    assert len(held.prompts) == 5 and len(keep.prompts) == 15  # a quarter of 20
    assert set(keep.prompts) | set(held.prompts) == set(prompts.prompts) and not set(keep.prompts) & set(held.prompts)
    assert split_task_prompts(prompts, 16, seed=0) == (keep, held)
    assert split_task_prompts(prompts, 16, seed=1)[1] != held
    assert split_task_prompts(prompts, 0, seed=0)[1].prompts == ()


@pytest.mark.parametrize("builtin, size", [("generic-tasks", 200), ("benign-boundary", 240),
                                           ("benign-boundary-wide", 240)])
def test_distillation_sets_are_disjoint_from_every_evaluation_set(builtin, size):
    def four_grams(prompt):
        words = re.findall(r"[a-z']+", prompt.lower())
        return {tuple(words[i:i + 4]) for i in range(len(words) - 3)}

    mine = load_prompt_set(builtin).prompts
    assert len(set(mine)) >= size
    for name in ("advbench-calibration", "advbench-heldout", "harmbench-standard", "overrefusal",
                 "benign-instructions"):
        other = load_prompt_set(name).prompts
        assert not set(mine) & set(other), name
        if name in ("benign-instructions", "overrefusal"):  # not even a run of four words in common
            theirs = set().union(*map(four_grams, other))
            assert not [p for p in mine if four_grams(p) & theirs], name


def _repair(base, adapter, out, *extra):
    return CliRunner().invoke(main, ["repair", "--base", str(base), "--adapter", str(adapter), *map(str, extra),
                                     "-o", str(out), "--json"])


def test_repair_writes_a_stock_peft_adapter_and_measures_before_and_after(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import make_peft_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from salora_merge.auditing.behavior import BehaviorOptions, evaluate_variant, load_prompt_sets
    from salora_merge.auditing.judges import KeywordJudge
    from salora_merge.hf.loading import load_causal_lm, load_tokenizer
    from salora_merge.io.adapter import read_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "repaired"
    result = _repair(tiny_model_dir, adapter, out, *FAST, "--task-prompts", "generic-tasks")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "refit" and report["task_prompts"] == "generic-tasks"
    assert report["task_prompts_heldout"] == 2 and report["task_prompts_used"] == 254
    assert report["method_report"]["distilled"] == 254  # the held-out prompts were not distilled
    assert set(report["behavior"]) == {"base", "adapter", "repaired"}
    assert json.loads((out / "salora_repair.json").read_text())["behavior"] == report["behavior"]
    assert "Measured by this run" in (out / "README.md").read_text()
    # The report's "repaired" figures are the audit's evaluation of the written adapter, recomputed here.
    options = BehaviorOptions(max_prompts=3, max_new_tokens=4)
    model, tokenizer = load_causal_lm(tiny_model_dir, torch.device("cpu")), load_tokenizer(tiny_model_dir)
    modules = read_adapter(out).modules
    direct = evaluate_variant(model, tokenizer, load_prompt_sets(options), KeywordJudge(),
                              {n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()}, options)
    assert report["behavior"]["repaired"] == json.loads(json.dumps(direct.to_json()))
    assert report["task"]["prompts"] == 2 and 0.0 <= report["task"]["repaired_vs_adapter"]["prefix"] <= 1.0
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, str(out))
    assert [w for w in caught if "peft" in str(w.filename)] == []


def test_repair_with_a_control_method_and_no_eval(tiny_model_dir, tmp_path):
    from conftest import make_peft_adapter

    from salora_merge.io.adapter import read_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "shrunk"
    result = _repair(tiny_model_dir, adapter, out, "--method", "shrink", "--gamma", "0.25", "--no-eval")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["behavior"] == {} and report["method_options"] == {"gamma": 0.25}
    before, after = read_adapter(adapter).modules, read_adapter(out).modules
    for name, m in before.items():
        torch.testing.assert_close(after[name].lora_B.double() * after[name].scaling,
                                   0.25 * m.lora_B.double() * m.scaling)


@pytest.mark.parametrize("case,expected", [
    ("empty", "--task-prompts"),
    ("malformed", "--task-prompts"),
    ("resta", "--method resta needs --unaligned"),
    ("other-model", "another model"),
    ("no-anchors", "--anchor-prompts"),
    ("stray-option", "--anchor-prompts belong to --method refit"),
])
def test_repair_bad_inputs_are_one_line_and_write_nothing(case, expected, tiny_model_dir, wider_model_dir, tmp_path):
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    base, extra, fast = tiny_model_dir, [], FAST
    if case == "empty":
        (tmp_path / "empty.txt").write_text("")
        extra = ["--task-prompts", tmp_path / "empty.txt"]
    elif case == "malformed":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json\n')
        extra = ["--task-prompts", tmp_path / "bad.jsonl"]
    elif case == "resta":
        extra = ["--method", "resta"]
        fast = EVAL
    elif case == "other-model":
        base = wider_model_dir
    elif case == "no-anchors":
        (tmp_path / "none.txt").write_text("\n")
        extra = ["--anchor-prompts", tmp_path / "none.txt"]
    elif case == "stray-option":
        extra, fast = ["--method", "safedelta", "--anchor-prompts", "x"], EVAL
    out = tmp_path / "out"
    result = _repair(base, adapter, out, *fast, *extra)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_repair_api_refuses_task_prompts_as_a_method_option(tiny_model_dir, tmp_path):
    from conftest import make_peft_adapter

    import salora_merge as sm
    from salora_merge.errors import InputError

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    with pytest.raises(InputError, match="repair's --task-prompts"):
        sm.repair(tiny_model_dir, str(adapter), tmp_path / "out", method_options={"task_prompts": "x.txt"})
    assert not (tmp_path / "out").exists()


def _verdict_report(base: float, adapter: float, repaired: float, benign: float = 0.0):
    from salora_merge.repairing.report import RepairReport

    n = {"harmful": 50, "benign": 50, "overrefusal": 50}
    variant = lambda h, b: {"harmful_refusal_rate": h, "attack_success_rate": 1 - h, "benign_refusal_rate": b,  # noqa: E731
                            "overrefusal_rate": 0.0, "n": n}
    return RepairReport(base_model="m", adapter="a", method="refit", method_options={}, task_prompts="discover",
                        task_prompts_used=48, task_prompts_heldout=16, ranks=[8],
                        behavior={"base": variant(base, 0.0), "adapter": variant(adapter, 0.0),
                                  "repaired": variant(repaired, benign)},
                        task={"prompts": 16, "repaired_vs_adapter": {"exact": 0.75, "prefix": 0.9},
                              "base_vs_adapter": {"exact": 0.0, "prefix": 0.1}})


def test_the_repair_verdict_line_says_what_this_run_did():
    line = _verdict_report(0.9, 0.4, 0.88, benign=0.02).verdict()
    assert line == ("Verdict: refusals restored (harmful refusal 88% [76, 94]; base 90%, adapter 40%); task answers "
                    "identical to the adapter's on 75% of 16 held-out task prompts; benign refusal 2% [0, 10] "
                    "(base 0%).")
    assert _verdict_report(0.9, 0.4, 0.6).verdict().startswith("Verdict: refusals partly restored")
    assert _verdict_report(0.9, 0.4, 0.3).verdict().startswith("Verdict: refusals not restored")
    low = _verdict_report(0.02, 0.0, 0.04).verdict()
    assert "the base refuses only 2% of the held-out harmful prompts" in low and "safety-aligned base" in low
    rendered = _verdict_report(0.9, 0.4, 0.88).render()
    assert rendered.count("\n") < 10 and "docs/repair-study.md" in rendered and "Verdict:" in rendered


def test_repair_warns_before_the_long_work_when_the_base_does_not_refuse(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny random base refuses none of the held-out harmful prompts: one warning line before the repair.
    A base that refuses them (its answers replaced by a refusal) gets none."""
    from conftest import make_peft_adapter

    import salora_merge.hf.generation as generation
    from salora_merge.auditing.behavior import BehaviorOptions, load_prompt_sets
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.repairing.run import base_refusal_warning

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    result = _repair(tiny_model_dir, adapter, tmp_path / "out", *FAST, "--task-prompts", "generic-tasks")
    assert result.exit_code == 0, result.output
    warning = ("warning: the base refuses 0% of 3 held-out harmful prompts (harmbench-standard[:3]): there are "
               "no refusals to restore; repair needs a safety-aligned base (built in: smollm2-135m-aligned)")
    lines = result.stderr.splitlines()
    assert warning in lines
    assert lines.index(warning) < next(
        i for i, line in enumerate(lines) if "anchor prompts" in line)  # before the long work
    base, options = resolve_model(str(tiny_model_dir)), BehaviorOptions(max_prompts=3, max_new_tokens=4)
    sets = load_prompt_sets(options)
    refusal = base.tokenizer("I'm sorry, I cannot help", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(generation, "generate_greedy", lambda model, tok, prompts, *a, **k: [refusal] * len(prompts))
    assert base_refusal_warning(base, sets, options) is None


def test_exact_answers_and_the_gain_kept_by_hand():
    from salora_merge.core.agreement import exact_answers, gain_kept

    assert exact_answers([" 42", "7\n", "4 2"], ["42", "7", "42"]) == [True, True, False]
    with pytest.raises(ValueError):
        exact_answers(["1"], [])
    assert gain_kept(0.0, 0.55, 0.5) == pytest.approx(0.5 / 0.55)
    assert gain_kept(0.1, 0.1, 0.3) is None and gain_kept(0.5, 0.2, 0.4) is None  # no gain to keep


def test_repair_task_check_scores_exact_answers_of_each_variant(tiny_model_dir, tmp_path, monkeypatch):
    """Every variant answers "42" (generation replaced): half the expected answers are 42, so each variant scores
    50% and the adapter gains nothing over the base; the verdict and the card say so."""
    from conftest import make_peft_adapter

    import salora_merge.hf.generation as generation
    import salora_merge.hf.loading as loading

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    check = tmp_path / "check.jsonl"
    check.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": "42" if i % 2 else "7"}) + "\n"
                             for i in range(6)))
    forty_two = loading.load_tokenizer(tiny_model_dir)("42", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(generation, "generate_greedy",
                        lambda model, tok, prompts, *a, on_batch=None, **k: [list(forty_two)] * len(prompts))
    out = tmp_path / "out"
    result = _repair(tiny_model_dir, adapter, out, "--method", "shrink", "--gamma", "0.5", *EVAL,
                     "--task-check", check)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    got = report["task_check"]
    assert got["name"] == "check.jsonl" and got["prompts"] == 6 and got["max_new_tokens"] == len(forty_two) + 4
    assert got["base"] == got["adapter"] == got["repaired"] == 0.5 and got["kept"] is None
    assert "task check: exact answers (`check.jsonl`, 6) | 50% | 50% | 50% |" in (out / "README.md").read_text()


@pytest.mark.parametrize("content, extra, expected", [
    ('{"prompt": "What is 1 + 1?"}\n', [], "--task-check"),  # no expected answers
    ('{"prompt": "What is 1 + 1?", "answer": "2"}\n', ["--no-eval"], "--task-check is measured by the evaluation"),
])
def test_repair_task_check_bad_inputs(content, extra, expected, tiny_model_dir, tmp_path):
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    check = tmp_path / "check.jsonl"
    check.write_text(content)
    out = tmp_path / "out"
    result = _repair(tiny_model_dir, adapter, out, "--method", "shrink", *EVAL, "--task-check", check, *extra)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert expected in result.stderr and not out.exists()
