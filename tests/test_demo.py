"""``make demo``'s closing summary, checked through the function that prints it, on an audit and a repair run
on a tiny model; and the Makefile runs the commands the README names."""

from __future__ import annotations

import json
import runpy
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def test_demo_summary_on_a_tiny_audit_and_repair(tiny_model_dir, tiny_calibration_prompts, tmp_path, monkeypatch):
    from conftest import make_peft_adapter

    import salora_merge as sm
    from salora_merge.repairing.report import REPORT_NAME

    monkeypatch.setenv("SALORA_MERGE_CACHE", str(tmp_path / "cache"))
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "lora")
    check = tmp_path / "check.jsonl"
    check.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                             for i in range(4)))
    behavior = sm.BehaviorOptions(max_prompts=3, max_new_tokens=4, device="cpu")
    out = tmp_path / "demo"
    audit = sm.audit(tiny_model_dir, [str(adapter)], sm.AuditOptions(behavior=behavior, fail_asr_above=0.5),
                     calibration=sm.CalibrationOptions(prompts=str(tiny_calibration_prompts), rank=4,
                                                       max_new_tokens=4, device="cpu"))
    out.mkdir()
    (out / "audit.json").write_text(json.dumps(audit))
    sm.repair(tiny_model_dir, str(adapter), out / "repaired",
              sm.RepairOptions(method="shrink", task_prompts="generic-tasks", heldout=2, behavior=behavior,
                               task_check=str(check)),
              method_options={"gamma": 0.5})
    summarize = runpy.run_path(str(ROOT / "examples" / "demo_summary.py"))
    summarize["main"](out)
    repair = json.loads((out / "repaired" / REPORT_NAME).read_text())
    text = summarize["summary"](audit, repair, out)
    b = repair["behavior"]
    lines = text.splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines
            if line.startswith("| ") and not line.startswith("| model")}
    assert set(rows) == {"aligned base", "+ the eroding adapter", "+ the adapter realigned by projection (audit)",
                         "+ the repaired adapter"}
    for label, variant in (("aligned base", "base"), ("+ the eroding adapter", "adapter"),
                           ("+ the repaired adapter", "repaired")):
        assert rows[label][0].startswith(f"{b[variant]['harmful_refusal_rate']:.0%} [")
        assert rows[label][3] == f"{repair['task_check'][variant]:.0%}"
    realigned = audit["adapters"][0]["behavior"]["realigned"]
    assert rows["+ the adapter realigned by projection (audit)"][0].startswith(
        f"{realigned['harmful_refusal_rate']:.0%} [")
    assert any(line.startswith("Verdict: ") for line in lines)
    assert any(line.startswith(f"Audit: {audit['adapters'][0]['status']}") for line in lines)
    assert str(out / "merged") in text and "salora-merge push" in text
    assert (out / "audit.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_make_demo_runs_audit_repair_merge_on_the_shipped_aligned_model_and_adapter():
    makefile = (ROOT / "Makefile").read_text()
    demo = makefile[makefile.index("\ndemo:"):].split("\n\n")[0]
    steps = [line.split()[1] for line in demo.splitlines() if line.strip().startswith("$(SM)")]
    assert steps == ["audit", "repair", "merge"] and "examples/demo_summary.py" in demo
    adapter = ROOT / "examples" / "adapters" / "smollm2-aligned-arithmetic-lora"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "README.md").is_file()
    pairs = [json.loads(line) for line in (adapter / "heldout.jsonl").read_text().splitlines()]
    assert len(pairs) == 60 and all(int(p["answer"]) == sum(map(int, p["prompt"].split("?")[0].split()[2::2]))
                                    for p in pairs)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "smollm2-135m-aligned"
