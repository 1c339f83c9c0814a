"""Re-fitting an adapter (``realign --method refit``): the objective against direct computations, and the
engine on a tiny model (the anchors' loss falls, the constraint holds, the proximal term holds the factors,
the output loads in stock PEFT, bad inputs are one line with nothing written)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from salora_merge.cli import main
from salora_merge.core.refit_loss import (IGNORE, proximal_penalty, soft_cross_entropy, token_weights,
                                          weighted_cross_entropy)


def test_token_weights_weight_the_first_response_tokens():
    assert token_weights([IGNORE, IGNORE, 5, 6, 7, 8], 2, 4.0) == [0.0, 0.0, 4.0, 4.0, 1.0, 1.0]
    assert token_weights([IGNORE, 5, 6], 0, 4.0) == [0.0, 1.0, 1.0]


def test_weighted_cross_entropy_against_a_direct_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 1, 4], [IGNORE, 2, 6, IGNORE, IGNORE]])
    weights = torch.tensor([[0, 0, 4.0, 4.0, 1.0], [0, 4.0, 1.0, 0, 0]])
    total, norm = 0.0, 0.0
    for b in range(2):
        for t in range(1, 5):
            if labels[b, t] != IGNORE:
                logp = torch.log_softmax(logits[b, t - 1].double(), -1)[labels[b, t]]
                total += -float(logp) * float(weights[b, t])
                norm += float(weights[b, t])
    assert float(weighted_cross_entropy(logits, labels, weights)) == pytest.approx(total / norm, rel=1e-5)


def test_soft_cross_entropy_is_kl_plus_the_teacher_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, 6, generator=g)
    teacher = torch.softmax(torch.randn(1, 3, 6, generator=g), -1)
    ids = torch.arange(6).expand(1, 3, 6)  # k = V: the full distribution
    mask = torch.tensor([[True, False, True]])
    q = torch.log_softmax(logits.double(), -1)
    want = 0.0
    for t in (0, 2):
        p = teacher[0, t].double()
        kl = float((p * (p.log() - q[0, t])).sum())
        entropy = float(-(p * p.log()).sum())
        want += kl + entropy
    assert float(soft_cross_entropy(logits, ids, teacher, mask)) == pytest.approx(want / 2, rel=1e-5)
    # Per-position weights (the distilled answers' first tokens weighted up): a weighted mean of the same terms.
    per = [float(-(teacher[0, t].double() * q[0, t]).sum()) for t in range(3)]
    w = torch.tensor([[4.0, 0.0, 1.0]])
    assert float(soft_cross_entropy(logits, ids, teacher, w)) == pytest.approx((4 * per[0] + per[2]) / 5, rel=1e-5)
    a = torch.ones(2, 2, requires_grad=True)
    assert float(proximal_penalty([(a, torch.zeros(2, 2))])) == 4.0


def _refit(base, adapter, out, *extra):
    return CliRunner().invoke(main, ["realign", "--base", str(base), "--adapter", str(adapter), "--method", "refit",
                                     "--max-anchors", "8", "--answer-tokens", "6", "--refit-batch", "4",
                                     "--example-length", "512", *map(str, extra), "-o", str(out), "--json"])


@pytest.fixture()
def task_prompts(tmp_path):
    path = tmp_path / "task.txt"
    path.write_text("\n".join(f"Add {i} and {i + 3}." for i in range(8)) + "\n")
    return path


def _anchor_nll(base_dir, factors):
    """Teacher-forced NLL of the cached anchors (the base model's own responses) with ``factors`` applied."""
    from salora_merge.core.refit_loss import token_weights as weights_of
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.loading import load_causal_lm
    from salora_merge.hf.lora_hooks import lora_applied
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.io.prompts import load_prompt_set
    from salora_merge.training.anchors import base_responses
    from salora_merge.training.data import example_from_ids

    base = resolve_model(str(base_dir))
    model = load_causal_lm(base.folder, torch.device("cpu"))
    prompts = [chat_prompt_ids(base.tokenizer, p) for p in load_prompt_set("advbench-calibration").prompts[:8]]
    answers = base_responses(base, model, prompts, 6, 8)
    examples = [example_from_ids(p, a, 512) for p, a in zip(prompts, answers)]
    width = max(len(e.input_ids) for e in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE)
    weights = torch.zeros((len(examples), width))
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        weights[row, :len(e.labels)] = torch.tensor(weights_of(e.labels, 0, 1.0))
        mask[row, :len(e.input_ids)] = 1
    with torch.no_grad(), lora_applied(model, factors):
        logits = model(input_ids=ids, attention_mask=mask).logits
    return float(weighted_cross_entropy(logits, labels, weights))


def _factors(folder):
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    names = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in tensors})
    return {n: (tensors[f"base_model.model.{n}.lora_A.weight"], tensors[f"base_model.model.{n}.lora_B.weight"], scale)
            for n in names}


