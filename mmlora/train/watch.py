"""Degenerate training, warned about once each: a loss stuck at ln(vocabulary) and all-zero gradients.

NaN/inf losses stop the run (the loop raises); these two only warn, because a run can recover from
them, but each usually means a mistake the user wants to hear about early.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

#: A token loss within STUCK_TOLERANCE (relative) of ln(vocabulary size) for STUCK_STEPS optimizer
#: steps in a row: the model predicts uniformly.
STUCK_STEPS = 20
STUCK_TOLERANCE = 0.02
#: Distributed engines whose gradients are sharded: only clipping's total norm can tell zero from not.
SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def vocab_size(model: nn.Module, processor: Any) -> int | None:
    """The language model's vocabulary: its config's ``vocab_size``, else the tokenizer's length."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    size = getattr(get_text() if callable(get_text) else config, "vocab_size", None)
    if not size and processor is not None:
        size = len(getattr(processor, "tokenizer", processor))
    return int(size) if size else None


class TrainingWatch:
    """``vocab``: the vocabulary size for token losses (None: no stuck-loss check); ``is_main``: only the
    main process warns; ``sharded``: gradients are sharded (FSDP, DeepSpeed)."""

    def __init__(self, vocab: int | None, is_main: bool, sharded: bool = False):
        self.vocab_size, self.is_main, self.sharded = vocab, is_main, sharded
        self.uniform_loss = math.log(vocab) if vocab and vocab > 1 else None
        self.stuck_steps, self.stuck = STUCK_STEPS, 0
        self.warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            if self.is_main:
                warnings.warn(message, stacklevel=4)

    def loss(self, loss: float) -> None:
        """Warn once when a token loss stays at ln(V), the loss of a uniform prediction."""
        if self.uniform_loss is None or "stuck" in self.warned:
            return
        near = abs(loss - self.uniform_loss) <= STUCK_TOLERANCE * self.uniform_loss
        self.stuck = self.stuck + 1 if near else 0
        if self.stuck >= self.stuck_steps:
            self._warn_once("stuck", f"loss stuck at ln(V) = {self.uniform_loss:.3f} (V = {self.vocab_size} tokens) for "
                                     f"{self.stuck} steps: the model predicts uniformly — check the learning rate, the "
                                     "labels (are answers supervised?), or whether everything is frozen")

    def gradients(self, model: nn.Module, step: int, norm: torch.Tensor | float | None) -> None:
        """Warn once when every trainable gradient of a step is exactly zero (or missing). ``norm``:
        the total norm clipping computed, when it did."""
        if "zero_grad" in self.warned:
            return
        if norm is None:
            if self.sharded:
                return  # sharded gradients: only the clipping's total norm would say
            grads = [p.grad.detach() for p in model.parameters() if p.requires_grad and p.grad is not None]
            zero = not grads or not bool(torch.stack([g.abs().amax() for g in grads]).amax() > 0)
        else:
            zero = float(norm) == 0.0
        if zero:
            self._warn_once("zero_grad", f"step {step}: every trainable gradient is exactly zero, so nothing "
                                         "learns. Likely causes: the loss does not depend on the trained parameters (a loss "
                                         "scaled by 0, outputs detached or computed under torch.no_grad, no supervised "
                                         "answer token), or adapters whose factors both start at zero")
