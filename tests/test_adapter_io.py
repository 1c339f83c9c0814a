"""Adapter I/O against PEFT itself: scaling and updates match, round trips are lossless, bad input fails."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_peft_adapter
from salora_merge.errors import AdapterError, ShapeMismatchError
from salora_merge.io.adapter import check_adapter_fits, read_adapter, write_adapter
from salora_merge.io.checkpoint import open_checkpoint

CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj"]),
    "rank_alpha_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                               alpha_pattern={"down_proj": 3}),
    "regex_targets": dict(r=3, lora_alpha=5, target_modules=r".*\.layers\.1\.mlp\.(gate|up)_proj"),
    "layers_to_transform": dict(r=2, lora_alpha=2, target_modules=["o_proj", "up_proj"], layers_to_transform=[0]),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
}


def _peft_model(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    relevant = [w for w in caught if "peft" in str(w.filename).lower() or "adapter" in str(w.message).lower()]
    return model, relevant


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_updates_equal_peft_delta_weights(name, tiny_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / name, seed=7, **CONFIGS[name])
    adapter = read_adapter(adapter_dir)
    model, _ = _peft_model(tiny_model_dir, adapter_dir)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
                   if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}
    assert sorted(adapter.modules) == sorted(peft_layers)
    for module_name, layer in peft_layers.items():
        ours = adapter.modules[module_name]
        assert ours.scaling == pytest.approx(layer.scaling["default"])
        delta = ours.scaling * ours.lora_B.double() @ ours.lora_A.double()
        assert torch.allclose(delta, layer.get_delta_weight("default").double(), atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_loads_in_peft_without_warnings_and_is_lossless(name, tiny_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "in", seed=3, **CONFIGS[name])
    adapter = read_adapter(adapter_dir)
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(out, adapter.config, adapter.modules, adapter.passthrough)
    original = load_file(str(adapter_dir / "adapter_model.safetensors"))
    written = load_file(str(out / "adapter_model.safetensors"))
    assert original.keys() == written.keys()
    assert all(torch.equal(original[k], written[k]) for k in original)
    model_a, _ = _peft_model(tiny_model_dir, adapter_dir)
    model_b, warned = _peft_model(tiny_model_dir, out)
    assert warned == []
    ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model_a(input_ids=ids).logits, model_b(input_ids=ids).logits)


def test_modules_to_save_pass_through(tiny_model_dir, tmp_path):
    adapter_dir = make_peft_adapter(tiny_model_dir, tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"],
                                    modules_to_save=["post_attention_layernorm"])
    adapter = read_adapter(adapter_dir)
    assert adapter.passthrough, "PEFT stored modules_to_save tensors"
    assert all("post_attention_layernorm" in k for k in adapter.passthrough)
    out = tmp_path / "out"
    out.mkdir()
    write_adapter(out, adapter.config, adapter.modules, adapter.passthrough)
    written = load_file(str(out / "adapter_model.safetensors"))
    for key, tensor in adapter.passthrough.items():
        assert torch.equal(written[key], tensor)


def test_shapes_checked_against_another_model(tiny_model_dir, wider_model_dir, tmp_path):
    adapter = read_adapter(make_peft_adapter(tiny_model_dir, tmp_path / "a"))
    check_adapter_fits(adapter, open_checkpoint(tiny_model_dir).linear_weight_shapes())
    with pytest.raises(ShapeMismatchError) as info:
        check_adapter_fits(adapter, open_checkpoint(wider_model_dir).linear_weight_shapes())
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(4, 32)" in message and "(48, 48)" in message


def test_fan_in_fan_out_uses_transposed_base_layout(tiny_model_dir, tmp_path):
    adapter = read_adapter(make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=["v_proj"]))
    shapes = open_checkpoint(tiny_model_dir).linear_weight_shapes()
    transposed = {k: (v[1], v[0]) for k, v in shapes.items()}  # how Conv1D stores its weights
    fan = read_adapter(_edit_config(tmp_path / "a", tmp_path / "b", fan_in_fan_out=True))
    check_adapter_fits(fan, transposed)
    with pytest.raises(ShapeMismatchError):
        check_adapter_fits(adapter, transposed)


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes,match", [
    (dict(use_dora=True), "DoRA"),
    (dict(peft_type="IA3"), "only LoRA"),
    (dict(bias="all"), "bias"),
    (dict(r=3), "rank 4 but the config"),
    (dict(target_modules=["k_proj"]), "do not select"),
    (dict(layers_to_transform=[1]), "do not select"),
])
def test_unsupported_or_inconsistent_configs_are_refused(changes, match, tiny_model_dir, tmp_path):
    src = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    with pytest.raises(AdapterError, match=match):
        read_adapter(_edit_config(src, tmp_path / "b", **changes))


def test_embedding_lora_is_refused(tiny_model_dir, tmp_path):
    src = make_peft_adapter(tiny_model_dir, tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match="embedding LoRA"):
        read_adapter(src)


def test_non_finite_weights_are_refused(tiny_model_dir, tmp_path):
    src = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(src / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="v_proj.lora_B.weight contains NaN"):
        read_adapter(src)


def test_pickled_weights_refused_unless_opted_in(tiny_model_dir, tmp_path):
    src = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    (src / "adapter_model.safetensors").unlink()
    torch.save(tensors, str(src / "adapter_model.bin"))
    with pytest.raises(AdapterError, match="--allow-pickle"):
        read_adapter(src)
    adapter = read_adapter(src, allow_pickle=True)
    assert len(adapter.modules) == 4


def test_pickle_with_code_is_rejected_even_when_opted_in(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "target_modules": ["q_proj"]}))
    with open(folder / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": Evil()}, handle)
    with pytest.raises(AdapterError, match="weights_only=True"):
        read_adapter(folder, allow_pickle=True)


@pytest.mark.parametrize("setup,match", [
    ("missing_folder", "adapter folder not found"),
    ("no_config", "adapter_config.json: missing"),
    ("bad_json", "not valid JSON"),
    ("no_weights", "no adapter_model.safetensors"),
    ("garbage_weights", "not a readable safetensors"),
])
def test_malformed_folders(setup, match, tiny_model_dir, tmp_path):
    src = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    if setup == "missing_folder":
        src = tmp_path / "nope"
    elif setup == "no_config":
        (src / "adapter_config.json").unlink()
    elif setup == "bad_json":
        (src / "adapter_config.json").write_text("{not json")
    elif setup == "no_weights":
        (src / "adapter_model.safetensors").unlink()
    else:
        (src / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match=match):
        read_adapter(src)


def test_module_selected_by_config_but_missing_from_file(tiny_model_dir, tmp_path):
    src = _edit_config(make_peft_adapter(tiny_model_dir, tmp_path / "a"), tmp_path / "b",
                       target_modules=["q_proj", "v_proj", "o_proj"])
    adapter = read_adapter(src)  # the file itself is consistent...
    with pytest.raises(AdapterError, match="selects module model.layers.0.self_attn.o_proj"):
        check_adapter_fits(adapter, open_checkpoint(tiny_model_dir).linear_weight_shapes())
