"""The public Python API end to end: calibrate once, realign an adapter, audit both, merge the realigned one.

    python examples/api_example.py smollm2-135m-instruct examples/adapters/smollm2-benign-lora out/api-example

docs/api.md shows this file; tests/test_api.py runs it on a tiny model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import salora_merge as sm


def realign_audit_merge(base_ref: str, adapter: str, out: Path,
                        calibration: sm.CalibrationOptions = sm.CalibrationOptions(max_prompts=64)) -> dict:
    out = Path(out)
    base = sm.open_base(base_ref)  # resolved once; every call below reuses the handle
    safety_file = out / "safety.safetensors"
    sm.calibrate(base, calibration, output=safety_file, overwrite=True)
    realigned = sm.realign(base, adapter, out / "realigned", safety=safety_file, overwrite=True)
    shrunk = sm.realign(base, adapter, out / "shrunk", method="shrink", method_options={"gamma": 0.5},
                        overwrite=True)  # the control every method is compared with
    audit = sm.audit(base, [adapter, str(out / "realigned")], sm.AuditOptions(fail_above=0.5), safety=safety_file)
    merged = sm.merge(base, [str(out / "realigned")], out / "merged", overwrite=True)
    return {
        "energy_removed": realigned.total_energy_removed,
        "shrink_energy_kept": shrunk.gamma ** 2,
        "audit_rho": [entry["weight_space"]["rho"] for entry in audit["adapters"]],
        "merged_tensors_changed": merged.changed_tensors,
    }


if __name__ == "__main__":
    print(realign_audit_merge(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
