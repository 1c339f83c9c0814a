"""``input-side``: make the update vanish on the calibration inputs, ``A' = A - (A V) V^T``.

The same projection as ``salora`` with an input-side safety module (``calibrate --side input``); without
``--safety`` the runner calibrates one on the input side.
"""

from __future__ import annotations

from salora_merge.methods.base import Method
from salora_merge.methods.salora import project

METHOD = Method(
    name="input-side",
    summary="Project lora_A off the input-side safety subspace: the update vanishes on the calibration inputs.",
    needs=("safety",),
    apply=project,
    safety_side="input",
)
