"""SaLoRA training: the math against dense float64, the model against the base and against PEFT, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from salora_merge.cli import main
from salora_merge.core.training_math import (export_alpha, export_factors, gaussian_init, pissa_init, project_out,
                                        residual_weight, salora_init)

from conftest import TRAIN_TARGETS as TARGETS  # noqa: E402  (the shared safety_file covers these)
from conftest import TRAIN_WORDS as WORDS  # noqa: E402


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q


# ---------------------------------------------------------------- pure math, float64


def test_salora_init_matches_its_definition_and_keeps_the_layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    u_t, u_s = _orthonormal(24, 6, 1), _orthonormal(24, 4, 2)
    a0, b0 = salora_init(w, 5, u_t)
    # Independent reference: full SVD, then the formulas of method.md section 2.
    u, s, vh = torch.linalg.svd(w)
    root = torch.diag(s[:5].sqrt())
    assert torch.allclose(a0, root @ vh[:5], atol=1e-12)
    assert torch.allclose(b0, u_t @ u_t.T @ u[:, :5] @ root, atol=1e-12)
    scale = 16 / 5
    w_res = residual_weight(w, a0, b0, u_s, scale)
    c = torch.eye(24, dtype=torch.float64) - u_s @ u_s.T
    assert torch.allclose(w_res + scale * c @ b0 @ a0, w, atol=1e-12)  # the layer computes W x at step 0
    assert torch.allclose(u_s.T @ w_res, u_s.T @ w, atol=1e-12)  # safety features of W_res are W's


def test_pissa_and_gaussian_inits():
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a0, b0 = pissa_init(w, 12)
    assert torch.allclose(b0 @ a0, w, atol=1e-12)  # full rank: the principal part is all of W
    a, b = gaussian_init(20, 12, 4, torch.Generator().manual_seed(0))
    assert a.shape == (4, 12) and b.shape == (20, 4) and not b.any()
    assert a.abs().max() <= 1 / math.sqrt(12) and a.abs().max() > 0.5 / math.sqrt(12)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_export_equals_the_trained_layer(use_rslora):
    g = torch.Generator().manual_seed(5)
    d_out, d_in, r = 18, 30, 3
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    u_s = _orthonormal(d_out, 4, 6)
    a0, b0 = salora_init(w, r, _orthonormal(d_out, 5, 7))
    a = a0 + 0.1 * torch.randn(r, d_in, generator=g, dtype=torch.float64)  # "trained"
    b = b0 + 0.1 * torch.randn(d_out, r, generator=g, dtype=torch.float64)
    alpha = 8.0
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    c = torch.eye(d_out, dtype=torch.float64) - u_s @ u_s.T
    trained = residual_weight(w, a0, b0, u_s, s) + s * c @ b @ a
    lora_a, lora_b = export_factors(a, b, a0, b0, u_s)
    assert lora_a.shape == (2 * r, d_in) and lora_b.shape == (d_out, 2 * r)
    alpha2 = export_alpha(alpha, use_rslora, 2)
    s2 = alpha2 / math.sqrt(2 * r) if use_rslora else alpha2 / (2 * r)  # PEFT's scaling of the export
    assert s2 == pytest.approx(s, rel=1e-15)
    exported = w + s2 * lora_b.double() @ lora_a.double()
    assert torch.allclose(exported, trained, atol=1e-5)  # factors are float32
    assert (u_s.T @ lora_b.double()).abs().max() < 1e-6  # the export cannot reach the safety subspace


def test_project_out_is_the_orthogonal_complement():
    u = _orthonormal(10, 3, 0).float()
    y = torch.randn(4, 7, 10)
    cy = project_out(y, u)
    assert (cy @ u).abs().max() < 1e-5
    assert torch.allclose(project_out(cy, u), cy, atol=1e-6)  # idempotent


# ---------------------------------------------------------------- tiny model fixtures


def _options(**kw):
    from salora_merge.training.train import TrainOptions
    from salora_merge.training.trainer import FitOptions

    fit = FitOptions(max_steps=kw.pop("steps", 12), lr=kw.pop("lr", 5e-3), batch_size=4, grad_accum=1,
                     logging_steps=1, save_steps=kw.pop("save_steps", 1000), show_progress=False, warmup_ratio=0.0,
                     scheduler="constant")
    return TrainOptions(rank=kw.pop("rank", 4), alpha=kw.pop("alpha", 8.0), task_rank=6, targets=TARGETS,
                        device="cpu", fit=fit, **kw)


def _prepared(tiny_model_dir, safety_file, data_file, **kw):
    from salora_merge.io.safety_file import load_safety_module
    from salora_merge.hf.loading import load_tokenizer
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.training.train import prepare_model
    from salora_merge.training.data import tokenize_all
    from salora_merge.training.data import load_conversations

    base = resolve_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(base.folder)
    examples = tokenize_all(tokenizer, load_conversations(data_file), 128, "data")
    options = _options(**kw)
    return prepare_model(base, load_safety_module(safety_file), examples, options), examples, options


def _batch(tokenizer):
    texts = ["Repeat the word zulu.", "How are safety features kept?"]
    enc = [tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
    return ids, mask


def _base_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# ---------------------------------------------------------------- model level


@pytest.mark.parametrize("init", ["salora", "pissa", "gaussian"])
def test_initialization_leaves_outputs_unchanged(tiny_model_dir, safety_file, data_file, init):
    prepared, _, _ = _prepared(tiny_model_dir, safety_file, data_file, init=init)
    assert len(prepared.layers) == 2 * len(TARGETS)
    if init != "gaussian":  # the trainable factors really start non-zero
        assert all(layer.lora_B.abs().max() > 0 for layer in prepared.layers.values())
    ids, mask = _batch(prepared.tokenizer)
    with torch.no_grad():
        got = prepared.model(input_ids=ids, attention_mask=mask).logits
        want = _base_model(tiny_model_dir)(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("init", ["salora", "gaussian"])
def test_training_keeps_safety_features_loss_falls_and_export_equals_model(
        tiny_model_dir, safety_file, data_file, tmp_path, init):
    """During training U_s^T of every adapted layer's output equals the base layer's on the same input; the
    loss falls; the exported rank-2r adapter, loaded by stock PEFT on the untouched base, equals the model."""
    from peft import PeftModel
    from transformers import TrainerCallback

    from salora_merge.io.adapter import write_adapter
    from salora_merge.training.train import adapter_config, export_modules
    from salora_merge.training.trainer import fit

    prepared, examples, options = _prepared(tiny_model_dir, safety_file, data_file, steps=30, lr=5e-2, init=init)
    base = _base_model(tiny_model_dir)
    original = {name: base.get_submodule(name) for name in prepared.layers}
    checks: list[float] = []

    class SafetyInvariant(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            with torch.no_grad():
                worst = 0.0
                for name, layer in prepared.layers.items():
                    x = torch.randn(16, layer.in_features)
                    u = layer.safety_basis
                    drift = (layer(x) - original[name](x)) @ u  # U_s^T (h - h_base): zero up to round-off
                    # What the same factors would move without C (the constraint is doing real work):
                    free = layer.scaling * (x @ (layer.lora_B @ layer.lora_A - layer.lora_B0 @ layer.lora_A0).T) @ u
                    worst = max(worst, float(drift.abs().max() / free.abs().max()))
                checks.append(worst)

    from salora_merge.training.task_eval import mean_nll, score_examples

    pad = prepared.tokenizer.pad_token_id
    nll_before = mean_nll(score_examples(prepared.model.eval(), examples, pad))
    start_b = {n: layer.lora_B.detach().clone() for n, layer in prepared.layers.items()}
    result = fit(prepared.model, examples, prepared.tokenizer.pad_token_id, options.fit, tmp_path / "ckpt",
                 callbacks=[SafetyInvariant()])
    assert result.global_step == 30 and len(checks) == 30
    assert max(checks) < 1e-4, max(checks)
    assert any((layer.lora_B - start_b[n]).abs().max() > 1e-3 for n, layer in prepared.layers.items())
    # The loss falls: the same examples, scored deterministically before and after (a random 2-layer model
    # with hidden size 32 starts near ln(vocab) and cannot fit much; SmolLM2's run is in test_e2e_smollm2).
    nll_after = mean_nll(score_examples(prepared.model.eval(), examples, pad))
    assert nll_after < nll_before - 0.1, (nll_before, nll_after)

    modules = export_modules(prepared.layers)
    folder = tmp_path / "adapter"
    folder.mkdir()
    doubled = init != "gaussian"  # gaussian has no fixed part A0, B0: the export keeps rank r
    write_adapter(folder, adapter_config(options, str(tiny_model_dir), list(TARGETS), doubled), modules, {})
    peft_model = PeftModel.from_pretrained(_base_model(tiny_model_dir), str(folder)).eval()
    assert peft_model.peft_config["default"].r == (2 if doubled else 1) * options.rank
    prepared.model.eval()
    ids, mask = _batch(prepared.tokenizer)
    with torch.no_grad():
        want = prepared.model(input_ids=ids, attention_mask=mask).logits
        got = peft_model(input_ids=ids, attention_mask=mask).logits
        moved = (want - base(input_ids=ids, attention_mask=mask).logits).abs().max()
    assert moved > 1e-2  # training changed the model, so the equality below means something
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def _cli_train(tiny_model_dir, safety_file, data_file, out, *extra, init="salora"):
    return CliRunner().invoke(main, [
        "train", "--base", str(tiny_model_dir), "--data", str(data_file), "--safety", str(safety_file),
        "--rank", "4", "--alpha", "8", "--task-rank", "6", "--targets", "q_proj,v_proj", "--lr", "1e-2",
        "--batch-size", "4", "--grad-accum", "1", "--device", "cpu", "--quiet", "-o", str(out),
        *(["--init", init] if init else []), *extra])


def test_cli_train_writes_a_peft_adapter_and_merges(tiny_model_dir, safety_file, data_file, tmp_path):
    from peft import PeftModel

    out, merged = tmp_path / "adapter", tmp_path / "merged"
    result = _cli_train(tiny_model_dir, safety_file, data_file, out, "--max-steps", "6", "--use-rslora",
                        "--gradient-checkpointing", "--merge-to", str(merged), "--json")
    control = _cli_train(tiny_model_dir, safety_file, data_file, tmp_path / "control", "--max-steps", "2",
                         "--random-control", "3", "--json", init=None)
    assert control.exit_code == 0, control.output
    # The default init is PEFT's (gaussian): no initial part, so the export keeps rank r.
    assert json.loads(control.stdout)["init"] == "gaussian" and json.loads(control.stdout)["export_rank"] == 4
    from salora_merge.core.audit_math import module_scores, summarize
    from salora_merge.io.adapter import read_adapter
    from salora_merge.io.safety_file import load_safety_module

    # The control's update avoids random subspaces, not the safety module's: it has energy inside U_s.
    trained = read_adapter(tmp_path / "control").modules
    bases = load_safety_module(safety_file).bases
    rho = summarize(module_scores({n: (m.lora_A, m.lora_B, m.scaling) for n, m in trained.items()},
                                  {n: bases[n] for n in trained})).rho
    assert rho > 1e-3 and json.loads(control.stdout)["options"]["random_control"] == 3
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["global_step"] == 6 and report["export_rank"] == 8
    assert report["export_alpha"] == pytest.approx(8 * math.sqrt(2))
    assert report["safety_energy"] < 1e-10
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "salora_train.json"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["use_rslora"] is True
    assert not (tmp_path / "adapter.checkpoints").exists()  # removed after success
    # The merged model equals stock PEFT with the exported adapter on the untouched base.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ids, mask = _batch(tokenizer)
    with torch.no_grad():
        want = PeftModel.from_pretrained(_base_model(tiny_model_dir), str(out)).eval()(
            input_ids=ids, attention_mask=mask).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged)).eval()(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_cli_train_resumes_from_a_checkpoint(tiny_model_dir, safety_file, data_file, tmp_path, monkeypatch):
    """Interrupted after a checkpoint, --resume finishes with the same adapter as an uninterrupted run."""
    from safetensors.torch import load_file

    import salora_merge.training.trainer as trainer_module

    full = tmp_path / "full"
    full_result = _cli_train(tiny_model_dir, safety_file, data_file, full, "--max-steps", "6", "--logging-steps", "1",
                             "--json")
    assert full_result.exit_code == 0, full_result.output

    out = tmp_path / "resumed"
    real_fit = trainer_module.fit

    def interrupted_fit(*args, **kwargs):
        from transformers import TrainerCallback

        class Stop(TrainerCallback):
            def on_step_end(self, a, state, control, **kw):
                if state.global_step == 4:
                    raise KeyboardInterrupt

        kwargs["callbacks"] = [*kwargs.get("callbacks", ()), Stop()]
        return real_fit(*args, **kwargs)

    monkeypatch.setattr("salora_merge.training.train.fit", interrupted_fit)
    result = _cli_train(tiny_model_dir, safety_file, data_file, out, "--max-steps", "6", "--save-steps", "3",
                        "--logging-steps", "1")
    assert result.exit_code == 130
    assert not out.exists()
    assert (tmp_path / "resumed.checkpoints" / "checkpoint-3" / "salora_state.safetensors").is_file()
    monkeypatch.setattr("salora_merge.training.train.fit", real_fit)

    again = _cli_train(tiny_model_dir, safety_file, data_file, out, "--max-steps", "6", "--save-steps", "3",
                       "--logging-steps", "1")
    assert again.exit_code == 1 and "--resume" in again.output  # never silently restarts over checkpoints
    changed = _cli_train(tiny_model_dir, safety_file, data_file, out, "--max-steps", "6", "--save-steps", "3",
                         "--resume", "--lr", "5e-3", "--logging-steps", "1")
    assert changed.exit_code == 1 and "option lr differs" in changed.output, changed.output
    resumed = _cli_train(tiny_model_dir, safety_file, data_file, out, "--max-steps", "6", "--save-steps", "3",
                         "--resume", "--json", "--logging-steps", "1")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"].endswith("checkpoint-3")
    # The step after the checkpoint sees the same weights, batch and learning rate as the uninterrupted run,
    # so its logged loss is the same. Later steps agree only to round-off: CPU BLAS is not bit-reproducible
    # across processes, and Adam turns round-off in near-zero gradient entries into +-lr steps.
    want = dict(json.loads(full_result.stdout)["losses"])
    got = dict(json.loads(resumed.stdout)["losses"])
    assert sorted(got) == [1, 2, 3, 4, 5, 6] and got[4] == pytest.approx(want[4], abs=1e-6)
    assert got[6] == pytest.approx(want[6], abs=2e-2)
    assert not (tmp_path / "resumed.checkpoints").exists()  # removed after success
    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x", "output": "y"}\nnot json\n', "data.jsonl:2: not valid JSON"),
    ('{"question": "x"}\n', "data.jsonl:1: expected 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "data.jsonl:1: the conversation has no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "data.jsonl:1: messages[0] must be"),
    ('{"prompt": "a", "response": "b"}\n{"instruction": "x", "output": "y"}\n', "data.jsonl:2: a 'instruction' record"),
    ("", "holds no records"),
])
def test_bad_training_data_is_one_line(tiny_model_dir, safety_file, tmp_path, content, message):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    result = _cli_train(tiny_model_dir, safety_file, data, tmp_path / "out")
    assert result.exit_code == 1
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_bad_options_and_mismatched_safety(tiny_model_dir, other_model_dir, safety_file, data_file,
                                           tiny_calibration_prompts, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--rank", "0"], "--rank must be positive"),
        (["--rank", "17"], "--rank 17 exceeds the dimensions"),
        (["--targets", "gate_proj"], "has no safety basis for model.layers.0.mlp.gate_proj"),
        (["--targets", "nope"], "--targets 'nope' matches no linear layer"),
        (["--resume"], "holds no training run to resume"),
    ]
    for extra, message in cases:
        result = _cli_train(tiny_model_dir, safety_file, data_file, out, *extra)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
        assert not out.exists()
    result = _cli_train(other_model_dir, safety_file, data_file, out)
    assert result.exit_code == 1 and "computed for base model" in result.output
    inside = tmp_path / "input-side.safetensors"
    assert CliRunner().invoke(main, [
        "calibrate", "--base", str(tiny_model_dir), "--prompts", str(tiny_calibration_prompts), "--rank", "4",
        "--max-new-tokens", "4", "--side", "input", "--targets", "q_proj,v_proj", "-o", str(inside)]).exit_code == 0
    result = _cli_train(tiny_model_dir, inside, data_file, out)
    assert result.exit_code == 1 and "needs an output-side one" in result.output
    out.mkdir()
    result = _cli_train(tiny_model_dir, safety_file, data_file, out)
    assert result.exit_code == 1 and "already exists" in result.output


def test_multi_turn_conversations_learn_only_assistant_turns(tiny_model_dir):
    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.hf.loading import load_tokenizer
    from salora_merge.training.data import IGNORE, tokenize_conversation

    tokenizer = load_tokenizer(tiny_model_dir)
    conversation = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"),
                    ("assistant", "Ciao"))
    example = tokenize_conversation(tokenizer, conversation, 512)
    learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])
    assert learned == "Hello<|im_end|>\nCiao<|im_end|>\n"
    # The context before the first answer is tokenized exactly as at inference.
    prompt = chat_prompt_ids(tokenizer, "Hi")
    single = tokenize_conversation(tokenizer, (("user", "Hi"), ("assistant", "Hello")), 512)
    assert single.input_ids[: single.prompt_length] == prompt
    assert tokenize_conversation(tokenizer, conversation, 5) is None  # truncation left no learned token


# ---------------------------------------------------------------- retrain


def _cli_retrain(tiny_model_dir, safety_file, adapter, out, *extra):
    return CliRunner().invoke(main, [
        "retrain", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--safety", str(safety_file),
        "--task-rank", "6", "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "1", "--device", "cpu", "--quiet",
        "--max-new-tokens", "8", "-o", str(out), *extra])


def test_retrain_by_distillation_reports_the_comparison(tiny_model_dir, safety_file, tmp_path):
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "old", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    prompts = tmp_path / "task.txt"
    prompts.write_text("".join(f"Spell the word {w} backwards.\n" for w in WORDS))
    out = tmp_path / "new"
    result = _cli_retrain(tiny_model_dir, safety_file, adapter, out, "--prompts", str(prompts), "--max-steps", "8",
                          "--holdout", "0.25", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"] == "distilled" and report["heldout_examples"] == 4 and report["train_examples"] == 12
    train = report["train"]
    # The old adapter's r and alpha; the default init (gaussian) exports rank r.
    assert train["rank"] == 4 and train["alpha"] == 8 and train["export_rank"] == 4 and train["init"] == "gaussian"
    for key in ("base", "original", "retrained"):
        assert math.isfinite(report["nll"][key]) and 0 <= report["target_accuracy"][key] <= 1
    # The held-out targets are the original adapter's own greedy answers: it predicts them best.
    assert report["target_accuracy"]["original"] == 1.0
    assert report["target_accuracy"]["base"] < 1.0  # so the adapter changes the answers
    assert 0 <= report["agreement"] <= 1 and 0 <= report["exact_match"] <= 1
    assert report["weight_space"]["original"] > 1e-3 and report["weight_space"]["retrained"] < 1e-10
    assert (out / "salora_retrain.json").is_file() and (out / "adapter_config.json").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]


def test_retrain_with_task_data_and_bad_input(tiny_model_dir, safety_file, data_file, tmp_path):
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "old", r=2, lora_alpha=4, target_modules=["v_proj"])
    out = tmp_path / "new"
    result = _cli_retrain(tiny_model_dir, safety_file, adapter, out, "--data", str(data_file), "--max-steps", "4",
                          "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"] == "data" and report["exact_match"] is None
    assert report["heldout_examples"] == 2 and report["train"]["rank"] == 2
    both = _cli_retrain(tiny_model_dir, safety_file, adapter, tmp_path / "x", "--data", str(data_file),
                        "--prompts", "p.txt")
    assert both.exit_code == 1 and "exactly one of --data" in both.output
    missing = _cli_retrain(tiny_model_dir, safety_file, tmp_path / "nope", tmp_path / "x", "--data", str(data_file))
    assert missing.exit_code == 1 and "not a folder and not a Hub id" in missing.output
    assert not (tmp_path / "x").exists()


def test_resume_with_a_corrupt_run_file_is_one_line(tiny_model_dir, safety_file, data_file, tmp_path):
    folder = tmp_path / "out.checkpoints"
    folder.mkdir()
    (folder / "salora_train_run.json").write_text("{not json")
    result = _cli_train(tiny_model_dir, safety_file, data_file, tmp_path / "out", "--resume")
    assert result.exit_code == 1 and "salora_train_run.json is not valid JSON" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- no safety module: plain LoRA


def test_without_a_safety_module_training_is_plain_lora_as_peft_trains_it(tiny_model_dir, data_file, tmp_path):
    """With no safety module the layer is plain LoRA: the same initial factors trained by the same trainer as a
    stock PEFT LoRA model end at the same factors, and the export loads in PEFT equal to the trained model."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from salora_merge.hf.loading import load_tokenizer
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.io.adapter import write_adapter
    from salora_merge.training.data import load_conversations, tokenize_all
    from salora_merge.training.train import adapter_config, export_modules, prepare_model
    from salora_merge.training.trainer import fit

    base = resolve_model(str(tiny_model_dir))
    examples = tokenize_all(load_tokenizer(base.folder), load_conversations(data_file), 128, "data")
    options = _options(steps=10, lr=5e-2)
    prepared = prepare_model(base, None, examples, options)
    assert all(layer.safety_basis.shape[1] == 0 for layer in prepared.layers.values())
    # Start B away from zero, so that both factors move from the first step.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in prepared.layers.values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))
    start = {n: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for n, layer in prepared.layers.items()}
    peft = get_peft_model(_base_model(tiny_model_dir), LoraConfig(r=options.rank, lora_alpha=options.alpha,
                                                                  target_modules=list(TARGETS), lora_dropout=0.0))
    for name, (a, b) in start.items():
        module = peft.base_model.model.get_submodule(name)
        module.lora_A["default"].weight.data.copy_(a)
        module.lora_B["default"].weight.data.copy_(b)
    pad = prepared.tokenizer.pad_token_id
    fit(prepared.model, examples, pad, options.fit, tmp_path / "ours")
    fit(peft, examples, pad, options.fit, tmp_path / "peft")
    for name, layer in prepared.layers.items():
        module = peft.base_model.model.get_submodule(name)
        want_a, want_b = module.lora_A["default"].weight, module.lora_B["default"].weight
        assert (layer.lora_B - start[name][1]).abs().max() > 1e-3  # trained
        assert (layer.lora_A - want_a).abs().max() < 1e-5 * max(1.0, float(want_a.detach().abs().max())), name
        assert (layer.lora_B - want_b).abs().max() < 1e-5 * max(1.0, float(want_b.detach().abs().max())), name
    folder = tmp_path / "adapter"
    folder.mkdir()
    write_adapter(folder, adapter_config(options, str(tiny_model_dir), list(TARGETS), False),
                  export_modules(prepared.layers), {})
    loaded = PeftModel.from_pretrained(_base_model(tiny_model_dir), str(folder)).eval()
    ids, mask = _batch(prepared.tokenizer)
    with torch.no_grad():
        want = prepared.model.eval()(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_cli_train_and_retrain_without_a_safety_module(tiny_model_dir, safety_file, data_file, tmp_path):
    """No --safety: a plain LoRA whose update is free to enter the safety subspace (the same run with --safety keeps
    it out), a report and card that say so; --random-control without --safety is one line with nothing written."""
    from conftest import make_peft_adapter

    from salora_merge.core.audit_math import module_scores, summarize
    from salora_merge.io.adapter import read_adapter
    from salora_merge.io.safety_file import load_safety_module

    def train(out, *extra):
        return CliRunner().invoke(main, [
            "train", "--base", str(tiny_model_dir), "--data", str(data_file), "--rank", "4", "--alpha", "8",
            "--targets", "q_proj,v_proj", "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "1", "--device", "cpu",
            "--quiet", "--no-keep-refusals", "--max-steps", "4", "-o", str(out), "--json", *extra])

    plain = train(tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    report = json.loads(plain.stdout)
    assert report["safety"] is None and report["safety_rank"] == 0 and report["safety_energy"] is None
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "# LoRA adapter trained with refusal anchors" in card and "No refusal anchors" in card
    assert "SaLoRA's constraint was off" in card
    bases = load_safety_module(safety_file).bases
    rho = {}
    constrained = train(tmp_path / "salora", "--safety", str(safety_file))
    assert constrained.exit_code == 0, constrained.output
    for name in ("plain", "salora"):
        modules = read_adapter(tmp_path / name).modules
        rho[name] = summarize(module_scores({n: (m.lora_A, m.lora_B, m.scaling) for n, m in modules.items()},
                                            {n: bases[n] for n in modules})).rho
    assert rho["plain"] > 1e-3 and rho["salora"] < 1e-10, rho
    rendered = CliRunner().invoke(main, ["train", "--base", str(tiny_model_dir), "--data", str(data_file),
                                         "--targets", "q_proj,v_proj", "--device", "cpu", "--quiet",
                                         "--no-keep-refusals", "--max-steps", "1", "-o", str(tmp_path / "text")])
    assert rendered.exit_code == 0 and "no safety module: SaLoRA's constraint off" in rendered.output
    bad = train(tmp_path / "bad", "--random-control", "3")
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1 and "give --safety" in bad.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.checkpoints").exists()

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "old", r=2, lora_alpha=4, target_modules=["v_proj"])
    retrained = CliRunner().invoke(main, [
        "retrain", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--data", str(data_file), "--lr", "1e-2",
        "--batch-size", "4", "--grad-accum", "1", "--device", "cpu", "--quiet", "--no-keep-refusals",
        "--max-steps", "2", "-o", str(tmp_path / "re")])
    assert retrained.exit_code == 0, retrained.output
    assert "No safety module given: no weight-space score" in retrained.output
    saved = json.loads((tmp_path / "re" / "salora_retrain.json").read_text())
    assert saved["weight_space"] is None and saved["train"]["safety"] is None


def test_retrain_with_discovered_prompts(tiny_model_dir, tmp_path, monkeypatch):
    """--prompts discover: the prompts come from repair's discovery (sampled turns and the pool, ranked); the
    report lists the kept ones by salience; the distilled examples are those prompts; a bad --discover-top is one
    line with nothing written."""
    from conftest import make_peft_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "old", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    common = ["retrain", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--prompts", "discover",
              "--lr", "1e-2", "--batch-size", "4", "--grad-accum", "1", "--device", "cpu", "--quiet",
              "--no-keep-refusals", "--max-new-tokens", "6", "--max-steps", "2"]
    result = CliRunner().invoke(main, [*common, "--discover-top", "12", "--holdout", "0.25", "-o", str(tmp_path / "new"),
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    found = report["discovery"]
    kept = found["kept"]
    assert report["source"] == "distilled" and len(kept) == 12
    assert found["sampled"] == 128 and found["ranked"] >= 12
    assert [k["salience"] for k in kept] == sorted((k["salience"] for k in kept), reverse=True)
    assert {k["source"] for k in kept} <= {"sampled", "pool"}
    assert report["train_examples"] + report["heldout_examples"] == 12 and report["heldout_examples"] == 3
    bad = CliRunner().invoke(main, [*common, "--discover-top", "2", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "--discover-top must be at least 4" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