def test_refit_pulls_the_anchors_back_and_loads_in_peft(tiny_model_dir, tmp_path, monkeypatch, task_prompts):
    from conftest import make_peft_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "refit"
    result = _refit(tiny_model_dir, adapter, out, "--task-prompts", task_prompts, "--steps", 30, "--lr", "5e-3",
                    "--anchor-share", "0.75")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "refit" and report["distilled"] == 8 and report["anchors"] == 24
    # The base model's answers, generated once and cached: the anchors' and the default boundary prompts'.
    assert len(list((tmp_path / "cache" / "anchors").iterdir())) == 2
    assert _anchor_nll(tiny_model_dir, _factors(out)) < _anchor_nll(tiny_model_dir, _factors(adapter))
    before = json.loads((adapter / "adapter_config.json").read_text())
    assert json.loads((out / "adapter_config.json").read_text()) == before  # same targets, rank and scaling
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, str(out))
    assert [w for w in caught if "peft" in str(w.filename)] == []


def test_refit_constraint_and_proximal_term(tiny_model_dir, tiny_calibration_prompts, tmp_path, monkeypatch,
                                            task_prompts):
    from conftest import make_peft_adapter

    from salora_merge.io.safety_file import load_safety_module

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    safety = tmp_path / "s.safetensors"
    assert CliRunner().invoke(main, ["calibrate", "--base", str(tiny_model_dir), "--prompts",
                                     str(tiny_calibration_prompts), "--rank", "4", "--max-new-tokens", "5",
                                     "-o", str(safety)]).exit_code == 0
    result = _refit(tiny_model_dir, adapter, tmp_path / "c", "--task-prompts", task_prompts, "--steps", 3,
                    "--constraint", "salora", "--safety", safety)
    assert result.exit_code == 0, result.output
    bases = load_safety_module(safety).bases
    for name, (_, b, _) in _factors(tmp_path / "c").items():
        assert float((bases[name].double().T @ b.double()).abs().max()) < 1e-5 * max(float(b.abs().max()), 1e-12)
    moved = {}
    for label, coefficient in (("free", "0"), ("held", "1000")):
        result = _refit(tiny_model_dir, adapter, tmp_path / label, "--task-prompts", task_prompts, "--steps", 5,
                        "--lr", "1e-2", "--proximal", coefficient)
        assert result.exit_code == 0, result.output
        old, new = _factors(adapter), _factors(tmp_path / label)
        moved[label] = math.sqrt(sum(float((new[n][1] - old[n][1]).pow(2).sum() + (new[n][0] - old[n][0]).pow(2).sum())
                                     for n in old))
    assert moved["held"] < 0.5 * moved["free"]


