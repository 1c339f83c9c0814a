"""Models larger than memory: accelerate's big-model loading (--device-map, --max-memory, --offload-folder).
Calibration of a model whose layers are offloaded to disk equals calibration in memory (bases and moments),
the offloaded layers' weights read from the checkpoint."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from salora_merge.cli import main
from salora_merge.io.safety_file import load_safety_module


def _calibrate(base, prompts, out, *extra):
    result = CliRunner().invoke(main, ["calibrate", "--base", str(base), "--prompts", str(prompts), "--rank", "4",
                                       "--max-new-tokens", "6", "--keep-moments", "-o", str(out), *map(str, extra)])
    assert result.exit_code == 0, result.output
    return load_safety_module(out)


@pytest.mark.parametrize("cpu_memory", ["100KB", "40KB"], ids=["cpu-and-disk", "all-on-disk"])
def test_calibration_with_layers_offloaded_to_disk_equals_calibration_in_memory(tiny_model_dir,
                                                                                  tiny_calibration_prompts, tmp_path,
                                                                                  cpu_memory):
    from pathlib import Path

    from salora_merge.hf.placement import Placement
    from salora_merge.hf.loading import load_causal_lm

    placed = load_causal_lm(Path(tiny_model_dir), torch.device("cpu"),
                            Placement("auto", {"cpu": cpu_memory}, str(tmp_path / "probe")))
    assert "disk" in set(placed.hf_device_map.values())  # the limit really forces offload
    in_memory = _calibrate(tiny_model_dir, tiny_calibration_prompts, tmp_path / "memory.safetensors")
    offloaded = _calibrate(tiny_model_dir, tiny_calibration_prompts, tmp_path / "offloaded.safetensors",
                           "--device-map", "auto", "--max-memory", f"cpu={cpu_memory}", "--offload-folder",
                           tmp_path / "offload")
    assert in_memory.bases.keys() == offloaded.bases.keys()
    for name, basis in in_memory.bases.items():  # the same subspace (columns up to sign)
        assert torch.allclose(basis.abs(), offloaded.bases[name].abs(), atol=1e-5), name
    for key, moment in in_memory.moments.items():
        assert torch.allclose(moment, offloaded.moments[key], rtol=1e-5, atol=1e-6), key
    assert in_memory.counts == offloaded.counts


@pytest.mark.parametrize("extra, message", [
    (["--device-map", "everywhere"], "--device-map"),
    (["--max-memory", "cpu=1GB"], "give --device-map too"),
    (["--device-map", "auto", "--max-memory", "cpu=lots"], "--max-memory 'cpu=lots': expected DEVICE=SIZE"),
])
def test_placement_options_are_checked_first(tiny_model_dir, tiny_calibration_prompts, tmp_path, extra, message):
    out = tmp_path / "s.safetensors"
    result = CliRunner().invoke(main, ["calibrate", "--base", str(tiny_model_dir), "--prompts",
                                       str(tiny_calibration_prompts), "-o", str(out), *extra])
    assert result.exit_code in (1, 2) and message in result.output and not out.exists(), result.output


def test_offloaded_modules_of_a_device_map():
    """Training needs every layer on the device it runs on: a map over GPUs (or all on the CPU) is trainable; disk
    entries, and CPU entries beside GPUs (accelerate copies those in for every forward pass), are not."""
    from salora_merge.errors import InputError
    from salora_merge.hf.placement import check_trainable, offloaded_modules

    assert offloaded_modules({"": "cpu"}) == [] and offloaded_modules({"": 0}) == []
    spread = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    assert offloaded_modules(spread) == []
    check_trainable(spread)
    mixed = {"model.embed_tokens": 0, "model.layers.0": "cpu", "model.layers.1": "disk", "lm_head": 0}
    assert offloaded_modules(mixed) == ["model.layers.0", "model.layers.1"]
    assert offloaded_modules({"model.layers.0": "cpu", "model.layers.1": "disk"}) == ["model.layers.1"]
    with pytest.raises(InputError, match=r"2 module\(s\) offloaded \(first: model.layers.0 to the CPU\)"):
        check_trainable(mixed)
    with pytest.raises(InputError, match="first: the model to disk"):
        check_trainable({"": "disk"})


def _train_args(base, data, safety, out, *extra):
    return ["train", "--base", str(base), "--data", str(data), "--safety", str(safety), "--rank", "2", "--alpha", "4",
            "--targets", "q_proj,v_proj", "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
            "--device", "cpu", "--quiet", "--json", "--no-keep-refusals", "-o", str(out), *map(str, extra)]


@pytest.fixture
def task_world(tiny_model_dir, tiny_calibration_prompts, tmp_path):
    import json

    from conftest import make_peft_adapter

    safety = tmp_path / "s.safetensors"
    _calibrate(tiny_model_dir, tiny_calibration_prompts, safety)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w} twice.", "output": f"{w} {w}"}) + "\n"
                            for w in "alpha bravo charlie delta".split()))
    task = tmp_path / "task.txt"
    task.write_text("".join(f"Add {i} and {i + 3}.\n" for i in range(6)))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    return {"safety": safety, "data": data, "task": task, "adapter": adapter}


def test_training_under_a_device_map_equals_training_on_one_device(tiny_model_dir, task_world, tmp_path,
                                                                    monkeypatch):
    """train and the re-fit load the model through accelerate's big-model path under --device-map and train it
    there: with every layer resident (this machine has one device, the CPU), the same adapter, bit for bit, as
    the model loaded onto the device. (Layers spread over several GPUs are not run here: no GPU.)"""
    from safetensors.torch import load_file

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    loads = _spy_on_placement(monkeypatch, record_all=True)
    w = task_world
    refit = ["realign", "--base", str(tiny_model_dir), "--adapter", str(w["adapter"]), "--method", "refit",
             "--task-prompts", str(w["task"]), "--max-anchors", "4", "--max-boundary", "2", "--answer-tokens", "4",
             "--steps", "2", "--lr", "5e-3", "--device", "cpu"]
    for label, args in (("train", lambda out, *x: _train_args(tiny_model_dir, w["data"], w["safety"], out, *x)),
                        ("refit", lambda out, *x: [*refit, "-o", str(out), *x])):
        outs = {}
        for where, extra in (("device", []), ("map", ["--device-map", "auto", "--max-memory", "cpu=1GB"])):
            del loads[:]
            out = tmp_path / f"{label}-{where}"
            result = CliRunner().invoke(main, args(out, *extra))
            assert result.exit_code == 0, result.output
            assert loads and all(placed == (where == "map") for placed in loads), (label, where, loads)
            outs[where] = load_file(str(out / "adapter_model.safetensors"))
        assert outs["device"].keys() == outs["map"].keys()
        for key, tensor in outs["device"].items():
            assert torch.equal(tensor, outs["map"][key]), (label, key)


@pytest.mark.parametrize("command", ["train", "retrain", "realign-refit", "repair-refit"])
def test_training_refuses_offloaded_layers(tiny_model_dir, task_world, tmp_path, monkeypatch, command):
    """Layers offloaded to disk cannot be trained: a one-line error naming --max-memory, exit 1, nothing written."""
    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    w, out = task_world, tmp_path / "out"
    base = ["--base", str(tiny_model_dir)]
    args = {
        "train": _train_args(tiny_model_dir, w["data"], w["safety"], out),
        "retrain": ["retrain", *base, "--adapter", str(w["adapter"]), "--safety", str(w["safety"]), "--data",
                    str(w["data"]), "--max-steps", "1", "--device", "cpu", "--quiet", "--no-keep-refusals", "-o", str(out)],
        "realign-refit": ["realign", *base, "--adapter", str(w["adapter"]), "--method", "refit", "--task-prompts",
                          str(w["task"]), "-o", str(out)],
        "repair-refit": ["repair", *base, "--adapter", str(w["adapter"]), "--task-prompts", str(w["task"]),
                         "--heldout-task-prompts", "1", "-o", str(out)],
    }[command]
    result = CliRunner().invoke(main, [*args, "--device-map", "auto", "--max-memory", "cpu=40KB"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--max-memory leaves" in lines[0] and "to disk" in lines[0], result.output
    assert "training needs every layer on the device it runs on" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("out*"))  # no output, no checkpoint folder


def _spy_on_placement(monkeypatch, record_all: bool = False) -> list:
    """The device maps of the models loaded with an active placement (from here on); with ``record_all``, whether
    each model loaded was placed."""
    import salora_merge.hf.loading as loading

    placed, real_load = [], loading.load_causal_lm

    def spying_load(folder, device, placement=None):
        model = real_load(folder, device, placement)
        active = placement is not None and placement.active
        if record_all:
            placed.append(active)
        elif active:
            placed.append(dict(model.hf_device_map))
        return model

    monkeypatch.setattr(loading, "load_causal_lm", spying_load)
    return placed


def test_behavioural_audit_with_layers_offloaded_to_disk_equals_the_audit_in_memory(tiny_model_dir,
                                                                                   tiny_calibration_prompts, tmp_path,
                                                                                   monkeypatch):
    """audit --behavior generates with the adapter applied by hooks on a model whose layers live on disk between
    calls: the same answers, rates and weight-space scores as with the model in memory."""
    import json

    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    _calibrate(tiny_model_dir, tiny_calibration_prompts, tmp_path / "s.safetensors")
    placed = _spy_on_placement(monkeypatch)
    common = ["audit", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--safety",
              str(tmp_path / "s.safetensors"), "--max-new-tokens", "6", "--generation-batch-size", "2", "--behavior",
              "--max-eval-prompts", "4", "--device", "cpu", "--format", "json"]
    reports = {}
    for label, extra in (("memory", []), ("offloaded", ["--device-map", "auto", "--max-memory", "cpu=40KB",
                                                         "--offload-folder", str(tmp_path / "offload")])):
        out = tmp_path / f"{label}.json"
        result = CliRunner().invoke(main, [*common, *extra, "-o", str(out)])
        assert result.exit_code in (0, 3), result.output
        reports[label] = json.loads(out.read_text())
    a, b = reports["memory"], reports["offloaded"]
    assert a["behavior"]["base"] == b["behavior"]["base"]
    assert a["adapters"][0]["behavior"] == b["adapters"][0]["behavior"]
    assert a["adapters"][0]["weight_space"] == b["adapters"][0]["weight_space"]
    # the adapter changes what the model says, so equal answers mean the offloaded hooks applied it
    # the adapter changes what the model says (its answers differ from the base's), so equal answers mean the
    # hooks applied it on the offloaded layers too
    examples = a["adapters"][0]["behavior"]["examples"]
    assert examples and any(e["adapter"] != e["base"] for e in examples)
    assert placed and all("disk" in set(device_map.values()) for device_map in placed)  # really offloaded


def test_repair_evaluation_with_layers_offloaded_to_disk_equals_the_evaluation_in_memory(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """repair's before/after measurement on a model whose layers live on disk: the same behaviour and task
    agreement as in memory (shrink: no training, so only the evaluation is placed)."""
    import json

    from conftest import make_peft_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    placed = _spy_on_placement(monkeypatch)
    reports = {}
    for label, extra in (("memory", []), ("offloaded", ["--device-map", "auto", "--max-memory", "cpu=40KB",
                                                         "--offload-folder", str(tmp_path / "offload")])):
        result = CliRunner().invoke(main, [
            "repair", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--method", "shrink", "--gamma", "0.5",
            "--max-eval-prompts", "3", "--eval-new-tokens", "4", "--heldout-task-prompts", "2", "--device", "cpu", *extra,
            "-o", str(tmp_path / label), "--json"])
        assert result.exit_code == 0, result.output
        reports[label] = json.loads(result.stdout)
    a, b = reports["memory"], reports["offloaded"]
    assert set(a["behavior"]) == {"base", "adapter", "repaired"}
    assert a["behavior"] == b["behavior"] and a["task"] == b["task"]
    # the offloaded run's loads (the base-refusal probe before the repair, then the evaluation), each on disk
    assert len(placed) == 2 and all("disk" in set(p.values()) for p in placed)


def test_audit_that_loads_no_model_refuses_placement_options(tiny_model_dir, tmp_path):
    """With --safety and without --behavior the audit never loads the model: a placement option would be silently
    ignored, so it is a one-line error naming it, and no report is written."""
    from conftest import make_peft_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    safety = tmp_path / "missing-is-fine.safetensors"  # refused before the module is read
    out = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["audit", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--safety",
                                       str(safety), "--device-map", "auto", "--format", "json", "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert "--device-map places the model" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists()


def test_placement_problems_name_the_options_given():
    """One check serves calibrate, the behavioural evaluation, training and realign's re-fit."""
    from salora_merge.errors import InputError
    from salora_merge.hf.placement import placement_of, placement_problems

    assert placement_problems("auto", "0=20GiB,cpu=60GiB", "off") == []
    assert placement_problems(None, None, "off") == ["--offload-folder places a model over devices: give --device-map "
                                                     "too"]
    assert placement_problems(None, "cpu=1GB", "off") == ["--max-memory and --offload-folder place a model over "
                                                          "devices: give --device-map too"]
    assert placement_problems("everywhere", None)[0].startswith("--device-map must be one of auto, balanced")
    with pytest.raises(InputError, match="--max-memory 'lots': expected DEVICE=SIZE"):
        placement_problems("auto", "lots")
    placed = placement_of("auto", "0=20GiB,cpu=60GiB")
    assert placed.active and placed.max_memory == {"0": "20GiB", "cpu": "60GiB"} and placed.offload_folder is None
    assert not placement_of(None, None).active
