"""merge: the output loads in transformers with no missing or unexpected keys and equals PEFT's merge."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import build_tiny_llama, make_peft_adapter
from salora_merge.errors import AdapterError, InputError, OutputExistsError, ShapeMismatchError
from salora_merge.io.stream import ShardReader, file_sha256
from salora_merge.merging.run import AdapterInput, MergeOptions, run_merge
from salora_merge.core.merge_math import parse_size

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(folder: Path, dtype=None):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=dtype)
    return model.eval(), info


def _peft_merged(model_dir: Path, adapters: list[Path], dtype=None):
    """PEFT's merge_and_unload of the adapters (all active, weight 1), the reference."""
    from peft import PeftModel

    base, _ = _load(model_dir, dtype)
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i, folder in enumerate(adapters[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"a{i}")
    return model.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(adapters))])


def _assert_loads_cleanly(info):
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    dict(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS, rank_pattern={"down_proj": 2},
         alpha_pattern={"gate_proj": 3}),
    dict(r=3, lora_alpha=5, target_modules=TARGETS, layers_to_transform=[1]),
], ids=["qv", "rslora-patterns", "layer1"])
def test_merge_equals_peft_merge_and_unload(config, tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", **config)
    out = tmp_path / "merged"
    report = run_merge(str(tiny_model_dir), [AdapterInput(str(adapter))], out)
    ours, info = _load(out)
    _assert_loads_cleanly(info)
    reference = _peft_merged(tiny_model_dir, [adapter]).state_dict()
    base = _load(tiny_model_dir)[0].state_dict()
    theirs = ours.state_dict()
    assert theirs.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.allclose(theirs[key], value, atol=2e-6, rtol=1e-5), key
    changed = sum(not torch.equal(value, base[key]) for key, value in reference.items())
    assert report.changed_tensors == changed > 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True  # nothing tied was changed


def test_several_adapters_merge_as_the_exact_weighted_sum(tiny_model_dir, tmp_path):
    a = make_peft_adapter(tiny_model_dir, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    b = make_peft_adapter(tiny_model_dir, tmp_path / "b", seed=2, r=2, lora_alpha=3, target_modules=["v_proj", "up_proj"])
    # Weight 1 each: equal to PEFT merging both adapters.
    run_merge(str(tiny_model_dir), [AdapterInput(str(a)), AdapterInput(str(b))], tmp_path / "m11")
    ours, info = _load(tmp_path / "m11")
    _assert_loads_cleanly(info)
    reference = _peft_merged(tiny_model_dir, [a, b]).state_dict()
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, reference[key], atol=2e-6, rtol=1e-5), key
    # Other weights: equal to a dense float64 sum W + sum_i w_i s_i B_i A_i.
    run_merge(str(tiny_model_dir), [AdapterInput(str(a), 0.7), AdapterInput(str(b), -1.5)], tmp_path / "mw")
    merged = load_file(str(tmp_path / "mw" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    fa, fb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    module = "model.layers.1.self_attn.v_proj"
    expected = base[f"{module}.weight"].double()
    for factors, weight, scale in ((fa, 0.7, 8 / 4), (fb, -1.5, 3 / 2)):
        key = f"base_model.model.{module}"
        expected += weight * scale * factors[f"{key}.lora_B.weight"].double() @ factors[f"{key}.lora_A.weight"].double()
    assert torch.allclose(merged[f"{module}.weight"].double(), expected, atol=1e-6)
    assert torch.equal(merged["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])


@pytest.fixture(scope="module")
def bf16_sharded_dir(tmp_path_factory) -> Path:
    """The tiny Llama stored in bfloat16 over several shards (as large checkpoints are)."""
    folder = tmp_path_factory.mktemp("tiny-bf16-sharded")
    model, tokenizer = build_tiny_llama(folder / "src")
    model.to(torch.bfloat16).save_pretrained(str(folder / "ckpt"), max_shard_size="20KB")
    tokenizer.save_pretrained(str(folder / "ckpt"))
    return folder / "ckpt"


def test_bfloat16_sharded_base_stays_bfloat16_and_matches_peft(bf16_sharded_dir, tiny_model_dir, tmp_path):
    assert len(list(bf16_sharded_dir.glob("model-*.safetensors"))) > 2
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=TARGETS)
    out = tmp_path / "merged"
    report = run_merge(str(bf16_sharded_dir), [AdapterInput(str(adapter))], out,
                       MergeOptions(shard_size="15KB"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [r["file"] for r in report.shards] and len(files) > 2
    sizes = []
    for file in files:
        reader = ShardReader(out / file)
        sizes.append(sum(t.nbytes for t in reader.tensors.values()))
        assert all(t.dtype == "BF16" for t in reader.tensors.values())
        assert sizes[-1] <= parse_size("15KB") or len(reader.tensors) == 1
        assert (out / file).stat().st_size == next(r["size"] for r in report.shards if r["file"] == file)
    assert index["metadata"]["total_size"] == sum(sizes)
    ours, info = _load(out)
    _assert_loads_cleanly(info)
    assert ours.dtype == torch.bfloat16
    reference = _peft_merged(bf16_sharded_dir, [adapter], dtype=torch.bfloat16).state_dict()
    for key, value in ours.state_dict().items():
        # One rounding of W + dW (ours) against PEFT's bf16 arithmetic: within bf16's resolution.
        assert torch.allclose(value.float(), reference[key].float(), atol=2e-2, rtol=1e-2), key
    # Exactly one rounding: ours equals float32 (W_bf16 + dW) rounded once.
    module = "model.layers.0.mlp.gate_proj"
    fa = load_file(str(adapter / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    stored = _tensor(bf16_sharded_dir, f"{module}.weight")
    exact = (stored.float() + 2.0 * fa[f"{key}.lora_B.weight"] @ fa[f"{key}.lora_A.weight"]).to(torch.bfloat16)
    assert torch.equal(ours.state_dict()[f"{module}.weight"], exact)


def _tensor(folder: Path, name: str) -> torch.Tensor:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(folder / index[name]), "pt") as handle:
        return handle.get_tensor(name)


def test_changed_tied_lm_head_is_untied_and_matches_unmerged_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=["q_proj", "lm_head"])
    out = tmp_path / "merged"
    report = run_merge(str(tiny_model_dir), [AdapterInput(str(adapter))], out)
    assert report.untied == ["lm_head.weight"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    stored = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert "lm_head.weight" not in base and "lm_head.weight" in stored
    assert torch.equal(stored["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # shared tensor untouched
    ours, info = _load(out)
    _assert_loads_cleanly(info)
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    peft_model = PeftModel.from_pretrained(_load(tiny_model_dir)[0], str(adapter)).eval()  # unmerged: exact behaviour
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, peft_model(input_ids=ids).logits, atol=1e-5)
    assert "tie_word_embeddings: false" in (out / "README.md").read_text()


def test_modules_to_save_replace_base_tensors_and_untie_a_changed_embedding(tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=["q_proj"],
                                modules_to_save=["embed_tokens", "post_attention_layernorm"])
    weights = adapter / "adapter_model.safetensors"
    state = load_file(str(weights))
    embed_key = next(k for k in state if k.endswith("embed_tokens.weight"))
    norm_key = next(k for k in state if k.endswith("layers.1.post_attention_layernorm.weight"))
    state[embed_key] = state[embed_key] + 0.25
    state[norm_key] = state[norm_key] * 3
    save_file(state, str(weights), metadata={"format": "pt"})
    out = tmp_path / "merged"
    report = run_merge(str(tiny_model_dir), [AdapterInput(str(adapter))], out)
    stored = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(stored["model.embed_tokens.weight"], state[embed_key])
    assert torch.equal(stored["model.layers.1.post_attention_layernorm.weight"], state[norm_key])
    # The output layer keeps reading the original shared tensor, now written on its own.
    assert report.untied == ["lm_head.weight"]
    assert torch.equal(stored["lm_head.weight"], base["model.embed_tokens.weight"])
    _assert_loads_cleanly(_load(out)[1])


def test_added_vocabulary_rows_are_refused_naming_the_tensor(tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    weights = adapter / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[key] = torch.cat([state[key], torch.zeros(3, state[key].shape[1])])
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ShapeMismatchError, match="embed_tokens.weight.*added vocabulary"):
        run_merge(str(tiny_model_dir), [AdapterInput(str(adapter))], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_explicit_dtype_and_overflow_refused(tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    run_merge(str(tiny_model_dir), [AdapterInput(str(adapter))], tmp_path / "bf16", MergeOptions(dtype="bfloat16"))
    assert {t.dtype for t in ShardReader(tmp_path / "bf16" / "model.safetensors").tensors.values()} == {"BF16"}
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    big = tmp_path / "big"
    shutil.copytree(tiny_model_dir, big)
    state = load_file(str(big / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # fine in float32 and bfloat16, not in float16
    save_file(state, str(big / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="model.layers.0.mlp.up_proj.weight.*overflows float16"):
        run_merge(str(big), [AdapterInput(str(adapter))], tmp_path / "f16", MergeOptions(dtype="float16"))
    assert not (tmp_path / "f16").exists() and not list(tmp_path.glob(".f16*"))


def test_missing_shard_and_mismatched_index_are_named(bf16_sharded_dir, tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    broken = tmp_path / "missing"
    shutil.copytree(bf16_sharded_dir, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(InputError, match=f"lists shard {victim.name}, which is missing"):
        run_merge(str(broken), [AdapterInput(str(adapter))], tmp_path / "o1")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(bf16_sharded_dir, mismatched)
    index = json.loads((mismatched / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    (mismatched / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=f"does not match its shards.*{name}"):
        run_merge(str(mismatched), [AdapterInput(str(adapter))], tmp_path / "o2")
    truncated = tmp_path / "truncated"
    shutil.copytree(bf16_sharded_dir, truncated)
    shard = sorted(truncated.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(InputError, match=shard.name):
        run_merge(str(truncated), [AdapterInput(str(adapter))], tmp_path / "o3")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_adapter_for_another_model_is_refused(wider_model_dir, tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    with pytest.raises(ShapeMismatchError, match="q_proj.lora_A.weight.*another model"):
        run_merge(str(wider_model_dir), [AdapterInput(str(adapter))], tmp_path / "out")
    odd = make_peft_adapter(tiny_model_dir, tmp_path / "b", target_modules=["q_proj"])
    state = load_file(str(odd / "adapter_model.safetensors"))
    extra = {k.replace("layers.1.", "layers.7."): v.clone() for k, v in state.items() if "layers.1." in k}
    save_file({**state, **extra}, str(odd / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="layers.7.self_attn.q_proj, which the base model does not have"):
        run_merge(str(tiny_model_dir), [AdapterInput(str(odd))], tmp_path / "out")


@pytest.mark.parametrize("fault", ["interrupt", "disk-full"])
def test_fault_mid_write_leaves_nothing(fault, bf16_sharded_dir, tiny_model_dir, tmp_path, monkeypatch):
    from salora_merge.io import stream

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    calls = {"n": 0}
    original = stream.ShardWriter.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 12:
            if fault == "interrupt":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, name, tensor)

    monkeypatch.setattr(stream.ShardWriter, "write", failing)
    out = tmp_path / "out"
    expected = KeyboardInterrupt if fault == "interrupt" else InputError
    with pytest.raises(expected) as info:
        run_merge(str(bf16_sharded_dir), [AdapterInput(str(adapter))], out, MergeOptions(shard_size="15KB"))
    if fault == "disk-full":
        assert "no space left" in str(info.value) and "out" in str(info.value)
    assert calls["n"] == 12
    assert list(tmp_path.iterdir()) == [tmp_path / "a"]  # no output, no temporary folder


def test_existing_output_is_refused_before_any_work(tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_merge(str(tiny_model_dir), [AdapterInput(str(adapter))], tmp_path / "out")


def test_provenance_records_inputs_and_redoes_the_same_output(bf16_sharded_dir, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from salora_merge.cli import main

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    out = tmp_path / "merged"
    report = run_merge(str(bf16_sharded_dir), [AdapterInput(str(adapter), 0.5)], out, MergeOptions(shard_size="15KB"))
    record = yaml.safe_load((out / "salora_config.yml").read_text())
    assert record["salora_merge"]["version"]
    for shard, digest in record["base"]["shards_sha256"].items():
        assert digest == file_sha256(bf16_sharded_dir / shard)  # hashed while streaming, equal to a full hash
    assert set(record["base"]["shards_sha256"]) == {p.name for p in bf16_sharded_dir.glob("model-*.safetensors")}
    assert record["adapters"][0]["files_sha256"]["adapter_model.safetensors"] == file_sha256(
        adapter / "adapter_model.safetensors")
    assert record["adapters"][0]["weight"] == 0.5
    # The recorded command, run again elsewhere, makes byte-identical shards.
    argv = record["redo"].split()[2:]
    argv[argv.index("-o") + 1] = str(tmp_path / "again")
    result = CliRunner().invoke(main, ["merge", *argv])
    assert result.exit_code == 0, result.output
    again = yaml.safe_load((tmp_path / "again" / "salora_config.yml").read_text())
    assert again["output"]["shards"] == record["output"]["shards"] == report.shards
    for shard in report.shards:
        assert (tmp_path / "again" / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()
    card = (out / "README.md").read_text()
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.base_model_relation == "merge" and data.library_name == "transformers"
    assert "salora" in data.tags


def test_merge_with_realign_keeps_safety_features(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    from salora_merge.calibration.run import CalibrationOptions, calibrate
    from salora_merge.io.safety_file import save_safety_module
    from salora_merge.hf.resolve import resolve_model

    options = CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=5, max_new_tokens=6, device="cpu")
    safety = calibrate(resolve_model(str(tiny_model_dir)), options).safety
    save_safety_module(safety, tmp_path / "s.safetensors")
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=TARGETS)
    out = tmp_path / "merged"
    report = run_merge(str(tiny_model_dir), [AdapterInput(str(adapter), 1.3)], out,
                       MergeOptions(realign=True), safety_path=tmp_path / "s.safetensors")
    assert report.realign and report.safety["sha256"] == file_sha256(tmp_path / "s.safetensors")
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = 0
    for module, basis in safety.bases.items():
        before, after = base[f"{module}.weight"].double(), merged[f"{module}.weight"].double()
        assert torch.allclose(basis.double().T @ after, basis.double().T @ before, atol=1e-5), module
        moved += not torch.allclose(after, before, atol=1e-5)
    assert moved == len(safety.bases)
    record = yaml.safe_load((out / "salora_config.yml").read_text())
    assert record["realign"]["safety"]["rank"] == 5
    assert "--realign --safety" in record["redo"]
    assert "realigned" in (out / "README.md").read_text()


def test_cli_merge_errors_are_one_line(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from salora_merge.cli import main

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    runner = CliRunner()
    result = runner.invoke(main, ["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                  "--weight", "1", "--weight", "2", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--weight given 2 times for 1 --adapter" in result.output
    result = runner.invoke(main, ["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                  "--shard-size", "lots", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--shard-size 'lots'" in result.output
    result = runner.invoke(main, ["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter),
                                  "--no-realign", "--safety", str(tmp_path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "--safety is only used with --realign" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("weight, message", [
    (float("nan"), "--weight nan for"), (float("inf"), "--weight inf for"),
    (3e38, "is scaled beyond the float32 range"), ("huge", "makes it NaN or Inf; nothing was written"),
])
def test_a_merge_that_would_write_nan_or_inf_is_refused(weight, message, tiny_model_dir, tmp_path):
    """Never a non-finite merged tensor: a non-finite weight is refused up front, a scale beyond float32 and a
    finite adapter whose product overflows (factors times 1e21) are refused before the tensor is written, naming it
    and the adapter; nothing at the output."""
    from safetensors.torch import load_file, save_file

    from salora_merge.errors import InputError

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=["q_proj"])
    if weight == "huge":
        path = adapter / "adapter_model.safetensors"
        save_file({k: v * 1e21 for k, v in load_file(str(path)).items()}, str(path), metadata={"format": "pt"})
        weight = 1.0
    out = tmp_path / "merged"
    with pytest.raises(InputError, match=message) as caught:
        run_merge(str(tiny_model_dir), [AdapterInput(str(adapter), weight)], out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["a"]
    if "nothing was written" in message or "beyond" in message:
        assert "q_proj.weight" in str(caught.value) and str(adapter) in str(caught.value)