@pytest.mark.parametrize("extra, message", [
    (["--task-prompts", "TASK", "--anchor-share", "1"], "--anchor-share 1 trains on anchors only"),
    (["--task-prompts", "EMPTY"], "no prompts"),
    (["--task-prompts", "MISSING"], "no such file"),
    (["--task-prompts", "TASK", "--boundary-prompts", "EMPTY"], "--boundary-prompts"),
    (["--anchor-share", "1", "--boundary-prompts", "TASK", "--boundary-teacher", "adapter"],
     "--boundary-teacher adapter has no effect"),
    (["--task-prompts", "TASK", "--boundary-prompts", "TASK", "--boundary-teacher", "aligned"],
     "--boundary-teacher 'aligned': expected one of base, adapter"),
    (["--task-prompts", "TASK", "--distill", "mse"], "--distill 'mse': expected one of ce, kl"),
    (["--task-prompts", "TASK", "--constraint", "salora"], "needs an output-side safety module (--safety)"),
    (["--task-prompts", "TASK", "--unaligned", "x"], "--aligned and --unaligned belong to the methods that use the aligned/unaligned pair"),
])
def test_refit_bad_inputs(tiny_model_dir, tmp_path, monkeypatch, task_prompts, extra, message):
    from conftest import make_peft_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty.txt").write_text("\n")
    paths = {"EMPTY": tmp_path / "empty.txt", "MISSING": tmp_path / "missing.txt", "TASK": task_prompts}
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    result = _refit(tiny_model_dir, adapter, tmp_path / "o", *[paths.get(e, e) for e in extra])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_refit_kl_distillation_from_a_fresh_start(tiny_model_dir, tmp_path, monkeypatch, task_prompts):
    """--distill kl trains on the adapter's top-k next-token distributions; --start fresh begins at PEFT's init."""
    from conftest import make_peft_adapter

    from salora_merge.training.refit import _teacher_topk
    from salora_merge.training.data import example_from_ids

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    result = _refit(tiny_model_dir, adapter, tmp_path / "kl", "--task-prompts", task_prompts, "--steps", 4,
                    "--distill", "kl", "--kl-top-k", 8, "--start", "fresh", "--lr", "1e-2",
                    "--answer-first-weight", 3)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["answer_first_weight"] == 3.0
    assert report["options"]["distill"] == "kl" and all(math.isfinite(loss) for _, loss in report["losses"])
    new = _factors(tmp_path / "kl")
    assert all(float(b.abs().max()) > 0 for _, b, _ in new.values())  # B left its zero init: it trained
    # the teacher's top-k: the model's own softmax at the positions that predict a learned token, zero elsewhere
    from salora_merge.hf.loading import load_causal_lm

    model = load_causal_lm(tiny_model_dir, torch.device("cpu"))
    example = example_from_ids([1, 2, 3, 4], [5, 6, 7], 64)
    ids, probs = _teacher_topk(model, [example], 8, 4, 0)[0]
    with torch.no_grad():
        full = torch.softmax(model(input_ids=torch.tensor([example.input_ids])).logits[0].double(), -1)
    for t in range(len(example.input_ids)):
        if t in (3, 4, 5):  # positions 3..5 predict the response tokens 4..6
            assert torch.allclose(probs[t].double(), full[t, ids[t]], atol=1e-5)
            assert torch.equal(ids[t], full[t].topk(8).indices)
        else:
            assert float(probs[t].abs().sum()) == 0.0


def test_refit_boundary_prompts_by_teacher(tiny_model_dir, tmp_path, monkeypatch, task_prompts):
    """--boundary-prompts: with --boundary-teacher adapter they are distilled with the task prompts; with base
    they join the anchors with the base model's own (cached) answers."""
    from conftest import make_peft_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    boundary = tmp_path / "boundary.txt"
    boundary.write_text("write a guide to folding towels\nexplain how rust forms\ncreate a plan for a picnic\n"
                        "describe a sunset\n")
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    reports = {}
    for teacher in ("adapter", "base"):
        result = _refit(tiny_model_dir, adapter, tmp_path / teacher, "--task-prompts", task_prompts, "--steps", 2,
                        "--boundary-prompts", boundary, "--boundary-teacher", teacher, "--max-boundary", 3)
        assert result.exit_code == 0, result.output
        reports[teacher] = json.loads(result.stdout)
    assert reports["adapter"]["distilled"] == 8 + 3 and reports["adapter"]["anchors"] == 11
    assert reports["base"]["distilled"] == 8 and reports["base"]["anchors"] == 8
    assert reports["base"]["boundary_prompts"] == "boundary.txt[:3]"
    assert len(list((tmp_path / "cache" / "anchors").iterdir())) == 2  # the anchors' and the boundary's answers
    # Anchors only: the base-answered boundary prompts still join them (8 harmful + 3 benign, each once).
    result = _refit(tiny_model_dir, adapter, tmp_path / "only", "--anchor-share", 1, "--steps", 2,
                    "--boundary-prompts", boundary, "--boundary-teacher", "base", "--max-boundary", 3)
    assert result.exit_code == 0, result.output
    only = json.loads(result.stdout)
    assert only["distilled"] == 0 and only["anchors"] == 11


