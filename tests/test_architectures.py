"""The architecture matrix (in the manner of PEFT's): a tiny random model of each family users bring, built
here from transformers' config classes (no Hub), with an adapter made by PEFT itself on every linear layer,
through calibrate, realign, merge and audit. References: PEFT loads the outputs without a warning and its own
``merge_and_unload`` (float32) equals our merge; the realignment invariant is checked in float64 on the
layers' effective ``(d_out, d_in)`` maps (GPT-2's Conv1D stores the transpose)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from conftest import build_tokenizer, make_peft_adapter

from salora_merge.cli import main
from salora_merge.io.safety_file import load_safety_module

HIDDEN, FFN, LAYERS, HEADS = 32, 64, 2, 4


def _config(family: str, tokenizer):
    import transformers as t

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=2, max_position_embeddings=512, **ids)
    if family == "llama":
        return t.LlamaConfig(tie_word_embeddings=True, **llama_like)
    if family == "mistral":
        return t.MistralConfig(**llama_like)
    if family == "qwen2":  # q/k/v biases
        return t.Qwen2Config(**llama_like)
    if family == "gemma2":  # tied output layer, logit softcapping
        return t.Gemma2Config(head_dim=HIDDEN // HEADS, **llama_like)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return t.Phi3Config(**llama_like)
    if family == "gpt2":  # Conv1D layers (fan_in_fan_out)
        return t.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=512, **ids)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                               num_attention_heads=HEADS, max_position_embeddings=512, **ids)
    if family == "opt":  # flattens the tokens to (B * T, d) before fc1 / fc2
        return t.OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           word_embed_proj_dim=HIDDEN, max_position_embeddings=512, **ids)
    if family == "falcon":
        return t.FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, **ids)
    if family == "qwen2_moe":  # routed experts (3-D parameters), a shared expert and its Linear(hidden, 1) gate
        return t.Qwen2MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=FFN, **llama_like)
    if family in ("mixtral", "qwen3_moe"):  # fused 3-D experts: PEFT's all-linear adds target_parameters
        config = t.MixtralConfig if family == "mixtral" else t.Qwen3MoeConfig
        experts = {"num_local_experts": 4} if family == "mixtral" else {"num_experts": 4, "moe_intermediate_size": 16}
        return config(num_experts_per_tok=2, **experts, **llama_like)
    raise KeyError(family)


FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "qwen2_moe")


def build_family(family: str, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def _effective(module) -> torch.Tensor:
    """The layer's ``(d_out, d_in)`` map in float64 (Conv1D stores ``(d_in, d_out)``)."""
    weight = module.weight.detach().double()
    return weight.T if type(module).__name__ == "Conv1D" else weight


