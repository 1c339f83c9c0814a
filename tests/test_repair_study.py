"""The repair study (examples/safety_study/repair_study.py): its data splits, its bar check and shrink-curve
interpolation against hand-computed cases, and a smoke run of every stage on a tiny model (the full study on
SmolLM2 is `make repair-study`)."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parent.parent / "examples" / "safety_study"
sys.path.insert(0, str(STUDY))

import repair_data  # noqa: E402
import repair_report  # noqa: E402
import repair_study  # noqa: E402


def test_full_splits_are_disjoint_and_held_out():
    data = repair_data.build(repair_study.FULL.sizes, 0)
    sizes = repair_study.FULL.sizes
    assert len(data.eval_advbench) >= 100 and len(data.eval_harmbench) >= 100
    assert len(data.align_benign) == sizes.align_benign + sizes.align_edgy + sizes.align_terse
    trained = set(data.align_harmful) | set(data.align_benign) | set(data.erode_train)
    trained |= {q for q, _ in data.arithmetic_train} | {q for q, _ in data.json_train}
    evaluated = set(data.eval_advbench) | set(data.eval_harmbench) | set(data.eval_benign) | set(data.eval_overrefusal)
    evaluated |= set(data.task_heldout) | {q for q, _ in data.arithmetic_eval} | {q for q, _ in data.json_eval}
    assert not trained & evaluated
    from salora_merge.io.prompts import load_prompt_set
    assert not set(load_prompt_set("generic-tasks").prompts) & (trained | evaluated)
    for prompt, answer in data.json_eval:
        assert json.loads(answer) == prompt.split(": ", 1)[1].split(", ")


def _row(adv, harm, benign=0.0, over=0.0, nll=1.0, arith=0.0):
    return {"advbench": adv, "harmbench": harm, "benign": benign, "overrefusal": over, "task_nll": nll,
            "arithmetic": arith, "json": 0.0}


def test_task_kept_and_the_shrink_curve_by_hand():
    aligned, none = _row(0.9, 0.8, nll=0.7), _row(0.5, 0.3, nll=0.5)
    assert repair_report.task_kept(_row(0, 0, nll=0.55), aligned, none, "benign") == pytest.approx(0.75)
    assert repair_report.task_kept(_row(0, 0, arith=0.6), _row(0, 0, arith=0.2), _row(0, 0, arith=0.7),
                                   "arithmetic") == pytest.approx(0.8)
    results = {"m/aligned": aligned, "m/benign/none": none, "m/benign/shrink-0.5": _row(0.8, 0.6, nll=0.6)}
    curve = repair_report.shrink_curve(results, "m", "benign")
    assert curve == [(0.0, pytest.approx(0.85)), (pytest.approx(0.5), pytest.approx(0.7)), (1.0, pytest.approx(0.4))]
    assert repair_report.curve_at(curve, 0.25) == pytest.approx(0.775)
    assert repair_report.curve_at(curve, 0.75) == pytest.approx(0.55)
    assert repair_report.curve_at(curve, 1.3) == pytest.approx(0.4)  # flat beyond the adapter


def test_bar_check_against_hand_computed_cases():
    aligned = _row(0.9, 0.8, benign=0.05, over=0.08, nll=0.7)
    curve = [(0.0, 0.85), (1.0, 0.4)]
    good = _row(0.86, 0.77, benign=0.05, over=0.05, nll=0.52)
    assert repair_report.bar_check(good, aligned, 0.9, curve, 300.0) == []
    bad = _row(0.5, 0.4, benign=0.12, over=0.09, nll=0.6)  # mean 0.45, the curve 0.625 at task kept 0.5
    misses = repair_report.bar_check(bad, aligned, 0.5, curve, 700.0)
    assert [m.split(" ")[0] for m in misses] == ["AdvBench", "HarmBench", "task", "benign", "over-refusal", "not",
                                                 "11.7"]
    assert misses[0] == "AdvBench 50% < 85.5%" and misses[1] == "HarmBench 40% < 76.0%"  # 95% of 90% and of 80%


@pytest.mark.slow  # minutes on 2 cores: `make test-slow`
def test_smoke_repair_study_runs_every_stage_and_caches(tiny_model_dir, tmp_path, capsys):
    cache, doc = tmp_path / "cache", tmp_path / "repair.md"
    args = ["--config", "smoke", "--base", str(tiny_model_dir), "--cache", str(cache), "--doc", str(doc),
            "--analysis", str(tmp_path / "none.md")]
    assert repair_study.main(args) == 0
    first = capsys.readouterr().err
    assert "aligning (full fine-tune)" in first and "eroding adapter 'json'" in first
    summary = json.loads((cache / "smoke" / "results-smoke.json").read_text())
    results, cfg = summary["results"], repair_study.SMOKE
    expected = {"original"} | {f"{a}/aligned" for a in cfg.aligned_kinds}
    for a in cfg.aligned_kinds:
        for kind in cfg.kinds:
            for phase in range(repair_study.PHASES):
                expected |= {f"{a}/{kind}/{key}" for key in repair_study.rows(cfg, kind, a, phase)}
    assert set(results) == expected
    for row in results.values():
        for key in ("advbench", "harmbench", "benign", "overrefusal", "arithmetic", "json"):
            assert 0.0 <= row[key] <= 1.0
    # The rows are the product's own outputs: shrink 0.5 halves the update of the adapter the none row evaluates.
    import torch

    from salora_merge.io.adapter import read_adapter
    repairs = summary["repairs"]
    before = read_adapter(Path(repairs["lora/benign/none"]["adapter"])).modules
    after = read_adapter(Path(repairs["lora/benign/shrink-0.5"]["adapter"])).modules
    for name, m in before.items():
        torch.testing.assert_close(after[name].lora_B * after[name].scaling, 0.5 * m.lora_B * m.scaling)
    assert repairs["lora/benign/refit"]["method"] == "refit" and repairs["lora/benign/refit"]["seconds"] > 0
    text = doc.read_text()
    assert "## `full` aligned model, adapter `json`" in text and "| `refit-kl` |" in text
    ET.fromstring(doc.with_suffix(".svg").read_text())
    # Cached: a second run computes nothing, and --report-only writes the same document.
    assert repair_study.main(args) == 0
    assert "evaluating" not in capsys.readouterr().err
    assert repair_study.main(args + ["--report-only", "--doc", str(tmp_path / "again.md")]) == 0
    again = (tmp_path / "again.md").read_text().replace("again.svg", "repair.svg")
    assert again.split("## Settings")[1] == text.split("## Settings")[1]


def test_row_keys_follow_the_resolved_options():
    """A row's cache key records the options that differ from refit's first defaults, given or defaulted: the
    previous default spelled out keeps the first main row's key, and today's default (base-answered boundary
    prompts) gives the main row a new one."""
    key = lambda opts: (repair_study.keyed_options("refit", opts), repair_study.changed_defaults("refit", opts))
    assert key({"boundary_prompts": "none"}) == ({}, {})
    assert key({"distill": "kl", "boundary_prompts": "none"}) == ({"distill": "kl"}, {})
    boundary = {"boundary_prompts": "benign-boundary", "max_boundary": 128, "boundary_teacher": "base"}
    assert key({}) == ({}, {"defaults": boundary})
    assert key({"boundary_prompts": "benign-boundary", "boundary_teacher": "adapter"}) == (
        {"boundary_prompts": "benign-boundary"}, {"defaults": {"max_boundary": 128}})
    assert key({"seed": 1})[1] == {"defaults": boundary}
    # Methods without recorded first defaults key by their options as given.
    assert key({})[0] == repair_study.keyed_options("shrink", {}) == {}
    assert repair_study.keyed_options("shrink", {"gamma": 0.5}) == {"gamma": 0.5}


def test_renamed_rows_keep_their_evaluation_key():
    assert repair_study.eval_key("lora/benign/refit-no-boundary") == "lora/benign/refit"
    assert repair_study.eval_key("full/arithmetic/refit-task-no-boundary") == "full/arithmetic/refit-task"
    assert repair_study.eval_key("lora/benign/refit") == "lora/benign/refit"  # today's default: its own key
    assert repair_study.eval_key("aligned") == "aligned"


def test_seed_spread_by_hand():
    rows = {"lora/json/refit": {**_row(0.9, 0.8, benign=0.02), "json": 1.0},
            "lora/json/refit-seed1": {**_row(0.94, 0.7, benign=0.0), "json": 0.9},
            "lora/json/refit-kl": {**_row(0.1, 0.1), "json": 0.0},  # not a seed
            "full/json/refit-seed2": {**_row(0.1, 0.1), "json": 0.0}}  # another aligned model
    text = repair_report.seed_spread({"results": rows}, "lora", "json")
    assert text == ("`refit` over 2 seeds on the json adapter: AdvBench mean 92%, range 90%-94%; HarmBench mean 75%, "
                    "range 70%-80%; benign refusal mean 1%, range 0%-2%; json mean 95%, range 90%-100%.")
    assert repair_report.seed_spread({"results": rows}, "full", "json") is None  # one row is no spread


def test_the_wide_boundary_set_is_what_its_generator_writes():
    import make_boundary_set

    from salora_merge.io.prompts import load_prompt_set

    prompts = make_boundary_set.build()
    assert load_prompt_set("benign-boundary-wide").prompts == tuple(prompts)
    old = load_prompt_set("benign-boundary").prompts
    assert prompts[1::2] == [p for p in old if not p[0].islower()]  # the questions, unchanged
    leads = make_boundary_set.OLD_LEADS + make_boundary_set.NEW_LEADS
    assert all(any(p.lower().startswith(lead + " ") for lead in leads) for p in prompts[::2])


def test_seed_spread_of_another_row():
    rows = {"full/benign/refit-wide": _row(0.9, 0.8, nll=0.4), "full/benign/refit-wide-seed1": _row(0.9, 0.6, nll=0.5),
            "full/benign/refit": _row(0.1, 0.1)}
    text = repair_report.seed_spread({"results": rows}, "full", "benign", "refit-wide")
    assert text.startswith("`refit-wide` over 2 seeds on the benign adapter: AdvBench mean 90%, range 90%-90%; "
                           "HarmBench mean 70%, range 60%-80%") and text.endswith("task NLL mean 0.450, range 0.400-0.500.")


def test_a_stage_that_fails_or_is_missing_leaves_nothing_in_the_cache(tmp_path):
    cache = repair_study.Cache(tmp_path, "study", "digest")

    def fails(tmp: Path):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache.folder("repair", {"row": 1}, fails)
    assert list(tmp_path.iterdir()) == []
    read_only = repair_study.ReadOnlyCache(tmp_path, "study", "digest")
    with pytest.raises(repair_study.Missing):
        read_only.folder("repair", {"row": 1}, fails)
    assert list(tmp_path.iterdir()) == []
    built = cache.folder("repair", {"row": 1}, lambda tmp: (tmp / "done.bin").write_bytes(b"y"))
    assert read_only.folder("repair", {"row": 1}, fails) == built and (built / "done.bin").read_bytes() == b"y"