def test_distilled_items_weight_the_first_answer_tokens_and_anchors_alternate():
    from salora_merge.training.data import example_from_ids
    from salora_merge.training.anchors import alternate
    from salora_merge.training.refit import RefitOptions, distilled_item

    example = example_from_ids([1, 2], [5, 6, 7], 64)  # labels: IGNORE, IGNORE, 5, 6, 7
    ce = distilled_item(example, None, RefitOptions(first_tokens=2, answer_first_weight=3.0))
    assert ce.weights == [0.0, 0.0, 3.0, 3.0, 1.0] and ce.teacher_weights is None
    teacher = (torch.zeros(5, 4, dtype=torch.long), torch.ones(5, 4))
    kl = distilled_item(example, teacher, RefitOptions(first_tokens=2, answer_first_weight=3.0, distill="kl"))
    assert kl.weights == [0.0] * 5 and kl.teacher is teacher
    assert kl.teacher_weights == [0.0, 3.0, 3.0, 1.0, 0.0]  # position j predicts label j + 1
    assert alternate([1, 2, 3, 4], ["a", "b"]) == [1, "a", 2, "b", 3, 4]
    assert alternate([1], ["a", "b", "c"]) == [1, "a", "b", "c"]


def test_blended_factors_against_the_dense_mixture():
    from salora_merge.core.lowrank import blended_factors

    g = torch.Generator().manual_seed(3)
    b1, a1, b2, a2 = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((7, 2), (2, 5), (7, 3), (3, 5)))
    b, a = blended_factors((b1, a1, 0.5), (b2, a2, 2.0), 0.3)
    assert b.shape == (7, 5) and a.shape == (5, 5)
    torch.testing.assert_close(b @ a, 0.3 * 0.5 * b1 @ a1 + 0.7 * 2.0 * b2 @ a2, rtol=1e-12, atol=1e-12)


def test_refit_blend_writes_the_exact_mixture_at_twice_the_rank(tiny_model_dir, tmp_path, monkeypatch, task_prompts):
    """``--blend 0.25``: the same seeded re-fit, written as 0.25 x its update plus 0.75 x the adapter's."""
    from conftest import make_peft_adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    common = ("--task-prompts", task_prompts, "--steps", 4, "--lr", "5e-3")
    assert _refit(tiny_model_dir, adapter, tmp_path / "whole", *common).exit_code == 0
    result = _refit(tiny_model_dir, adapter, tmp_path / "blend", *common, "--blend", "0.25")
    assert result.exit_code == 0, result.output
    before = json.loads((adapter / "adapter_config.json").read_text())
    config = json.loads((tmp_path / "blend" / "adapter_config.json").read_text())
    assert config["r"] == 2 * before["r"] and config["lora_alpha"] == config["r"]
    whole, original, blend = (_factors(f) for f in (tmp_path / "whole", adapter, tmp_path / "blend"))
    for name, (a, b, s) in blend.items():
        dense = lambda f: f[name][2] * f[name][1].double() @ f[name][0].double()  # noqa: E731
        assert not torch.allclose(dense(whole), dense(original))  # the re-fit moved this layer
        torch.testing.assert_close(s * b.double() @ a.double(), 0.25 * dense(whole) + 0.75 * dense(original),
                                   rtol=1e-5, atol=1e-6)
    assert "0.25 x the re-fitted one" in (tmp_path / "blend" / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, str(tmp_path / "blend"))
    assert [w for w in caught if "peft" in str(w.filename)] == []
