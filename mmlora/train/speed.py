"""The trainer's speed and memory switches (``train.chunked_loss``, ``train.frozen_no_grad``,
``train.lean_dora``, ``train.packing``). Each gives the plain path's loss and gradients (tested against
it), can be switched off in the recipe, and is recorded in ``run_info.json``'s ``speedups``.

* **Chunked loss**: the LM head and cross-entropy in chunks (``mmlora.objectives.chunked_loss``).
* **Frozen towers without autograd**: with gradient checkpointing, transformers makes the input
  embeddings of *every* sub-model require grad (``enable_input_require_grads``), so a frozen vision
  tower is recorded by autograd, recomputed and back-propagated through — for nothing. A sub-model
  that reads raw inputs (the ``vision`` tower; CLIP's ``text`` tower) and holds nothing trainable runs
  under ``torch.no_grad`` instead. Sub-models fed by trainable ones (a frozen LM after a trained
  projector) must pass gradients on and are left alone.
* **Lean DoRA**: ``mmlora.adapters.lean_dora``.
* **Packing** (set up before placement, by :func:`packed_collator`): training micro-batches packed into
  rows (``mmlora.data.packing``), the language model on varlen attention (``mmlora.models.varlen``);
  validation stays padded.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from mmlora.adapters.lean_dora import use_lean_dora
from mmlora.config.schema import TrainSpec
from mmlora.data.packing import PackedCollator
from mmlora.errors import MmloraError
from mmlora.models.modality import ModalityMap, unwrap
from mmlora.models.varlen import enable as enable_varlen
from mmlora.models.varlen import packing_refusal, sample_positions

#: Modalities whose inputs are data (pixels, token ids), never another modality's output.
INPUT_MODALITIES = ("vision", "text")


def run_frozen_without_grad(model: nn.Module, mmap: ModalityMap) -> list[str]:
    """Run each input-reading sub-model with no trainable parameter under ``torch.no_grad``;
    returns the module names it applies to."""
    base = unwrap(model)
    done = []
    for name in INPUT_MODALITIES:
        modality = mmap.modalities.get(name)
        # a root may be a module or a parameter (open_clip's text tower: token_embedding, positional_embedding, ...)
        roots = {root: _get(base, root) for root in (modality.roots if modality else []) if root}
        params = [p for obj in roots.values() for p in (obj.parameters() if isinstance(obj, nn.Module) else [obj])]
        if not roots or any(p.requires_grad for p in params):
            continue
        for root, obj in roots.items():
            if isinstance(obj, nn.Module):
                obj.forward = torch.no_grad()(obj.forward)
                done.append(root)
    return done


def _get(base: nn.Module, name: str) -> nn.Module | torch.Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(base.get_submodule(owner) if owner else base, attr)


def apply_speedups(model: nn.Module, mmap: ModalityMap, train: TrainSpec, objective: Any) -> dict[str, Any]:
    """Apply the switches ``train`` turns on; returns what was applied (for ``run_info.json``)."""
    applied: dict[str, Any] = {}
    if train.chunked_loss.enabled and hasattr(objective, "use_chunked_loss"):
        objective.use_chunked_loss(train.chunked_loss.chunk_size)
        applied["chunked_loss"] = train.chunked_loss.chunk_size or "auto"
    if train.frozen_no_grad:
        applied["no_grad_modules"] = run_frozen_without_grad(model, mmap)
    if train.lean_dora:
        applied["lean_dora_layers"] = use_lean_dora(model)
    return applied


def packed_collator(model: nn.Module, train: TrainSpec, max_length: int, objective: Any, device_type: str,
                    warn: bool = True) -> tuple[PackedCollator, dict[str, Any]]:
    """The collator of ``train.packing`` for ``model`` (before placement), which it puts on varlen
    attention, and what to record of it (row length, attention); refused, in one line, for objectives
    without token sequences, families that cannot pack exactly, and rows shorter than a sample may be.
    ``warn``: warn about a token budget above the row length (the main process)."""
    if objective.unit != "token":
        raise MmloraError(f"train.packing: {objective.unit}-level objectives have no sequences to pack; "
                          "set train.packing.enabled=false")
    model_type = getattr(model.config, "model_type", "?")
    if (why := packing_refusal(model_type)) is not None:
        raise MmloraError(f"train.packing: {model_type} cannot pack exactly: {why}; set train.packing.enabled=false")
    max_tokens = train.packing.max_tokens or max_length
    if max_tokens < max_length:
        raise MmloraError(f"train.packing.max_tokens={max_tokens} is below data.max_length={max_length}: a sample "
                          "could not fit a row (samples are never split); raise max_tokens or lower max_length")
    if warn and train.batch_tokens and train.batch_tokens > max_tokens:
        warnings.warn(f"train.batch_tokens={train.batch_tokens} is above the packed rows' {max_tokens} tokens: a "
                      "micro-batch spans several rows, each padded to the fullest (`mmlora data check RECIPE` shows "
                      "how much); for bigger batches keep batch_tokens <= max_tokens and raise train.grad_accum",
                      stacklevel=2)
    attention = enable_varlen(model, device_type)
    collator = PackedCollator(objective.collate.pad_token_id, max_tokens, positions=sample_positions(model))
    return collator, {"max_tokens": max_tokens, "attention": attention}
