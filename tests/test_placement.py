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

    from salora_merge.hf.models import Placement, load_causal_lm

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


def test_commands_that_cannot_place_a_model_do_not_offer_the_options():
    """train and retrain load the model onto one device: they must not accept --device-map and ignore it."""
    for command in ("train", "retrain"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "--device-map" not in result.output, command
    assert "--device-map" in CliRunner().invoke(main, ["calibrate", "--help"]).output
