"""The command line: help everywhere, one-line errors with a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import make_peft_adapter
from salora_merge.cli import main


def _run(args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_every_command_has_help():
    for name, command in main.commands.items():
        assert command.help and len(command.help) > 20, name
        result = _run([name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "salora_merge.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and "salora-merge" in done.stdout


@pytest.fixture(scope="module")
def cli_safety(tiny_model_dir, tiny_calibration_prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "s.safetensors"
    result = _run(["calibrate", "--base", tiny_model_dir, "--prompts", tiny_calibration_prompts, "--rank", 4,
                   "--max-new-tokens", 5, "--device", "cpu", "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads(result.output[result.output.index("{"):])
    assert meta["rank"] == 4 and meta["n_prompts"] == 12 and meta["output"] == str(out)
    return out


def test_realign_cli_prints_summary(cli_safety, tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    result = _run(["realign", "--base", tiny_model_dir, "--adapter", adapter, "--safety", cli_safety,
                   "-o", tmp_path / "o"])
    assert result.exit_code == 0, result.output
    assert "Realigned 4 modules" in result.output and "Energy of the whole update removed" in result.output
    assert str(tmp_path / "o") in result.output
    # The summary and the card say what the safety study measured instead of promising safety.
    assert "not a measured safety guarantee" in result.output and "audit --behavior" in result.output
    from salora_merge.realignment.report import REALIGN_CAVEAT

    assert REALIGN_CAVEAT in (tmp_path / "o" / "README.md").read_text()


def test_adapter_for_another_model(cli_safety, tiny_model_dir, wider_model_dir, tmp_path):
    adapter = make_peft_adapter(wider_model_dir, tmp_path / "a")
    result = _run(["realign", "--base", tiny_model_dir, "--adapter", adapter, "--safety", cli_safety, "-o", tmp_path / "o"])
    _assert_one_line_error(result, "model.layers.0.self_attn.q_proj.lora_A.weight", "(4, 48)", "(32, 32)")
    assert not (tmp_path / "o").exists()


def test_safety_module_for_another_model(cli_safety, other_model_dir, tmp_path):
    adapter = make_peft_adapter(other_model_dir, tmp_path / "a")
    result = _run(["realign", "--base", other_model_dir, "--adapter", adapter, "--safety", cli_safety, "-o", tmp_path / "o"])
    _assert_one_line_error(result, str(cli_safety), "recompute")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["missing_adapter", "missing_safety", "corrupt_safety", "existing_output",
                                  "empty_prompts", "bad_rank", "unknown_target", "missing_base", "no_safetensors"])
def test_bad_input_is_one_line(case, cli_safety, tiny_model_dir, tmp_path):
    adapter = make_peft_adapter(tiny_model_dir, tmp_path / "a")
    out = tmp_path / "o"
    args = ["realign", "--base", tiny_model_dir, "--adapter", adapter, "--safety", cli_safety, "-o", out]
    expect = []
    if case == "missing_adapter":
        args[4] = tmp_path / "nope"
        expect = ["nope"]
    elif case == "missing_safety":
        args[6] = tmp_path / "nope.safetensors"
        expect = ["safety module file not found"]
    elif case == "corrupt_safety":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"12345678garbage")
        args[6] = bad
        expect = ["bad.safetensors"]
    elif case == "existing_output":
        out.mkdir()
        expect = ["already exists", "--overwrite"]
    elif case == "empty_prompts":
        empty = tmp_path / "empty.txt"
        empty.write_text("\n\n")
        args = ["calibrate", "--base", tiny_model_dir, "--prompts", empty, "-o", tmp_path / "s.safetensors"]
        expect = ["holds no prompts"]
    elif case == "bad_rank":
        args = ["calibrate", "--base", tiny_model_dir, "--rank", 0, "-o", tmp_path / "s.safetensors"]
        expect = ["--rank"]
    elif case == "unknown_target":
        args = ["calibrate", "--base", tiny_model_dir, "--targets", "qq_proj", "--max-prompts", 2,
                "--max-new-tokens", 2, "-o", tmp_path / "s.safetensors"]
        expect = ["qq_proj", "q_proj"]
    elif case == "missing_base":
        args[2] = "not-a-model"
        expect = ["not-a-model", "smollm2-135m-instruct"]
    elif case == "no_safetensors":
        (tmp_path / "empty_model").mkdir()
        args[2] = tmp_path / "empty_model"
        expect = ["model.safetensors"]
    result = _run(args)
    _assert_one_line_error(result, *expect)
    assert not out.exists() or case == "existing_output"
    assert not (tmp_path / "s.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_an_unexpected_exception_is_one_line_and_exit_2_with_the_traceback_under_debug(tiny_model_dir, tmp_path,
                                                                                        monkeypatch):
    """The last-resort guard: an exception no check anticipated reaches the user as one line naming the command,
    exit code 2; ``salora-merge --debug`` lets the traceback through."""
    import salora_merge.api as api

    def broken(*args, **kwargs):
        raise RuntimeError("shape bookkeeping went wrong\nsecond line of detail")

    monkeypatch.setattr(api, "merge", broken)
    args = ["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path), "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == ["Error: internal error in merge: RuntimeError: shape bookkeeping went wrong; re-run with "
                     "salora-merge --debug for the traceback, and please report it"]
    debug = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(debug.exception, RuntimeError) and "Traceback" not in debug.output
