"""The training engine: transformers' Trainer, with checkpoints that hold only the SaLoRA state.

This module is the only one that imports ``transformers.Trainer``. Multi-GPU and sharded training
come from the Trainer's accelerate integration (launch with ``torchrun`` or ``accelerate launch``).
A checkpoint folder holds ``salora_state.safetensors`` (``A, B, A0, B0`` per layer, a few MB) plus the
Trainer's own optimizer, scheduler, RNG and state files, so ``--resume`` continues where the run stopped
(with the same weights, optimizer state, learning rate and data order; later steps match an uninterrupted
run up to floating-point round-off).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from salora_merge.errors import InputError
from salora_merge.training.data import TokenizedExample, pad_batch
from salora_merge.training.layer import salora_layers, state_tensors

__all__ = ["FitOptions", "FitResult", "fit", "last_checkpoint", "read_state", "STATE_NAME"]

STATE_NAME = "salora_state.safetensors"


@dataclass(frozen=True)
class FitOptions:
    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 2
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    seed: int = 0
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10
    device: str = "cpu"  # the resolved device type: cpu or cuda
    show_progress: bool = True
    sequential: bool = False  # read the examples in the order given (a mixture with exact per-batch shares)


@dataclass(frozen=True)
class FitResult:
    global_step: int
    losses: tuple[tuple[int, float], ...]  # (step, mean training loss since the last log)
    train_loss: float
    seconds: float


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[TokenizedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> TokenizedExample:
        return self.examples[index]


class _Collator:
    """Right-pad a batch of examples (``training.data.pad_batch``)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.pad)


def read_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    path = Path(checkpoint) / STATE_NAME
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable SaLoRA checkpoint ({exc}); delete the folder or drop --resume") from None


def _load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    layers = salora_layers(model)
    expected = state_tensors(layers)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{source}: has no tensor {missing[0]}; it was written for other --targets")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise InputError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, expected "
                             f"{tuple(tensor.shape)}; it was written with another --rank")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(state[f"{name}.lora_A"])
            layer.lora_B.copy_(state[f"{name}.lora_B"])


def last_checkpoint(folder: Path) -> Path | None:
    """The newest ``checkpoint-N`` sub-folder holding a SaLoRA state, or None."""
    best = None
    if Path(folder).is_dir():
        for child in Path(folder).iterdir():
            if child.name.startswith("checkpoint-") and child.name[11:].isdigit() and (child / STATE_NAME).is_file():
                if best is None or int(child.name[11:]) > int(best.name[11:]):
                    best = child
    return best


def _trainer_class(loss: "Callable[[torch.nn.Module, dict], torch.Tensor] | None" = None, sequential: bool = False):
    from transformers import Trainer

    class SaloraTrainer(Trainer):
        """Saves and restores only the SaLoRA layers' state; everything else is the stock Trainer (and, with
        ``loss``, the training loss is ``loss(model, batch)`` instead of the model's own; with ``sequential`` the
        examples are read in the order given)."""

        # A ``loss`` is a mean over its micro-batch: the Trainer divides it by the accumulation steps.
        loss_is_scaled_for_ga = None if loss is None else False

        def _get_train_sampler(self, *args, **kwargs):
            if sequential:
                return torch.utils.data.SequentialSampler(self.train_dataset)
            return super()._get_train_sampler(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if loss is None:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            value = loss(model, inputs)
            return (value, None) if return_outputs else value

        def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            model = self.accelerator.unwrap_model(self.model)
            save_file(state_tensors(salora_layers(model)), os.path.join(output_dir, STATE_NAME),
                      metadata={"format": "pt"})
            Path(output_dir, "training_args.json").write_text(self.args.to_json_string())

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            _load_state_into(target, read_state(Path(resume_from_checkpoint)),
                             str(Path(resume_from_checkpoint) / STATE_NAME))

    return SaloraTrainer


def fit(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    pad: int,
    options: FitOptions,
    checkpoint_dir: Path,
    resume_from: Path | None = None,
    callbacks: Sequence[object] = (),
    echo: Callable[[str], None] | None = None,
    collate: Callable[[Sequence], dict] | None = None,
    loss: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> FitResult:
    """Train the SaLoRA layers' ``A`` and ``B`` on ``examples`` (labels already masked) with the Trainer.

    ``collate`` (items to a batch) and ``loss`` (model and batch to the loss) replace the padding collator and
    the model's own next-token loss, for objectives such as re-fitting with weighted anchors and distillation."""
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils import logging

    logging.set_verbosity_error()

    class _Echo(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if echo is not None and logs and "loss" in logs:
                echo(f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                     f"lr {logs.get('learning_rate', 0.0):.2e}")

    class _Steps(TrainerCallback):  # a caller's progress bar, one tick per optimizer step
        def on_step_end(self, args, state, control, **kwargs):
            if on_step is not None:
                on_step(1)

    class _BarOnly(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            return None

    cuda = options.device == "cuda"
    # transformers 5 folded warmup_ratio into a fractional warmup_steps; 4.x has both.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    warmup = ({"warmup_ratio": options.warmup_ratio} if "warmup_ratio" in fields
              else {"warmup_steps": options.warmup_ratio})
    # transformers 5.x renamed gradient_checkpointing to activation_checkpointing.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    if options.gradient_checkpointing:
        warmup[checkpointing] = True
        warmup[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    args = TrainingArguments(
        **warmup,
        output_dir=str(checkpoint_dir),
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        learning_rate=options.lr,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        lr_scheduler_type=options.scheduler,
        weight_decay=options.weight_decay,
        seed=options.seed,
        data_seed=options.seed,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        disable_tqdm=not options.show_progress,
        dataloader_num_workers=0,
    )
    trainer = _trainer_class(loss, options.sequential)(
        model=model,
        args=args,
        train_dataset=_Dataset(examples),
        data_collator=collate or _Collator(pad),
        callbacks=[_Echo(), _Steps(), *callbacks],
    )
    # Loss lines go through ``echo`` (stderr in the CLI); the stock printers would also write every log
    # dict, to stdout, where a --json report must be the only output.
    trainer.remove_callback(PrinterCallback)
    if options.show_progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_BarOnly())
    start = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - start
    losses = tuple((int(entry["step"]), float(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    return FitResult(global_step=int(trainer.state.global_step), losses=losses,
                     train_loss=float(output.training_loss), seconds=seconds)
