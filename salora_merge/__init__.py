"""salora-merge: keep LoRA-fine-tuned LLMs safe.

The public API (``docs/api.md``) is imported on first use, so that ``import salora_merge`` and the CLI's
``--help`` stay fast (torch and transformers load only when a function runs)::

    from salora_merge import open_base, calibrate, realign, repair, merge, audit, train, retrain, push, run
"""

from salora_merge.version import __version__

_API = (
    "open_base", "calibrate", "realign", "repair", "merge", "audit", "train", "retrain", "push", "run",
    "BaseModel", "CalibrationOptions", "Calibration", "MergeOptions", "AdapterInput", "MergeReport",
    "AuditOptions", "BehaviorOptions", "TrainOptions", "TrainReport", "RetrainOptions", "RetrainReport",
    "RunControl", "PushResult", "MethodReport", "RepairOptions", "RepairReport", "METHODS", "tqdm_progress",
)
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from salora_merge import api

        return getattr(api, name)
    raise AttributeError(f"module 'salora_merge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
