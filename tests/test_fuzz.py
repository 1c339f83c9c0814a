"""Bad input, fuzzed: corrupted adapter configs and weights, base checkpoints, safety modules, options and pipeline
files, each run through the commands that read them. For every case: no traceback, exit code 1, a message of at
most two lines that names the offending file, tensor or option, and nothing at the output path or beside it.

The corruptions are written out below (a seeded sample of numeric values where a value is fuzzed) so a failure
names the exact case. ``ACCEPTED`` lists the inputs that look odd but are right to accept, with the reason.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from conftest import make_peft_adapter
from safetensors.torch import load_file, save_file

from salora_merge.cli import main

SEED = 20261202


@pytest.fixture(scope="module")
def world(tiny_model_dir, tiny_calibration_prompts, tmp_path_factory):
    """A valid base, adapter and safety module to corrupt copies of."""
    root = tmp_path_factory.mktemp("fuzz")
    adapter = make_peft_adapter(tiny_model_dir, root / "adapter", target_modules=["q_proj", "v_proj"])
    safety = root / "safety.safetensors"
    result = CliRunner().invoke(main, ["calibrate", "--base", str(tiny_model_dir), "--prompts",
                                       str(tiny_calibration_prompts), "--rank", "2", "--max-new-tokens", "4",
                                       "--targets", "q_proj,v_proj", "-o", str(safety)])
    assert result.exit_code == 0, result.output
    return {"base": tiny_model_dir, "adapter": adapter, "safety": safety, "prompts": tiny_calibration_prompts}


def _config_case(edit: Callable[[dict], None]):
    def build(world, tmp: Path) -> dict:
        folder = tmp / "adapter"
        shutil.copytree(world["adapter"], folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        edit(config)
        (folder / "adapter_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
        return {"adapter": folder}

    return build


def _raw_config_case(text: str):
    def build(world, tmp: Path) -> dict:
        folder = tmp / "adapter"
        shutil.copytree(world["adapter"], folder)
        (folder / "adapter_config.json").write_text(text)
        return {"adapter": folder}

    return build


def _weights_case(edit: Callable[[dict], dict]):
    def build(world, tmp: Path) -> dict:
        folder = tmp / "adapter"
        shutil.copytree(world["adapter"], folder)
        path = folder / "adapter_model.safetensors"
        save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})
        return {"adapter": folder}

    return build


def _first(tensors: dict, fn) -> dict:
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    return {**tensors, key: fn(tensors[key])}


def _set(config: dict, **values) -> None:
    config.update(values)


class _NotATensor:  # a pickle that weights_only=True refuses (it would have to run code to build this)
    pass


def _pickle_case(world, tmp: Path) -> dict:
    folder = tmp / "adapter"
    shutil.copytree(world["adapter"], folder)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.x.lora_A.weight": _NotATensor()}, str(folder / "adapter_model.bin"))
    return {"adapter": folder, "extra": ["--allow-pickle"]}


rng = random.Random(SEED)
HUGE = [10.0 ** rng.randint(39, 308) for _ in range(2)]

# (id, build, the text the message must contain)
ADAPTER_CASES = [
    ("r-overflow", _raw_config_case('{"peft_type": "LORA", "r": 1e400, "lora_alpha": 8, '
                                    '"target_modules": ["q_proj"]}'), "adapter_config.json"),
    ("r-string", _config_case(lambda c: _set(c, r="4")), "'r'"),
    ("r-float", _config_case(lambda c: _set(c, r=4.5)), "'r'"),
    ("r-bool", _config_case(lambda c: _set(c, r=True)), "'r'"),
    ("alpha-nan", _raw_config_case('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, '
                                   '"target_modules": ["q_proj", "v_proj"]}'), "lora_alpha"),
    ("alpha-huge", _config_case(lambda c: _set(c, lora_alpha=HUGE[0])), "lora_alpha"),
    ("target-regex", _config_case(lambda c: _set(c, target_modules="(q_proj")), "target_modules"),
    ("rank-pattern-regex", _config_case(lambda c: _set(c, rank_pattern={"(q": 2})), "rank_pattern"),
    ("rank-pattern-list", _config_case(lambda c: _set(c, rank_pattern=["q_proj"])), "rank_pattern"),
    ("rank-pattern-value", _config_case(lambda c: _set(c, rank_pattern={"q_proj": "two"})), "rank_pattern"),
    ("alpha-pattern-value", _config_case(lambda c: _set(c, alpha_pattern={"q_proj": [1]})), "alpha_pattern"),
    ("layers-strings", _config_case(lambda c: _set(c, layers_to_transform=["a", "b"])), "layers_to_transform"),
    ("modules-to-save-int", _config_case(lambda c: _set(c, modules_to_save=3)), "modules_to_save"),
    ("nested", _raw_config_case('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], '
                                '"x": ' + "[" * 5000 + "]" * 5000 + "}"), "nested too deeply"),
    ("fp8-factor", _weights_case(lambda t: _first(t, lambda v: v.to(torch.float8_e4m3fn))), "float8"),
    ("int-factor", _weights_case(lambda t: _first(t, lambda v: (v * 100).to(torch.int32))), "int32"),
    ("bool-factor", _weights_case(lambda t: _first(t, lambda v: v > 0)), "bool"),
    ("pickle-with-code", _pickle_case, "adapter_model.bin"),
    # the flag that reads every weight the other way round: named as the field, not "another model"
    ("fan-in-fan-out-on-linear", _config_case(lambda c: _set(c, fan_in_fan_out=True)), "fan_in_fan_out is true"),
]

ACCEPTED = {
    "unknown config field": "PEFT ignores fields it does not know (forward compatibility); so do we",
    "all-zero lora_B": "a freshly initialised adapter; realign and merge of it are exact no-ops",
    "mixed-precision factors": "PEFT loads bfloat16 A with float32 B; the math runs in float32 either way",
    "negative merge weight": "subtracting an adapter (task arithmetic) is a documented use of --weight",
}


def _assert_clean_failure(result, tmp: Path, before: set, names: str) -> None:
    text = result.output
    assert "Traceback" not in text and "internal error" not in text, text
    assert result.exit_code == 1, (result.exit_code, text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, text
    assert names in text, (names, text)
    assert {p.name for p in tmp.iterdir()} == before, sorted({p.name for p in tmp.iterdir()} - before)


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
@pytest.mark.parametrize("command", ["realign", "merge", "audit"])
def test_corrupted_adapters_are_one_line_errors(world, tmp_path, case, command):
    _, build, names = case
    given = build(world, tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    args = {"realign": ["realign", "--safety", world["safety"], "-o", out],
            "merge": ["merge", "-o", out],
            "audit": ["audit", "--safety", world["safety"], "-o", out / "report.json"]}[command]
    result = CliRunner().invoke(main, [str(a) for a in (args[0], "--base", world["base"], "--adapter",
                                                        given["adapter"], *given.get("extra", []), *args[1:])])
    if command == "audit":  # an adapter that cannot be audited: exit 4, its error in the report (written)
        assert result.exit_code == 4 and "Traceback" not in result.output, result.output
        assert names in (out / "report.json").read_text(), result.output
        return
    _assert_clean_failure(result, tmp_path, before, names)


def _base_case(edit: Callable[[Path], None]):
    def build(world, tmp: Path) -> dict:
        folder = tmp / "base"
        shutil.copytree(world["base"], folder)
        edit(folder)
        return {"base": folder}

    return build


def _sharded(folder: Path, weight_map) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _safety_case(edit: Callable[[dict, dict], tuple[dict, dict]]):
    def build(world, tmp: Path) -> dict:
        from safetensors import safe_open

        with safe_open(str(world["safety"]), framework="pt") as handle:
            meta = dict(handle.metadata())
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        header = json.loads(meta["salora_safety"])
        tensors, header = edit(tensors, header)
        path = tmp / "safety.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt", "salora_safety": json.dumps(header)})
        return {"safety": path}

    return build


def _basis_other_layer(tensors: dict, header: dict) -> tuple[dict, dict]:
    """An orthonormal basis, valid in itself, of another layer's size (40 rows for a 32-row layer)."""
    key = sorted(k for k in tensors if k.startswith("basis::"))[0]
    q, _ = torch.linalg.qr(torch.randn(40, tensors[key].shape[1], generator=torch.Generator().manual_seed(SEED)))
    return {**tensors, key: q.contiguous()}, header