def _peft(base_dir: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter))
    return model, [str(w.message) for w in caught if "peft" in str(w.filename)]


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_calibrate_realign_merge_and_audit(family, tmp_path, tiny_calibration_prompts):
    from transformers import AutoModelForCausalLM

    base = build_family(family, tmp_path / "base")
    adapter = make_peft_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules="all-linear")
    safety = tmp_path / "safety.safetensors"
    # A random tiny model's few greedy response tokens may all go to some experts: MoE families count the
    # prompts' tokens too, so that every expert receives some.
    moe = ["--token-policy", "all"] if family.endswith("moe") else []
    result = _cli("calibrate", "--base", base, "--prompts", tiny_calibration_prompts, "--rank", 4,
                  "--max-new-tokens", 6, *moe, "-o", safety)
    module = load_safety_module(safety)
    small = {n: 1 for n in module.bases if n.endswith("shared_expert_gate")}  # Linear(hidden, 1): rank capped
    assert module.metadata["rank_capped"] == small
    assert ("layers are smaller than --rank 4" in result.output) == bool(small)
    assert all(module.bases[n].shape[1] == small.get(n, 4) for n in module.bases)
    targeted = {k.split(".lora_A")[0].removeprefix("base_model.model.")
                for k in load_file(str(adapter / "adapter_model.safetensors")) if ".lora_A" in k}
    assert targeted and targeted <= set(module.bases), sorted(targeted - set(module.bases))

    # realign: loads in PEFT without a warning; the update leaves every layer's safety outputs untouched.
    out = tmp_path / "realigned"
    _cli("realign", "--base", base, "--adapter", adapter, "--safety", safety, "-o", out)
    realigned, warned = _peft(base, out)
    assert warned == []
    merged = dict(realigned.merge_and_unload().named_modules())
    plain = dict(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).named_modules())
    original = dict(_peft(base, adapter)[0].merge_and_unload().named_modules())
    for name in sorted(targeted):
        u = module.bases[name].double()  # (d_out, r)
        w_base, w_new, w_old = _effective(plain[name]), _effective(merged[name]), _effective(original[name])
        assert w_base.shape[0] == u.shape[0], name
        assert torch.allclose(u.T @ (w_new - w_base), torch.zeros(()).double(), atol=1e-5), name
        assert not torch.allclose(u.T @ (w_old - w_base), torch.zeros(()).double(), atol=1e-4), name

    # merge: equal to PEFT's merge_and_unload, tensor by tensor.
    merged_dir = tmp_path / "merged"
    _cli("merge", "--base", base, "--adapter", adapter, "-o", merged_dir)
    ours = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).state_dict()
    reference = _peft(base, adapter)[0].merge_and_unload().state_dict()
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.allclose(ours[key], value, atol=2e-6, rtol=1e-5), key

    # audit: every targeted module scored.
    result = _cli("audit", "--base", base, "--safety", safety, "--adapter", adapter, "--format", "json")
    audited = json.loads(result.stdout)["adapters"][0]
    assert audited["error"] is None and audited["warnings"] == []
    scored = audited["weight_space"]["modules"]
    assert {m["module"] for m in scored} == targeted
    assert all(0.0 <= m["rho"] <= 1.0 and m["update_norm"] > 0 for m in scored)

    # train: one SaLoRA step on every targeted layer kind; the export loads in PEFT.
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
                            for w in ("red", "green", "blue", "amber")))
    trainable = {n for n in targeted if n not in small}  # a Linear(hidden, 1) gate cannot hold rank 2
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in trainable})
    trained = tmp_path / "trained"
    _cli("train", "--base", base, "--data", data, "--safety", safety, "--rank", 2, "--alpha", 4, "--task-rank", 2,
         "--targets", ",".join(suffixes), "--max-steps", 1, "--batch-size", 2, "--grad-accum", 1,
         "--lr", "1e-2", "--warmup-ratio", 0, "--device", "cpu", "--quiet", "--no-keep-refusals", "-o", trained)
    peft_trained, warned = _peft(base, trained)
    assert warned == []
    assert {k.split(".lora_A")[0].removeprefix("base_model.model.")
            for k in load_file(str(trained / "adapter_model.safetensors")) if ".lora_A" in k} == trainable
    # SaLoRA's guarantee, through PEFT's merge of the export: the update leaves the safety outputs untouched.
    merged = dict(peft_trained.merge_and_unload().named_modules())
    moved = 0
    for name in sorted(trainable):
        delta = _effective(merged[name]) - _effective(plain[name])
        moved += bool(delta.abs().max() > 0)
        assert torch.allclose(module.bases[name].double().T @ delta, torch.zeros(()).double(), atol=1e-5), name
    assert moved == len(trainable), f"{moved} of {len(trainable)} layers moved in one step"


