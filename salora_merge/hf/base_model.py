"""The base-model handle: one resolved reference per command, with what every feature asks of it.

A command resolves ``--base`` once (:func:`salora_merge.hf.resolve.resolve_model`) and passes this
handle down. The checkpoint index (headers of every shard), the fingerprint and the tied-embedding
facts are computed on first use and kept; the tokenizer is loaded once; the model is loaded on
request (a fresh copy each time, since training rewrites its target weights in place).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from salora_merge.io.checkpoint import CheckpointIndex

__all__ = ["BaseModel"]


@dataclass(frozen=True, eq=False)
class BaseModel:
    ref: str  # what the user wrote
    folder: Path
    model_id: str  # for metadata and cards
    revision: str | None = None
    license: str | None = None  # known for aliases; read from the folder's card otherwise

    @cached_property
    def checkpoint(self) -> "CheckpointIndex":
        """The safetensors index of the folder, opened once."""
        from salora_merge.io.checkpoint import open_checkpoint

        return open_checkpoint(self.folder)

    @cached_property
    def fingerprint(self) -> str:
        return self.checkpoint.fingerprint()

    @cached_property
    def tied_embeddings(self) -> tuple[str, str] | None:
        """``(input, output)`` embedding weight names when the config ties them (architecture built on meta)."""
        from salora_merge.hf.layers import tied_embedding_weights

        return tied_embedding_weights(self.folder)

    @cached_property
    def module_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Module name -> stored weight shape for every 2-D weight, with a tied output layer (stored only as the
        input embedding it shares) given the embedding's shape: an adapter on ``lm_head`` fits a tied model."""
        shapes = dict(self.checkpoint.linear_weight_shapes())
        if self.tied_embeddings:
            inp, out = self.tied_embeddings
            if out not in self.checkpoint.files and inp in self.checkpoint.files:
                shapes[out[: -len(".weight")]] = self.checkpoint.shapes[inp]
        return shapes

    def bind(self, adapter):
        """The adapter with its LoRA on raw parameters (``target_parameters``) bound to this model's parameters;
        unchanged when it has none."""
        from salora_merge.hf.layers import parameter_layouts
        from salora_merge.io.adapter import bind_parameters

        if not adapter.unbound and not adapter.spec.target_parameters:
            return adapter
        layouts, transforms = parameter_layouts(self.folder, adapter.spec.targets_parameter)
        object.__setattr__(self, "_conversions", transforms)
        return bind_parameters(adapter, layouts)

    @property
    def conversions(self) -> list:
        """The model's checkpoint conversion mapping, known once an adapter on raw parameters was bound."""
        return getattr(self, "_conversions", [])

    @cached_property
    def tokenizer(self):
        from salora_merge.hf.loading import load_tokenizer

        return load_tokenizer(self.folder)

    def use_chat_template(self, choice: str | None) -> str:
        """Render every later prompt through ``choice`` (``--chat-template``: a name, a Jinja file, ``none``; None
        keeps the model's own): the tokenizer this handle gives from now on carries it, so anchors, discovery,
        distillation and evaluation all see the same template. Returns the template's label."""
        from salora_merge.hf.chat_templates import apply_chat_template_choice

        tokenizer, label = apply_chat_template_choice(self.tokenizer, choice)
        self.__dict__["tokenizer"] = tokenizer  # the cached_property's own slot
        return label

    def load_model(self, device: "torch.device", placement=None):
        """A fresh copy of the model on ``device`` (callers may rewrite its weights), or spread and offloaded by
        accelerate under an active ``placement`` (:class:`salora_merge.hf.placement.Placement`)."""
        from salora_merge.hf.loading import load_causal_lm

        self.checkpoint  # every shard's header checked against its file first: a damaged file is a one-line error
        return load_causal_lm(self.folder, device, placement)
