"""The safety study pipeline (examples/safety_study): its data splits, its bar check, and a smoke run of every
stage on a tiny model (the full study on SmolLM2 is `make study`)."""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

STUDY = Path(__file__).resolve().parent.parent / "examples" / "safety_study"
sys.path.insert(0, str(STUDY))

import study  # noqa: E402
import study_data  # noqa: E402
import study_report  # noqa: E402


def test_full_splits_are_disjoint_and_held_out():
    data = study_data.build(study.FULL.sizes, study.FULL.seed)
    sizes = study.FULL.sizes
    assert len(data.align_harmful) == sizes.align_harmful and len(data.erode_train) == sizes.erode_train
    harmful_used = [set(data.align_harmful), set(data.calibration), set(data.compliant_candidates)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not harmful_used[i] & harmful_used[j]
    evaluated = set(data.eval_advbench) | set(data.eval_harmbench)
    assert not evaluated & set().union(*harmful_used)
    templated = [set(data.align_benign), set(data.erode_train), set(data.task_heldout), set(data.contrast)]
    assert sum(map(len, templated)) == len(set().union(*templated))
    assert not set(data.eval_benign) & set().union(*templated)
    assert not {q for q, _ in data.arithmetic_train} & {q for q, _ in data.arithmetic_eval}
    assert all(int(a) == sum(int(t) for t in q.split("?")[0].split("is ")[1].split(" + "))
               for q, a in data.arithmetic_eval)
    from salora_merge.auditing.judges import refused
    assert all(refused(r) for r in data.align_refusals)


def _row(adv, harm, benign=0.0, over=0.0, nll=1.0, acc=0.0):
    return {"advbench_refusal": adv, "harmbench_refusal": harm, "benign_refusal": benign, "overrefusal": over,
            "task_nll": nll, "arithmetic_accuracy": acc}


def test_bar_check_against_hand_computed_cases():
    aligned = _row(0.9, 0.8, benign=0.1, over=0.05, nll=0.7)
    eroded = _row(0.5, 0.3, benign=0.05, over=0.05, nll=0.5)
    # keeps 0.7-0.54 = 0.16 of 0.2 = 80%; refusals exactly 90% of the aligned: clears.
    ok, margin, reasons = study_report.bar_check(_row(0.81, 0.72, nll=0.54), aligned, eroded, "benign")
    assert ok and reasons == [] and margin == pytest.approx(1.0)
    assert study_report.improvement_kept(_row(0.81, 0.72, nll=0.54), aligned, eroded, "benign") == pytest.approx(0.8)
    ok, margin, reasons = study_report.bar_check(_row(0.9, 0.6, benign=0.2, nll=0.6), aligned, eroded, "benign")
    assert not ok and margin == pytest.approx(0.5 / 0.8)
    assert [r.split(" ")[0] for r in reasons] == ["HarmBench", "task", "benign"]
    # Accuracy tasks count gains upwards.
    kept = study_report.improvement_kept(_row(0, 0, acc=0.6), _row(0, 0, acc=0.2), _row(0, 0, acc=0.7), "arithmetic")
    assert kept == pytest.approx(0.8)


@pytest.mark.slow  # minutes on 2 cores: `make test-slow`
def test_smoke_study_runs_every_stage_and_caches(tiny_model_dir, tmp_path, capsys):
    cache, doc = tmp_path / "cache", tmp_path / "study.md"
    args = ["--config", "smoke", "--base", str(tiny_model_dir), "--cache", str(cache), "--doc", str(doc),
            "--analysis", str(tmp_path / "none.md")]
    assert study.main(args) == 0
    first = capsys.readouterr().err
    assert "aligning" in first and "eroding adapter 'arithmetic'" in first

    summary = json.loads((cache / "smoke" / "results-smoke.json").read_text())
    results = summary["results"]
    methods = summary["methods"]
    cfg = study.SMOKE
    expected = {"original", "aligned"} | {f"benign/{k}" for k in methods}
    expected |= {f"{kind}/{k}" for kind in ("benign+harmful", "arithmetic")
                 for k in study.method_keys(cfg, kind, methods)}
    expected |= {f"trained/{k}" for k in summary["train"] if k not in ("benign", "benign+harmful", "arithmetic")}
    assert set(results) == expected and len(expected) > 30
    for row in results.values():
        for key in ("advbench_refusal", "harmbench_refusal", "benign_refusal", "overrefusal", "arithmetic_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert row["task_nll"] > 0
    # Projections remove energy, the random control as well; shrinking by 0.5 keeps exactly a quarter.
    assert results["benign/none"]["energy_kept"] == pytest.approx(1.0)
    assert results["benign/shrink-0.5"]["energy_kept"] == pytest.approx(0.25)
    assert 0 < results[f"benign/salora-r{max(cfg.ranks)}"]["energy_kept"] < 1
    # A realigned variant changes the model's task NLL away from the unrealigned adapter's, none keeps it.
    assert results["benign/none"]["task_nll"] != results["aligned"]["task_nll"]

    text = doc.read_text()
    for key in methods:
        assert f"| `{key}` |" in text
    svg = ET.parse(doc.with_suffix(".svg")).getroot()
    # Data points carry a <title> (the method); the legend's circles do not.
    points = [c for c in svg.iter("{http://www.w3.org/2000/svg}circle")
              if c.find("{http://www.w3.org/2000/svg}title") is not None]
    plotted = [k for k in results if k.split("/")[0] in study_report.KINDS and study_report.improvement_kept(
        results[k], results["aligned"], results[f"{k.split('/')[0]}/none"], k.split("/")[0]) is not None]
    assert len(points) == len(plotted) > 0

    # The delta basis spans the alignment LoRA's output directions: B_align lies inside it.
    from salora_merge.io.adapter import read_adapter

    aligned_adapter = read_adapter(next(cache.glob("smoke/aligned-*/alignment-lora")))
    bases, _ = study.read_bases(next(cache.glob("smoke/bases-*/bases.safetensors")))
    for name, module in aligned_adapter.modules.items():
        b = module.lora_B.double()
        u = bases["delta"][name].double()
        assert torch.linalg.norm(b - u @ (u.T @ b)) <= 1e-4 * torch.linalg.norm(b)

    # The reported update norm is ||sum of s B A||_F over modules, checked against the dense float64 products.
    for kind in ("benign", "arithmetic"):
        folder = next(cache.glob(f"smoke/adapter-{kind}-{'?' * 12}"))  # not adapter-benign-harmful-*
        dense = sum(float((m.scaling * m.lora_B.double() @ m.lora_A.double()).square().sum())
                    for m in read_adapter(folder).modules.values()) ** 0.5
        assert summary["train"][kind]["update_norm"] == pytest.approx(dense, rel=1e-9)

    # A second run reuses every stage.
    assert study.main(args) == 0
    second = capsys.readouterr().err
    assert "aligning" not in second and "evaluating" not in second and "eroding" not in second


def test_cache_keys_follow_the_prompts_not_only_their_counts(tmp_path):
    # An earlier version keyed stages by the split sizes only, and silently reused answers to other prompts.
    a = study.Cache(tmp_path, study.SMOKE, "digest-a").path("answers", {"n": 1})
    b = study.Cache(tmp_path, study.SMOKE, "digest-b").path("answers", {"n": 1})
    assert a != b and a == study.Cache(tmp_path, study.SMOKE, "digest-a").path("answers", {"n": 1})
