"""End to end on the real SmolLM2-135M-Instruct (the built-in alias): calibrate, realign the shipped
example adapter, load the result with stock PEFT and check the safety invariant on the merged weights."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from salora_merge.cli import main
from salora_merge.io.safety_file import load_safety_module

pytestmark = pytest.mark.slow
EXAMPLE = Path(__file__).parent.parent / "examples" / "adapters" / "smollm2-benign-lora"


def test_calibrate_and_realign_smollm2(tmp_path):
    runner = CliRunner()
    safety_path = tmp_path / "smollm2.safety.safetensors"
    result = runner.invoke(main, ["calibrate", "--base", "smollm2-135m-instruct", "--max-prompts", "16",
                                  "--max-new-tokens", "32", "--targets", "q_proj,v_proj", "--device", "cpu",
                                  "-o", str(safety_path), "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output[result.output.index("{"):])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["n_prompts"] == 16 and meta["n_tokens"] > 16 * 5

    out = tmp_path / "realigned"
    result = runner.invoke(main, ["realign", "--base", "smollm2-135m-instruct", "--adapter", str(EXAMPLE),
                                  "--safety", str(safety_path), "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert len(report["modules"]) == 60
    assert all(0 < m["energy_removed"] < 1 for m in report["modules"])

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from salora_merge.hf.resolve import resolve_model

    folder = resolve_model("smollm2-135m-instruct").folder
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    base_weights = {n: p.detach().clone().double() for n, p in base.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(out))
    assert [w for w in caught if "peft" in str(w.filename)] == []
    merged = model.merge_and_unload()
    safety = load_safety_module(safety_path)
    # q_proj and v_proj of each layer read one tensor: 30 sites, no more and no fewer.
    assert len(safety.sites) == 60 and len(set(safety.sites.values())) == 30
    merged_weights = dict(merged.named_parameters())
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.19.self_attn.v_proj",
                   "model.layers.29.self_attn.v_proj"):
        u = safety.bases[module].double()
        w0 = base_weights[f"{module}.weight"]
        w1 = merged_weights[f"{module}.weight"].detach().double()
        assert (w1 - w0).abs().max() > 0  # the adapter still changes the layer...
        # ... but not its safety features: U_s^T W is preserved up to float32 merge round-off.
        assert (u.T @ (w1 - w0)).abs().max() < 1e-5 * w0.abs().max()


def test_merge_smollm2_equals_peft_and_loads_cleanly(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from salora_merge.hf.resolve import resolve_model

    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", "--base", "smollm2-135m-instruct", "--adapter", str(EXAMPLE),
                                       "--shard-size", "200MB", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert len(report["shards"]) == 3 and report["changed_tensors"] == 60 and report["untied"] == []
    ours, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ours.config.tie_word_embeddings  # q/v adapters leave the tied embeddings alone
    folder = resolve_model("smollm2-135m-instruct").folder
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder)), str(EXAMPLE))
    reference = reference.merge_and_unload().state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, reference[key], atol=1e-6, rtol=1e-5), key
    card = (out / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card


def test_audit_smollm2_adapter_and_its_realigned_copy(tmp_path):
    from salora_merge.auditing.run import AuditOptions, run_audit
    from salora_merge.auditing.behavior import BehaviorOptions
    from salora_merge.calibration.run import CalibrationOptions, calibrate
    from salora_merge.io.safety_file import save_safety_module
    from salora_merge.realignment.run import run_realign
    from salora_merge.hf.resolve import resolve_model

    options = CalibrationOptions(max_prompts=8, max_new_tokens=16, targets=("q_proj", "v_proj"), device="cpu")
    safety_path = tmp_path / "s.safetensors"
    save_safety_module(calibrate(resolve_model("smollm2-135m-instruct"), options).safety, safety_path)
    realigned = tmp_path / "realigned"
    realign_report = run_realign("smollm2-135m-instruct", str(EXAMPLE), realigned, safety_path=safety_path)
    behavior = BehaviorOptions(max_prompts=3, max_new_tokens=16, device="cpu")
    report = run_audit("smollm2-135m-instruct", [str(EXAMPLE), str(realigned)], AuditOptions(behavior=behavior),
                       safety_path=safety_path)
    original, after = (e["weight_space"] for e in report["adapters"])
    assert original["rho"] == pytest.approx(realign_report.total_energy_removed, rel=1e-6)
    assert after["rho"] < 1e-8 and len(original["layers"]) == 30 and original["n_modules"] == 60
    # q_proj reads 576 outputs, v_proj 192: the random references differ by module kind.
    refs = {m["module"].rsplit(".", 1)[-1]: m["random_reference"] for m in original["modules"]}
    assert refs == {"q_proj": pytest.approx(32 / 576), "v_proj": pytest.approx(32 / 192)}
    assert report["behavior"]["prompt_sets"]["harmful"]["name"].startswith("harmbench-standard")
    assert all(e["behavior"]["adapter"]["n"] == {"harmful": 3, "benign": 3, "overrefusal": 3} for e in report["adapters"])


def test_salora_training_on_smollm2(tmp_path):
    """A short real SaLoRA run: outputs equal the base at step 0, the loss falls, and the exported rank-2r
    adapter loaded by stock PEFT on the untouched base gives the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from salora_merge.io.adapter import write_adapter
    from salora_merge.hf.loading import load_tokenizer
    from salora_merge.hf.resolve import resolve_model
    from salora_merge.training.train import TrainOptions, adapter_config, export_modules, prepare_model
    from salora_merge.training.data import conversations_from_pairs, tokenize_all
    from salora_merge.training.trainer import FitOptions, fit

    safety_path = tmp_path / "safety.safetensors"
    result = CliRunner().invoke(main, ["calibrate", "--base", "smollm2-135m-instruct", "--max-prompts", "8",
                                       "--max-new-tokens", "16", "--targets", "q_proj,v_proj", "--device", "cpu",
                                       "-o", str(safety_path)])
    assert result.exit_code == 0, result.output
    words = ("apple river stone cloud maple tiger violin harbor candle forest pepper silver rocket garden lemon "
             "castle").split()
    conversations = conversations_from_pairs([f"Write the word '{w}' in capital letters, nothing else." for w in words],
                                             [w.upper() for w in words])
    base = resolve_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base.folder)
    examples = tokenize_all(tokenizer, conversations, 128, "words")
    options = TrainOptions(rank=8, alpha=16, task_rank=32, init="salora", device="cpu", fit=FitOptions(
        max_steps=16, lr=1e-3, batch_size=4, grad_accum=1, logging_steps=1, show_progress=False, warmup_ratio=0.0))
    prepared = prepare_model(base, load_safety_module(safety_path), examples, options)
    reference = AutoModelForCausalLM.from_pretrained(str(base.folder), dtype=torch.float32).eval()
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        want = reference(input_ids=ids).logits
        start = prepared.model.eval()(input_ids=ids).logits
    assert (start - want).abs().max() < 1e-3 * want.abs().max()  # W_res + s C B0 A0 = W

    result = fit(prepared.model, examples, tokenizer.pad_token_id, options.fit, tmp_path / "ckpt")
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses

    folder = tmp_path / "adapter"
    folder.mkdir()
    write_adapter(folder, adapter_config(options, base.model_id, ["q_proj", "v_proj"], True),
                  export_modules(prepared.layers), {})
    peft_model = PeftModel.from_pretrained(reference, str(folder)).eval()
    with torch.no_grad():
        trained = prepared.model.eval()(input_ids=ids).logits
        exported = peft_model(input_ids=ids).logits
    assert (trained - start).abs().max() > 1.0  # training moved the logits
    assert (exported - trained).abs().max() < 1e-3 * trained.abs().max()
