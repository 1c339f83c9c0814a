"""salora-merge: keep LoRA-fine-tuned LLMs safe with SaLoRA safety modules."""

__version__ = "0.1.0"