def _truncated(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _basis_rows(tensors: dict, header: dict) -> tuple[dict, dict]:
    key = sorted(k for k in tensors if k.startswith("basis::"))[0]
    return {**tensors, key: torch.cat([tensors[key], tensors[key][:1]])}, header


# (id, build, command, extra args, text the message must contain)
INPUT_CASES = [
    ("index-weight-map-list", _base_case(lambda f: _sharded(f, ["model.safetensors"])), "merge", [],
     "model.safetensors.index.json"),
    ("index-weight-map-ints", _base_case(lambda f: _sharded(f, {"lm_head.weight": 3})), "merge", [],
     "model.safetensors.index.json"),
    ("config-array", _base_case(lambda f: (f / "config.json").write_text("[1, 2]")), "merge", [], "config.json"),
    ("config-array-calibrate", _base_case(lambda f: (f / "config.json").write_text("[1, 2]")), "calibrate", [],
     "config.json"),
    ("safety-meta-list", _safety_case(lambda t, h: (t, [h])), "realign", [], "safety.safetensors"),
    ("safety-counts-text", _safety_case(lambda t, h: (t, {**h, "counts": {k: "many" for k in h["counts"]}})),
     "realign", [], "safety.safetensors"),
    ("safety-basis-rows", _safety_case(_basis_rows), "audit", [], "safety.safetensors"),
    ("safety-basis-rows-realign", _safety_case(_basis_rows), "realign", [], "safety.safetensors"),
    ("safety-basis-other-layer", _safety_case(_basis_other_layer), "audit", [], "has 40 rows"),
    ("safety-basis-other-layer-realign", _safety_case(_basis_other_layer), "realign", [], "has 40 rows"),
    ("base-truncated-calibrate", _base_case(_truncated), "calibrate", [], "model.safetensors"),
    ("base-truncated-merge", _base_case(_truncated), "merge", [], "model.safetensors"),
    ("rank-beyond-every-layer", None, "calibrate", ["--rank", "500"], "exceeds every layer"),
    ("contrast-ridge-nan", None, "calibrate", ["--contrast-prompts", "PROMPTS", "--contrast-ridge", "nan"],
     "--contrast-ridge"),
    ("shard-size-nan", None, "merge", ["--shard-size", "nanGB"], "--shard-size"),
    ("shard-size-inf", None, "merge", ["--shard-size", "infGB"], "--shard-size"),
    ("weight-huge", None, "merge", ["--weight", "3e38"], "beyond the float32 range"),
    ("output-under-file", None, "merge", ["-o", "FILE/out"], "FILE"),
    ("output-under-file-realign", None, "realign", ["-o", "FILE/out"], "FILE"),
    ("output-under-file-calibrate", None, "calibrate", ["-o", "FILE/s.safetensors"], "FILE"),
]


@pytest.mark.parametrize("case", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_corrupted_inputs_and_options_are_one_line_errors(world, tmp_path, case):
    _, build, command, extra, names = case
    given = {"base": world["base"], "adapter": world["adapter"], "safety": world["safety"]}
    if build is not None:
        given.update(build(world, tmp_path))
    (tmp_path / "FILE").write_text("a regular file, not a folder\n")
    before = {p.name for p in tmp_path.iterdir()}
    extra = [str(tmp_path / "FILE/out") if e == "FILE/out" else str(tmp_path / "FILE/s.safetensors")
             if e == "FILE/s.safetensors" else str(world["prompts"]) if e == "PROMPTS" else e for e in extra]
    out = tmp_path / "out"
    common = {"merge": ["--adapter", given["adapter"]],
              "realign": ["--adapter", given["adapter"], "--safety", given["safety"]],
              "audit": ["--adapter", given["adapter"], "--safety", given["safety"]],
              "calibrate": ["--prompts", world["prompts"], "--rank", 2, "--max-new-tokens", 2,
                            "--targets", "q_proj"]}[command]
    if "-o" not in extra and command != "audit":
        extra += ["-o", str(out / "s.safetensors") if command == "calibrate" else str(out)]
    result = CliRunner().invoke(main, [str(a) for a in (command, "--base", given["base"], *common, *extra)])
    if command == "audit":
        assert result.exit_code in (1, 4) and "Traceback" not in result.output, result.output
        assert names in result.output, result.output
        return
    _assert_clean_failure(result, tmp_path, before, names)


PIPELINE_CASES = [
    ("invalid-utf8", b"base: \xff\xfe\nadapters: [a]\noutput: out\n", "pipeline.yml"),
    ("base-number", b"base: 5\nadapters: [ADAPTER]\noutput: out\n", "base:"),
    ("weight-nan", b"base: BASE\nadapters: [{path: ADAPTER, weight: .nan}]\noutput: out\n", "weight"),
    ("weight-inf", b"base: BASE\nadapters: [{path: ADAPTER, weight: .inf}]\noutput: out\n", "weight"),
    ("weight-string", b"base: BASE\nadapters: [{path: ADAPTER, weight: heavy}]\noutput: out\n", "weight"),
    ("output-number", b"base: BASE\nadapters: [ADAPTER]\noutput: 7\n", "output:"),
    ("merge-dtype-number", b"base: BASE\nadapters: [ADAPTER]\noutput: out\nmerge: {dtype: 3}\n", "dtype"),
    ("merge-shard-nan", b"base: BASE\nadapters: [ADAPTER]\noutput: out\nmerge: {shard_size: nanGB}\n", "shard"),
    ("not-a-mapping", b"- just\n- a list\n", "pipeline.yml"),
    ("deep", b"base: " + b"[" * 3000 + b"]" * 3000 + b"\n", "pipeline.yml"),
    # a number where a path or device is expected, a string where a number is: each names its key
    ("calibrate-device-number", b"base: BASE\nadapters: [ADAPTER]\noutput: out\nsafety: {calibrate: {device: 3}}\n",
     "safety.calibrate.device"),
    ("calibrate-prompts-number", b"base: BASE\nadapters: [ADAPTER]\noutput: out\nsafety: {calibrate: {prompts: 7}}\n",
     "safety.calibrate.prompts"),
    ("calibrate-rank-string", b"base: BASE\nadapters: [ADAPTER]\noutput: out\nsafety: {calibrate: {rank: many}}\n",
     "safety.calibrate.rank"),
    ("behavior-device-number", b"base: BASE\nadapters: [ADAPTER]\noutput: out\naudit: {behavior: {device: 2}}\n",
     "audit.behavior.device"),
    ("behavior-prompts-string", b"base: BASE\nadapters: [ADAPTER]\noutput: out\naudit: {behavior: {max_prompts: lots}}\n",
     "audit.behavior.max_prompts"),
    ("output-list", b"base: BASE\nadapters: [ADAPTER]\noutput: [a, b]\n", "output: expected a folder path"),
]


@pytest.mark.parametrize("case", PIPELINE_CASES, ids=[c[0] for c in PIPELINE_CASES])
def test_corrupted_pipeline_files_are_one_line_errors(world, tmp_path, case):
    _, text, names = case
    config = tmp_path / "pipeline.yml"
    config.write_bytes(text.replace(b"BASE", str(world["base"]).encode())
                       .replace(b"ADAPTER", str(world["adapter"]).encode()))
    before = {p.name for p in tmp_path.iterdir()}
    result = CliRunner().invoke(main, ["run", str(config)])
    _assert_clean_failure(result, tmp_path, before, names)


OPTION_CASES = [
    ("train-lr-nan", "train", ["--lr", "nan"], "--lr"),
    ("train-lr-inf", "train", ["--lr", "inf"], "--lr"),
    ("train-alpha-nan", "train", ["--alpha", "nan"], "--alpha"),
    ("train-seed-huge", "train", ["--seed", str(2 ** 70)], "--seed"),
    ("train-warmup-nan", "train", ["--warmup-ratio", "nan"], "--warmup-ratio"),
    ("train-dropout-nan", "train", ["--dropout", "nan"], "--dropout"),
    ("train-epochs-inf", "train", ["--epochs", "inf"], "--epochs"),
    ("safelora-threshold-nan", "realign", ["--method", "safelora", "--threshold", "nan"], "--threshold"),
    ("shrink-gamma-nan", "realign", ["--method", "shrink", "--gamma", "nan"], "--gamma"),
    ("energy-nan", "calibrate", ["--energy", "nan"], "--energy"),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_non_finite_and_out_of_range_options_are_one_line_errors(world, tmp_path, case):
    _, command, extra, names = case
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    common = {"train": ["--data", data, "--safety", world["safety"], "--targets", "q_proj", "--rank", 2,
                        "--max-steps", 1, "--device", "cpu", "--quiet", "--no-keep-refusals", "-o", out],
              "realign": ["--adapter", world["adapter"], "-o", out],
              "calibrate": ["--prompts", world["prompts"], "--rank", 2, "--max-new-tokens", 2, "--targets", "q_proj",
                            "-o", out]}[command]
    result = CliRunner().invoke(main, [str(a) for a in (command, "--base", world["base"], *common, *extra)])
    _assert_clean_failure(result, tmp_path, before, names)


def _prompts(tmp: Path, data: bytes) -> Path:
    path = tmp / "prompts.jsonl"
    path.write_bytes(data)
    return path


FILE_CASES = [
    # calibrate: the prompts file
    ("prompts-not-utf8", "calibrate", lambda w, t: ["--prompts", _prompts(t, b'{"prompt": "\xff"}\n')], "prompts.jsonl"),
    ("prompts-not-objects", "calibrate", lambda w, t: ["--prompts", _prompts(t, b"[1, 2]\n3\n")], "prompts.jsonl"),
    ("prompts-empty", "calibrate", lambda w, t: ["--prompts", _prompts(t, b"")], "prompts.jsonl"),
    ("prompts-no-field", "calibrate", lambda w, t: ["--prompts", _prompts(t, b'{"answer": "hi"}\n')], "prompts.jsonl"),
    # retrain: the old adapter and the data
    ("retrain-adapter-r-string", "retrain", lambda w, t: ["--adapter", _config_case(
        lambda c: _set(c, r="4"))(w, t)["adapter"]], "'r'"),
    ("retrain-adapter-int", "retrain", lambda w, t: ["--adapter", _weights_case(
        lambda x: _first(x, lambda v: v.to(torch.int32)))(w, t)["adapter"]], "int32"),
    ("train-data-not-utf8", "train", lambda w, t: ["--data", _prompts(t, b'{"instruction": "\xff"}\n')],
     "prompts.jsonl"),
    # push: what it would publish (no Hub is reached: the folder is checked first)
    ("push-missing", "push", lambda w, t: [t / "nothing"], "nothing"),
    ("push-not-a-model", "push", lambda w, t: [_prompts(t, b"x").parent], "model"),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_every_command_that_reads_files_refuses_bad_ones_in_one_line(world, tmp_path, case, monkeypatch):
    _, command, make, names = case
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may reach a network
    given = [str(a) for a in make(world, tmp_path)]
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    data = tmp_path / "data.jsonl"
    if command == "calibrate":
        args = ["calibrate", "--base", world["base"], "--rank", 2, "--max-new-tokens", 2, "--targets", "q_proj",
                *given, "-o", out]
    elif command == "retrain":
        data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n")
        before.add("data.jsonl")
        args = ["retrain", "--base", world["base"], "--safety", world["safety"], "--data", data, *given,
                "--max-steps", 1, "--device", "cpu", "--quiet", "--no-keep-refusals", "-o", out]
    elif command == "train":
        args = ["train", "--base", world["base"], "--safety", world["safety"], "--targets", "q_proj", "--rank", 2,
                *given, "--max-steps", 1, "--device", "cpu", "--quiet", "--no-keep-refusals", "-o", out]
    else:
        args = ["push", *given, "--repo-id", "org/name"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    _assert_clean_failure(result, tmp_path, before, names)
