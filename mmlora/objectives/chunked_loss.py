"""Cross-entropy through the LM head in chunks: the ``[tokens, vocabulary]`` logits are never whole.

The plain path (:func:`mmlora.objectives.core.supervised_loss_sum`) materialises the logits at the
supervised positions, their fp32 copy and the log-softmax saved for backward, and in backward a
gradient of the same size: with a 150k vocabulary these are most of a step's memory. Here the head
and the loss run ``chunk_size`` rows at a time, and each chunk's gradient (with respect to the
hidden states, and the head's weight and bias when they train) is computed right there in the
forward pass — it is ``softmax - one_hot`` times the head, and a scalar loss's backward only
scales it — so nothing of vocabulary size outlives its chunk and nothing is recomputed.

Liger-Kernel's and Apple's Cut-Cross-Entropy fused kernels do the same on GPUs (Triton); they do not
run on CPUs and are not dependencies, hence this small torch version.

The hidden states come from the model's own forward with its head swapped for an identity, so every
model computes them its own way. That is only right when the model's logits *are* ``head(hidden)``:
some models scale or soft-cap them afterwards. :func:`head_is_last` checks it once per model, by
making the head return a known tensor and seeing whether the model hands it back unchanged;
otherwise the plain path is used.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmlora.data.processing import IGNORE


def _chunked(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             chunk_size: int, want: tuple[bool, bool, bool]):
    """The summed loss and, for the inputs ``want`` names (hidden, weight, bias), its gradients."""
    grad_hidden = torch.zeros_like(hidden) if want[0] else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want[1] else None
    grad_bias = torch.zeros_like(bias, dtype=torch.float32) if want[2] else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):  # cast the head once, not once per chunk (autocast would)
        dtype = torch.get_autocast_dtype(kind)
        weight, bias = weight.to(dtype), bias.to(dtype) if bias is not None else None
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        logits = F.linear(h, weight, bias)  # [c, V]; under autocast the same low-precision matmul as the head's
        full = logits.float()
        lse = full.logsumexp(dim=-1)
        valid = t != IGNORE
        safe = torch.where(valid, t, 0)
        total += ((lse - full.gather(1, safe[:, None]).squeeze(1)) * valid).sum()
        if not any(want):
            continue
        # d(CE)/d(logits) = softmax - one_hot (zero on ignored rows), in place of the logits (not needed any more)
        g = full.sub_(lse[:, None]).exp_()
        g[torch.arange(len(t), device=g.device), safe] -= 1.0
        g = (g * valid[:, None]).to(logits.dtype)
        del logits, full
        if grad_hidden is not None:
            grad_hidden[start:start + chunk_size] = g @ weight.to(g.dtype)
        if grad_weight is not None:
            grad_weight += (g.T @ h.to(g.dtype)).float()
        if grad_bias is not None:
            grad_bias += g.float().sum(0)
    return total, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropySum(torch.autograd.Function):
    """``sum_i CE(hidden_i @ weight.T + bias, target_i)`` over rows whose target is not ignored; the
    gradients are computed in forward and only scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        total, *grads = _chunked(hidden, weight, bias, targets, chunk_size, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_out).to(w_dtype) if grad_weight is not None else None,
                (grad_bias * grad_out).to(b_dtype) if grad_bias is not None else None,
                None, None)


#: Default chunk: as many rows as keep one chunk's fp32 logits near 32 MiB (55 rows at a 150k vocabulary).
CHUNK_BYTES = 32 * 2**20


def auto_chunk_size(vocab: int) -> int:
    return max(16, min(8192, CHUNK_BYTES // (4 * vocab)))


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [N, H] @ weight[V, H].T (+ bias [V])`` against ``targets [N]``
    (``-100`` = ignored), ``chunk_size`` rows at a time (default :func:`auto_chunk_size`); value and
    gradients equal the plain computation's."""
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return _LinearCrossEntropySum.apply(hidden, weight, bias, targets, chunk_size)
    return _chunked(hidden, weight, bias, targets, chunk_size, (False, False, False))[0]  # e.g. validation


# ---------------------------------------------------------------------- the model's head


def _owner(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str] | None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is module:
                return parent, name
    return None


@contextlib.contextmanager
def _swapped_head(model: nn.Module, replacement: nn.Module) -> Iterator[None]:
    head = model.get_output_embeddings()
    parent, name = _owner(model, head)
    setattr(parent, name, replacement)
    try:
        yield
    finally:
        setattr(parent, name, head)


class _Probe(nn.Module):
    """Returns a fixed ``[..., V]`` tensor of large values (+-50: soft-capping or scaling would change them)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.last: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        n = hidden.shape[:-1].numel() * self.vocab
        values = torch.linspace(-50.0, 50.0, n, device=hidden.device).reshape(*hidden.shape[:-1], self.vocab)
        self.last = values.to(hidden.dtype)
        return self.last


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when it is a plain (unwrapped, unsharded) linear layer, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not nn.Linear:  # a PEFT-wrapped, quantized or custom head: use the plain path
        return None
    if type(head.weight) is not nn.Parameter or getattr(head.weight, "ds_id", None) is not None:
        return None  # FSDP2 (DTensor) or DeepSpeed ZeRO-3 partitioned weights are not whole here
    return head


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_is_last(model: nn.Module, inputs: dict[str, torch.Tensor], positions: torch.Tensor) -> bool:
    """Whether ``model``'s logits are exactly its head's output (checked once per model, with a
    forward pass on ``inputs`` that keeps 4 positions, leaving the global RNG as it was)."""
    base = _base(model)
    if base in _VERIFIED:
        return _VERIFIED[base]
    head = plain_head(base)
    ok = False
    if head is not None:
        probe = _Probe(head.out_features)
        with torch.random.fork_rng(devices=[]), _swapped_head(base, probe):
            out = model(**inputs, logits_to_keep=positions[:4]).logits
        # a change of dtype is not post-processing (mixed precision may hand back fp32 logits)
        ok = probe.last is not None and out.shape == probe.last.shape and torch.equal(out.float(), probe.last.float())
    if not ok:
        warnings.warn(f"train.chunked_loss: {type(base).__name__}'s logits are not just its LM head's output "
                      "(scaled, soft-capped or a non-linear head); using the plain loss", stacklevel=2)
    _VERIFIED[base] = ok
    return ok


def _base(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / PEFT wrappers."""
    model = getattr(model, "module", model)  # DDP
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def chunked_supervised_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
                                ) -> tuple[torch.Tensor, int] | None:
    """Like :func:`mmlora.objectives.core.supervised_loss_sum`, with the head and the loss in chunks.
    Returns ``(sum, number of supervised tokens)``, or None when the model's head does not allow it."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    positions = (targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = _base(model)
    if not head_is_last(model, inputs, positions):
        return None
    head = base.get_output_embeddings()
    with _swapped_head(base, nn.Identity()):
        hidden = model(**inputs, logits_to_keep=positions).logits  # [B, P, H]: the head's input
    picked = targets[:, positions]
    supervised = picked != IGNORE
    loss = linear_cross_entropy_sum(hidden[supervised], head.weight, head.bias, picked[supervised], chunk_size)
    return loss, int(supervised.sum())
