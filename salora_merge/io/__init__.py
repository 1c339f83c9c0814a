"""File formats: PEFT adapter folders, safetensors checkpoints, safety-module files, atomic outputs."""