def test_a_named_layer_smaller_than_the_rank_is_a_one_line_error(tmp_path, tiny_calibration_prompts):
    base = build_family("qwen2_moe", tmp_path / "base")
    out = tmp_path / "safety.safetensors"
    result = CliRunner().invoke(main, ["calibrate", "--base", str(base), "--prompts", str(tiny_calibration_prompts),
                                       "--rank", "4", "--targets", "q_proj,shared_expert_gate", "-o", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert ("--rank 4 exceeds the size of layer model.layers.0.mlp.shared_expert_gate (1 x 32); lower --rank to 1 "
            "or leave it out of --targets") in result.output


def test_a_base_model_without_a_chat_template_is_said_and_can_be_given_one(tmp_path, tiny_calibration_prompts):
    base = build_family("gpt2", tmp_path / "base")
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in base.glob("chat_template.*"):
        extra.unlink()
    common = ["calibrate", "--base", base, "--prompts", tiny_calibration_prompts, "--rank", 2,
              "--max-new-tokens", 4, "--targets", "c_attn"]
    raw = _cli(*common, "-o", tmp_path / "raw.safetensors")
    assert "has no chat template, so the prompts were used as raw text" in raw.output
    assert load_safety_module(tmp_path / "raw.safetensors").metadata["chat_template"].startswith("none (the model")
    plain = _cli(*common, "--chat-template", "plain", "-o", tmp_path / "plain.safetensors")
    assert "no chat template" not in plain.output
    label = load_safety_module(tmp_path / "plain.safetensors").metadata["chat_template"]
    assert label.startswith("plain (sha256 ")
    # The template changes the tokens the statistics see, so the bases differ.
    a = load_safety_module(tmp_path / "raw.safetensors").bases
    b = load_safety_module(tmp_path / "plain.safetensors").bases
    assert any(not torch.allclose(a[n].abs(), b[n].abs(), atol=1e-3) for n in a)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:")
    own = _cli(*common, "--chat-template", template, "-o", tmp_path / "own.safetensors")
    assert load_safety_module(tmp_path / "own.safetensors").metadata["chat_template"].startswith("t.jinja (sha256")
    assert "no chat template" not in own.output
    for bad, message in ((tmp_path / "missing.jinja", "no such file, and not one of chatml, plain, none"),
                         (tmp_path / "t.txt", "never mentions them"),
                         (tmp_path / "broken.jinja", "does not render a user message")):
        if bad.name == "t.txt":
            bad.write_text("hello")
        if bad.name == "broken.jinja":
            bad.write_text("{% for m in messages %}{{ m['content'] }")
        out = tmp_path / "bad.safetensors"
        result = CliRunner().invoke(main, [str(a) for a in (*common, "--chat-template", bad, "-o", out)])
        assert result.exit_code == 1 and message in result.output and not out.exists(), result.output


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_safety_module_without_lm_head_is_completed_when_an_adapter_needs_it(tied, tmp_path,
                                                                                 tiny_calibration_prompts):
    """A module calibrated with the default targets (no lm_head) and an adapter with a LoRA on lm_head: realign
    and audit compute the missing basis with the module's own settings and say so. The basis equals the one a
    calibration naming lm_head gives (same prompts, policy and rank); the file itself is not changed."""
    from conftest import build_tiny_llama

    base = tmp_path / "base"
    build_tiny_llama(base)
    if not tied:
        from transformers import AutoModelForCausalLM
        config = json.loads((base / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (base / "config.json").write_text(json.dumps(config))
        untied = AutoModelForCausalLM.from_pretrained(str(base))
        untied.lm_head.weight.data = torch.randn_like(untied.lm_head.weight)
        untied.save_pretrained(str(base), safe_serialization=True)
    adapter = make_peft_adapter(base, tmp_path / "lora", target_modules=["q_proj", "lm_head"])
    default, named = tmp_path / "default.safetensors", tmp_path / "named.safetensors"
    common = ("--base", base, "--prompts", tiny_calibration_prompts, "--rank", 4, "--max-new-tokens", 4)
    _cli("calibrate", *common, "-o", default)
    _cli("calibrate", *common, "--targets", "q_proj,lm_head", "-o", named)
    assert "lm_head" not in load_safety_module(default).bases
    before = default.read_bytes()
    # without the prompt file it was calibrated on, the module cannot be completed exactly: one line, the fixes
    refused = CliRunner().invoke(main, ["realign", "--base", str(base), "--adapter", str(adapter), "--safety",
                                        str(default), "-o", str(tmp_path / "no")])
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert "(prompts.jsonl) is not at hand: give that file with --prompts" in refused.output
    assert not (tmp_path / "no").exists()
    out = tmp_path / "realigned"
    result = _cli("realign", "--base", base, "--adapter", adapter, "--safety", default, "-o", out, "--json",
                  "--prompts", tiny_calibration_prompts)
    label = json.loads(result.stdout)["safety"]
    assert "1 module(s) it lacked (lm_head) calibrated now with its settings" in label, label
    assert default.read_bytes() == before  # the user's file is never rewritten
    u = load_safety_module(named).bases["lm_head"].double()
    from salora_merge.io.adapter import read_adapter
    head = read_adapter(out).modules["lm_head"].lora_B.double()
    assert torch.allclose(u.T @ head, torch.zeros_like(u.T @ head), atol=1e-6)  # the direct basis's outputs kept
    report = _cli("audit", "--base", base, "--safety", default, "--adapter", adapter, "--format", "json",
                  "--prompts", tiny_calibration_prompts)
    audited = json.loads(report.stdout)
    assert "calibrated now" in audited["safety"]["source"] and audited["adapters"][0]["weight_space"]["rho"] > 0


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_lora_on_the_output_layer_is_calibrated_realigned_and_audited(tied, tmp_path, tiny_calibration_prompts):
    """lm_head's statistics come from the backbone's last hidden state (no logits): equal to its input in a full
    forward pass (dense float64 reference); realign keeps its safety outputs and loads in PEFT; audit scores it."""
    from conftest import build_tiny_llama

    from salora_merge.hf.chat_templates import chat_prompt_ids
    from salora_merge.io.adapter import read_adapter

    base = tmp_path / "base"
    model, tokenizer = build_tiny_llama(base)
    if not tied:
        config = json.loads((base / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (base / "config.json").write_text(json.dumps(config))
        from transformers import AutoModelForCausalLM
        untied = AutoModelForCausalLM.from_pretrained(str(base))
        untied.lm_head.weight.data = torch.randn_like(untied.lm_head.weight)  # untied: a weight of its own
        untied.save_pretrained(str(base), safe_serialization=True)
    adapter = make_peft_adapter(base, tmp_path / "lora", target_modules=["q_proj", "lm_head"])
    safety = tmp_path / "safety.safetensors"
    _cli("calibrate", "--base", base, "--prompts", tiny_calibration_prompts, "--rank", 4, "--responses", "none",
         "--targets", "q_proj,lm_head", "--keep-moments", "-o", safety)
    module = load_safety_module(safety)
    assert "lm_head" in module.bases and module.bases["lm_head"].shape == (len(tokenizer), 4)
    from transformers import AutoModelForCausalLM
    full = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
    seen = []
    handle = full.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    prompts = [json.loads(line)["prompt"] for line in tiny_calibration_prompts.read_text().splitlines()]
    with torch.no_grad():
        for p in prompts:
            full(input_ids=torch.tensor([chat_prompt_ids(tokenizer, p)]))
    handle.remove()
    rows = torch.cat(seen)
    moment = module.moments[(module.sites["lm_head"], module.metadata["token_policy"])].double()
    assert torch.allclose(moment, rows.T @ rows, rtol=1e-4, atol=1e-4)

    out = tmp_path / "realigned"
    _cli("realign", "--base", base, "--adapter", adapter, "--safety", safety, "-o", out)
    # No warning but those PEFT gives the original adapter (on a tied model: its ensure_weight_tying advice).
    assert _peft(base, out)[1] == _peft(base, adapter)[1]
    head = read_adapter(out).modules["lm_head"]
    u = module.bases["lm_head"].double()
    assert torch.allclose(u.T @ head.lora_B.double(), torch.zeros(()).double(), atol=1e-5)
    assert not torch.allclose(u.T @ read_adapter(adapter).modules["lm_head"].lora_B.double(),
                              torch.zeros(()).double(), atol=1e-4)
    result = _cli("audit", "--base", base, "--safety", safety, "--adapter", adapter, "--format", "json")
    audited = json.loads(result.stdout)["adapters"][0]
    assert audited["error"] is None
    assert {m["module"] for m in audited["weight_space"]["modules"]} == {"lm_head"} | {
        f"model.layers.{i}.self_attn.q_proj" for i in range(2)}


@pytest.mark.parametrize("family, stored", [("mixtral", "per-expert"), ("qwen3_moe", "fused")])
def test_fused_expert_adapters_merge_exactly_and_are_refused_elsewhere(family, stored, tmp_path,
                                                                        tiny_calibration_prompts):
    """PEFT's default adapter for these models carries target_parameters (the fused 3-D experts and, for Mixtral,
    the router): merge equals PEFT's merge_and_unload, whether the checkpoint stores the experts one by one
    (as transformers 5 writes them, fused at load) or fused; realign, audit, train, retrain and merge --realign
    refuse it in one line, writing nothing."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = build_family(family, tmp_path / "base")
    if stored == "fused":  # the parameters under their own names, as a checkpoint saved without conversion holds
        state = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).state_dict()
        state.pop("lm_head.weight", None) if json.loads((base / "config.json").read_text()).get(
            "tie_word_embeddings") else None
        save_file({k: v.contiguous() for k, v in state.items()}, str(base / "model.safetensors"),
                  metadata={"format": "pt"})
        assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(str(base / "model.safetensors"))
    else:
        assert "model.layers.0.mlp.experts.gate_up_proj" not in load_file(str(base / "model.safetensors"))
    adapter = make_peft_adapter(base, tmp_path / "lora", target_modules="all-linear")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] and config["rank_pattern"]  # PEFT gives gate_up_proj twice the rank

    merged = tmp_path / "merged"
    _cli("merge", "--base", base, "--adapter", adapter, "-o", merged)
    ours = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).state_dict()
    reference = _peft(base, adapter)[0].merge_and_unload().state_dict()
    original = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).state_dict()
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.allclose(ours[key], value, atol=2e-6, rtol=1e-5), key
    experts = [k for k in reference if ".experts." in k]
    assert experts and all(not torch.equal(reference[k], original[k]) for k in experts)

    # calibrate: each expert's matrices get a basis from the tokens routed to it; the router is calibrated too.
    safety = tmp_path / "safety.safetensors"
    _cli("calibrate", "--base", base, "--prompts", tiny_calibration_prompts, "--rank", 2, "--max-new-tokens", 4,
         "--token-policy", "all", "--keep-moments", "-o", safety)
    module = load_safety_module(safety)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    layer = model.model.layers[0].mlp
    experts = layer.experts.gate_up_proj.shape[0]
    for e in range(experts):
        for param in ("gate_up_proj", "down_proj"):
            assert module.bases[f"model.layers.0.mlp.experts.{param}[{e}]"].shape[1] == 2
    assert "model.layers.0.mlp.gate" in module.bases

    # realign (salora): PEFT loads it; per expert, the update leaves that expert's safety outputs unchanged.
    out = tmp_path / "realigned"
    _cli("realign", "--base", base, "--adapter", adapter, "--safety", safety, "-o", out)
    realigned, warned = _peft(base, out)
    assert warned == _peft(base, adapter)[1]
    new = realigned.merge_and_unload().state_dict()
    old = _peft(base, adapter)[0].merge_and_unload().state_dict()
    for i in range(2):
        for param in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{i}.mlp.experts.{param}"
            for e in range(experts):
                u = module.bases[f"{key}[{e}]"].double()
                before, after = (old[key][e] - original[key][e]).double(), (new[key][e] - original[key][e]).double()
                assert torch.allclose(u.T @ after, torch.zeros(()).double(), atol=1e-5), (key, e)
                assert not torch.allclose(u.T @ before, torch.zeros(()).double(), atol=1e-4), (key, e)
                assert after.abs().max() > 0, (key, e)  # the rest of the update survives
        gate = f"model.layers.{i}.mlp.gate.weight"
        u = module.bases[f"model.layers.{i}.mlp.gate"].double()
        assert torch.allclose(u.T @ (new[gate] - original[gate]).double(), torch.zeros(()).double(), atol=1e-5)

    # audit (weight space): every expert scored against its own basis.
    result = _cli("audit", "--base", base, "--safety", safety, "--adapter", adapter, "--format", "json")
    scored = {m["module"] for m in json.loads(result.stdout)["adapters"][0]["weight_space"]["modules"]}
    assert {f"model.layers.0.mlp.experts.down_proj[{e}]" for e in range(experts)} <= scored

    # Refused in one line, writing nothing: training, the methods that are not per-module projections, the
    # behavioural audit and merge --realign.
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    for command in (["retrain", "--data", data, "--safety", safety], ["realign", "--method", "safedelta"],
                    ["merge", "--realign", "--safety", safety]):
        out = tmp_path / f"out-{command[0]}-{len(command)}"
        result = CliRunner().invoke(main, [str(a) for a in (command[0], "--base", base, "--adapter", adapter,
                                                               *command[1:], "-o", out)])
        assert result.exit_code == 1 and not out.exists(), result.output
        assert "fused expert parameters" in result.output, result.output
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["audit", "--base", str(base), "--adapter", str(adapter), "--safety",
                                       str(safety), "--behavior", "--format", "json"])
    assert result.exit_code == 4 and "without --behavior" in json.loads(result.stdout)["adapters"][0]["error"]


def test_expert_moments_count_exactly_the_tokens_routed_to_each_expert(tmp_path, tiny_calibration_prompts):
    """Each expert's second moments against a direct computation in float64: the prompts run one by one through
    the model, the router's choices read from its own output, the expert's input rows (and down_proj's,
    act(gate) * up) summed by hand."""
    from transformers import AutoModelForCausalLM

    from salora_merge.hf.chat_templates import chat_prompt_ids

    base = build_family("qwen3_moe", tmp_path / "base")
    safety = tmp_path / "safety.safetensors"
    _cli("calibrate", "--base", base, "--prompts", tiny_calibration_prompts, "--rank", 2, "--responses", "none",
         "--targets", "gate_up_proj,down_proj", "--keep-moments", "-o", safety)
    module = load_safety_module(safety)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)  # the experts' kernels: float32
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(str(base))
    moe = model.model.layers[1].mlp
    seen = []
    handle = moe.experts.register_forward_pre_hook(lambda m, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        for line in tiny_calibration_prompts.read_text().splitlines():
            model(input_ids=torch.tensor([chat_prompt_ids(tokenizer, json.loads(line)["prompt"])]))
    handle.remove()
    policy = module.metadata["token_policy"]
    for e in range(moe.experts.gate_up_proj.shape[0]):
        rows = torch.cat([h[(idx == e).any(-1)] for h, idx in seen]).double()
        gate, up = (rows @ moe.experts.gate_up_proj[e].double().T).chunk(2, dim=-1)
        inter = torch.nn.functional.silu(gate) * up
        for param, x in (("gate_up_proj", rows), ("down_proj", inter)):
            name = f"model.layers.1.mlp.experts.{param}[{e}]"
            got = module.moments[(module.sites[name], policy)].double()
            assert torch.allclose(got, x.T @ x, rtol=1e-4, atol=1e-5), name  # float32 products per batch
            assert module.counts[(module.sites[name], policy)] == rows.shape[0]
    # docs/safety-module.md's reading example, run as written on this file: every expert of both fused
    # parameters, with the shapes the table states ((2F, r_s) and (H, r_s)), and their sites.
    doc = (Path(__file__).parent.parent / "docs" / "safety-module.md").read_text()
    example = doc.split("## Experts of MoE models", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope = {"path": str(safety)}
    exec(example, scope)
    fused = {f"model.layers.{i}.mlp.experts.{p}" for i in range(len(model.model.layers)) for p in
             ("gate_up_proj", "down_proj")}
    experts = moe.experts.gate_up_proj.shape[0]
    assert set(scope["bases"]) == {(p, e) for p in fused for e in range(experts)}
    two_f, hidden = moe.experts.gate_up_proj.shape[1], moe.experts.down_proj.shape[1]
    for (param, e), basis in scope["bases"].items():
        assert basis.shape == ((two_f if param.endswith("gate_up_proj") else hidden), 2)
        assert scope["sites"][f"{param}[{e}]"] == module.sites[f"{param}[{e}]"]
