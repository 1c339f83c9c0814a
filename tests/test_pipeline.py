"""run: a YAML pipeline (calibrate -> realign -> merge -> push), validated up front and resumable."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import make_peft_adapter
from hubserver import FakeHub
from salora_merge.cli import main
from salora_merge.errors import InputError
from salora_merge.pipeline.config import load_pipeline
from salora_merge.pipeline.run import STATE_NAME, run_pipeline

TOKEN = "hf_pipeline_token"


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_schema_problem_is_reported_at_once(tmp_path):
    config = _write(tmp_path / "p.yml", {
        "base": 3, "adapters": [{"path": "x", "weight": "heavy", "colour": 1}], "output": "out",
        "safety": {"file": "s.safetensors", "calibrate": {"rank": 0, "flavour": 2}},
        "merge": {"dtype": "int8", "shard_size": "lots"}, "push": {"repo_id": "nope"}, "extra": 1,
    })
    with pytest.raises(InputError) as info:
        load_pipeline(config)
    message = str(info.value)
    for expected in ("extra: unknown key", "base: required", "adapters[0].colour: unknown key",
                     "adapters[0].weight: expected a finite number", "safety: give file or calibrate, not both",
                     "safety.file: ", "safety.calibrate.flavour: unknown option", "--rank must be positive",
                     "merge.dtype: 'int8'", "merge.shard_size 'lots'", "push.repo_id: expected org/name"):
        assert expected in message, expected
    assert "11 problem(s)" in message
    result = CliRunner().invoke(main, ["run", str(config)])
    assert result.exit_code == 1 and "problem(s) in the pipeline config" in result.output


def test_pipeline_runs_resumes_and_reruns_only_what_changed(tiny_model_dir, tiny_calibration_prompts, tmp_path,
                                                            monkeypatch):
    make_peft_adapter(tiny_model_dir, tmp_path / "adapters" / "a", seed=1)
    make_peft_adapter(tiny_model_dir, tmp_path / "adapters" / "b", seed=2, target_modules=["v_proj", "up_proj"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub({TOKEN: "alice"}) as hub:
        data = {
            "base": str(tiny_model_dir),
            "adapters": ["adapters/a", {"path": "adapters/b", "weight": 0.5}],
            "safety": {"calibrate": {"prompts": str(tiny_calibration_prompts), "rank": 4, "max_new_tokens": 6,
                                     "device": "cpu"}},
            "merge": {"shard_size": "20KB"},
            "push": {"repo_id": "alice/tiny-pipeline", "endpoint": hub.endpoint},
            "output": "work",
        }
        config_path = _write(tmp_path / "pipeline.yml", data)
        lines: list[str] = []

        # Dry run: the plan, nothing written.
        records = run_pipeline(load_pipeline(config_path), dry_run=True, echo=lines.append)
        assert [r["step"] for r in records] == ["calibrate", "realign[0]", "realign[1]", "merge", "push"]
        assert all(r["status"] == "planned" for r in records) and not (tmp_path / "work").exists()

        # An interruption in the merge step: the finished steps are kept.
        import salora_merge.merging.run as merge_module

        original = merge_module.run_merge

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(merge_module, "run_merge", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(load_pipeline(config_path), echo=lines.append)
        state = json.loads((tmp_path / "work" / STATE_NAME).read_text())
        assert set(state) == {"calibrate", "realign[0]", "realign[1]"}
        assert not (tmp_path / "work" / "model").exists()
        monkeypatch.setattr(merge_module, "run_merge", original)

        # Resume: only merge and push run.
        records = run_pipeline(load_pipeline(config_path), echo=lines.append)
        assert [r["status"] for r in records] == ["skipped", "skipped", "skipped", "done", "done"]
        work = tmp_path / "work"
        assert (work / "safety.safetensors").is_file()
        assert sorted(p.name for p in (work / "realigned").iterdir()) == ["00-a", "01-b"]
        assert (work / "model" / "model.safetensors.index.json").is_file()
        provenance = yaml.safe_load((work / "model" / "salora_config.yml").read_text())
        assert [a["weight"] for a in provenance["adapters"]] == [1.0, 0.5]
        assert provenance["adapters"][0]["ref"].endswith("realigned/00-a")
        assert provenance["adapters"][1]["realigned_before"]["rank"] == 4  # the realign step's report
        card = (work / "model" / "README.md").read_text()
        assert "outputs of `salora-merge realign`" in card and "as they are" not in card
        assert "model.safetensors.index.json" in hub.repos["alice/tiny-pipeline"].branches["main"]

        # Nothing changed: everything is skipped.
        records = run_pipeline(load_pipeline(config_path), echo=lines.append)
        assert {r["status"] for r in records} == {"skipped"}

        # A merge option changed: merge and push re-run, calibration and realign do not.
        data["merge"]["dtype"] = "bfloat16"
        _write(config_path, data)
        records = run_pipeline(load_pipeline(config_path), echo=lines.append)
        assert [r["status"] for r in records] == ["skipped", "skipped", "skipped", "done", "done"]
        assert json.loads((work / "model" / "config.json").read_text())["dtype"] == "bfloat16"

        # An adapter changed on disk: its realign, the merge and the push re-run.
        make_peft_adapter(tiny_model_dir, tmp_path / "adapters" / "b2", seed=3, target_modules=["v_proj", "up_proj"])
        (tmp_path / "adapters" / "b" / "adapter_model.safetensors").write_bytes(
            (tmp_path / "adapters" / "b2" / "adapter_model.safetensors").read_bytes())
        result = CliRunner().invoke(main, ["run", str(config_path), "--json"])
        assert result.exit_code == 0, result.output
        statuses = [r["status"] for r in json.loads(result.stdout)]
        assert statuses == ["skipped", "skipped", "done", "done", "done"]


def test_shipped_example_pipeline_is_valid():
    from pathlib import Path

    example = Path(__file__).parent.parent / "examples" / "pipelines" / "smollm2-safe-merge.yml"
    config = load_pipeline(example)
    assert config.base == "smollm2-135m-instruct" and config.realign and config.calibration.rank == 32
    assert Path(config.adapters[0][0]).is_dir()
    assert config.output.name == "smollm2-safe-merge" and config.output.parent.name == "out"


def test_audit_gate_stops_the_pipeline_before_merge_and_push(tiny_model_dir, tiny_calibration_prompts, tmp_path,
                                                              monkeypatch):
    make_peft_adapter(tiny_model_dir, tmp_path / "a", seed=1, target_modules=["q_proj", "v_proj"])
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub({TOKEN: "alice"}) as hub:
        data = {
            "base": str(tiny_model_dir), "adapters": ["a"], "realign": False,
            "safety": {"calibrate": {"prompts": str(tiny_calibration_prompts), "rank": 4, "max_new_tokens": 6,
                                     "device": "cpu"}},
            "audit": {"fail_above": 0.0001},
            "push": {"repo_id": "alice/gated", "endpoint": hub.endpoint},
            "output": "work",
        }
        config = _write(tmp_path / "p.yml", data)
        result = CliRunner().invoke(main, ["run", str(config)])
        assert result.exit_code == 3, result.output
        assert "audit gate failed" in result.output and "nothing was merged or pushed" in result.output
        assert (tmp_path / "work" / "audit.json").is_file() and not (tmp_path / "work" / "model").exists()
        assert hub.repos == {}
        report = json.loads((tmp_path / "work" / "audit.json").read_text())
        assert report["adapters"][0]["status"] == "fail"
        # Realigned, the same adapter passes the gate; the merged card carries the audit figures.
        data["realign"] = True
        _write(config, data)
        result = CliRunner().invoke(main, ["run", str(config)])
        assert result.exit_code == 0, result.output
        card = (tmp_path / "work" / "model" / "README.md").read_text()
        assert "## Safety audit" in card and "| pass |" in card
        assert "alice/gated" in hub.repos


def test_audit_section_problems_are_listed(tmp_path):
    config = _write(tmp_path / "p.yml", {"base": "x", "adapters": ["a"], "output": "o",
                                         "audit": {"fail_above": "high", "behavior": {"judge_model": 1}, "colour": 2}})
    with pytest.raises(InputError) as info:
        load_pipeline(config)
    message = str(info.value)
    assert "audit.fail_above: expected a number" in message and "audit.behavior.judge_model: unknown key" in message
    assert "audit.colour: unknown key" in message


def test_pipeline_repair_step_writes_the_repaired_adapter_and_merges_it(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from salora_merge.io.adapter import read_adapter

    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora", seed=3)
    config = _write(tmp_path / "p.yml", {"base": str(tiny_model_dir), "adapters": ["lora"], "output": "out",
                                         "repair": {"method": "shrink", "gamma": 0.5, "evaluate": False}})
    loaded = load_pipeline(config)
    assert loaded.repair is not None and loaded.method == "shrink" and not loaded.realign
    records = run_pipeline(loaded, echo=lambda line: None)
    assert [r["step"] for r in records] == ["repair[0]", "merge"]
    repaired = tmp_path / "out" / "repaired" / "00-lora"
    report = json.loads((repaired / "salora_repair.json").read_text())
    assert report["method"] == "shrink" and report["method_options"] == {"gamma": 0.5}
    before, after = read_adapter(adapter).modules, read_adapter(repaired).modules
    name = "model.layers.0.self_attn.q_proj"
    delta = (after[name].lora_B @ after[name].lora_A) * after[name].scaling
    assert float((delta - 0.5 * (before[name].lora_B @ before[name].lora_A) * before[name].scaling).abs().max()) < 1e-6
    merged = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    torch.testing.assert_close(merged[f"{name}.weight"].double(), base[f"{name}.weight"].double() + delta.double(),
                               atol=1e-6, rtol=0)
    assert [r["status"] for r in run_pipeline(load_pipeline(config), echo=lambda line: None)] == ["skipped"] * 2


def test_pipeline_repair_section_problems_are_listed(tmp_path):
    config = _write(tmp_path / "p.yml", {"base": "b", "adapters": ["a"], "output": "o", "realign": True,
                                         "repair": {"method": "refit"}})
    with pytest.raises(InputError, match="give realign or repair, not both"):
        load_pipeline(config)
    config = _write(tmp_path / "q.yml", {"base": "b", "adapters": ["a"], "output": "o",
                                         "repair": {"method": "resta", "heldout_task_prompts": -1, "evaluate": "yes",
                                                    "behavior": {"colour": 1}, "task_prompts": 3}})
    with pytest.raises(InputError) as info:
        load_pipeline(config)
    message = str(info.value)
    for expected in ("repair.unaligned: required by method resta", "repair.heldout_task_prompts: expected a count",
                     "repair.evaluate: expected true or false", "repair.behavior.colour: unknown key",
                     "repair.task_prompts: expected a file"):
        assert expected in message, expected


def test_placement_keys_reach_calibration_and_the_behavioural_evaluation(tmp_path):
    """A pipeline places a large model the way the CLI does: device_map, max_memory and offload_folder in
    safety.calibrate and in repair.behavior (and audit.behavior), the folder relative to the config file; a bad
    value is one of the listed problems."""
    placement = {"device_map": "auto", "max_memory": "0=20GiB,cpu=60GiB", "offload_folder": "offload"}
    config = _write(tmp_path / "p.yml", {"base": "b", "adapters": ["a"], "output": "o",
                                         "safety": {"calibrate": dict(placement)},
                                         "repair": {"method": "refit", "behavior": dict(placement)}})
    loaded = load_pipeline(config)
    for options in (loaded.calibration, loaded.repair.behavior):
        assert (options.device_map, options.max_memory) == ("auto", "0=20GiB,cpu=60GiB")
        assert options.offload_folder == str(tmp_path / "offload")
    assert loaded.repair.behavior.placement().max_memory == {"0": "20GiB", "cpu": "60GiB"}
    config = _write(tmp_path / "q.yml", {"base": "b", "adapters": ["a"], "output": "o",
                                         "safety": {"calibrate": {"device_map": "everywhere"}},
                                         "audit": {"behavior": {"device_map": "auto", "max_memory": {"0": "1GB"}}},
                                         "repair": {"method": "shrink", "behavior": {"max_memory": "cpu=1GB"}}})
    with pytest.raises(InputError) as info:
        load_pipeline(config)
    message = str(info.value)
    for expected in ("safety.calibrate: --device-map must be one of auto", "audit.behavior.max_memory: expected a "
                     "string such as '0=20GiB,cpu=60GiB'", "repair.behavior: --max-memory places "
                     "a model over devices: give --device-map too"):
        assert expected in message, expected


def test_pipeline_repair_step_with_the_default_method(tiny_model_dir, tmp_path, monkeypatch):
    """repair's default method, refit, needs task prompts, which the repair step gives it (discovered from the
    adapter when the config names none): the config is valid without them, and the step re-fits."""
    from salora_merge.io.adapter import read_adapter

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora", seed=3)
    config = _write(tmp_path / "p.yml", {"base": str(tiny_model_dir), "adapters": ["lora"], "output": "out",
                                         "repair": {"steps": 2, "max_anchors": 4, "max_boundary": 2,
                                                    "answer_tokens": 4, "heldout_task_prompts": 1,
                                                    "discover_candidates": 4, "discover_tokens": 8,
                                                    "distill_top": 4, "evaluate": False}})
    loaded = load_pipeline(config)
    assert loaded.method == "refit" and loaded.repair.task_prompts == "discover"
    assert "task_prompts" not in dict(loaded.method_options)  # given at run time, with some prompts held out
    records = run_pipeline(loaded, echo=lambda line: None)
    assert [r["step"] for r in records] == ["repair[0]", "merge"]
    repaired = tmp_path / "out" / "repaired" / "00-lora"
    report = json.loads((repaired / "salora_refit.json").read_text())
    assert report["task_prompts"] == "discover" and report["distilled"] > 0
    assert 0 < len(report["discovery"]["distilled"]) <= 4 and len(report["discovery"]["heldout"]) == 1
    before, after = read_adapter(adapter).modules, read_adapter(repaired).modules
    assert any(not torch.equal(after[n].lora_B, before[n].lora_B) for n in before)  # the re-fit moved it
