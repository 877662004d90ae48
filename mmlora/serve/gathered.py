"""Gathered multi-adapter LoRA (S-LoRA's batched LoRA on CPU/GPU with plain torch): a batch whose rows
use different adapters costs one base matmul plus two batched matmuls per adapted layer, whatever the
number of different adapters in it.

PEFT loads and holds the adapters (``PeftModel.load_adapter``: configs, rank and alpha patterns,
rsLoRA, DoRA magnitudes — nothing re-implemented). This module stacks, per adapted ``nn.Linear``, every
loaded adapter's ``A`` (``[N+1, r_max, in]``) and ``s·B`` (``[N+1, out, r_max]``), ranks zero-padded to
the largest (exact: the padded rows and columns contribute 0), slot 0 all zeros (the base itself).
While :meth:`LoraPool.route` is active, PEFT's adapters are disabled in each stacked layer (it returns
its base output) and a forward hook adds, for each row ``b`` of the batch with slot ``i = index[b]``,
``(x_b A_iᵀ)(s_i B_i)ᵀ`` by two ``torch.bmm`` on the gathered ``A[index]``, ``B[index]``. PEFT's
own mixed batches (``adapter_names``) loop over the distinct adapters of the batch in every layer
instead, so their cost grows with how many the batch holds.

DoRA at inference is the LoRA output rescaled per output feature by a constant of the adapter:
``y = bias + g ⊙ (W x + s B A x)`` with ``g = m / ‖W + s B A‖`` (row norms; PEFT's DoRA forward, with
its ``get_weight_norm``). ``g`` is computed once when an adapter is stacked and gathered per row like
``A`` and ``B`` (1 for LoRA adapters and the base).

Rows are samples: every adapted layer must see the batch as its first dimension (one image per
sample for a vision tower, as PEFT's mixed batches also require; the engine checks it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mmlora.runs.compose import BASE


def _lora_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora.layer import Linear as LoraLinear

    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLinear)]


class _LayerPool:
    """One adapted linear layer's stacks; ``index`` (``[B]`` slots) is set while routing."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.parts: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.A = self.B = self.g = None
        self.index: torch.Tensor | None = None
        # per route: the batch's gathered A, s·B, g (once, not at every decoding step); 2-D when the
        # whole batch has one slot (then plain matmuls)
        self.gA = self.gB = self.gg = None

    def part(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``(A [r, in], s·B [out, r], g [out] or None)`` of adapter ``name`` here (None: not adapted)."""
        m = self.module
        if name not in m.lora_A:
            return None
        if name not in self.parts:
            with torch.no_grad():
                a = m.lora_A[name].weight.detach().float()
                scaling = m.scaling[name]
                b = m.lora_B[name].weight.detach().float()
                g = None
                if m.use_dora.get(name, False):
                    dora = m.lora_magnitude_vector[name]
                    weight = m.get_base_layer().weight.detach().float()
                    norm = dora.get_weight_norm(weight, b @ a, scaling)
                    g = dora.weight.detach().float() / norm
                self.parts[name] = (a, b * scaling, g)
        return self.parts[name]

    def stack(self, names: Sequence[str]) -> None:
        base = self.module.get_base_layer()
        out_f, in_f = base.out_features, base.in_features
        parts = [self.part(n) for n in names]
        r = max([p[0].shape[0] for p in parts if p is not None], default=1)
        A = torch.zeros(len(names) + 1, r, in_f)
        B = torch.zeros(len(names) + 1, out_f, r)
        g = torch.ones(len(names) + 1, out_f) if any(p is not None and p[2] is not None for p in parts) else None
        for i, p in enumerate(parts, start=1):
            if p is None:
                continue
            a, b, scale = p
            A[i, : a.shape[0]] = a
            B[i, :, : b.shape[1]] = b
            if scale is not None:
                g[i] = scale
        dtype, device = base.weight.dtype, base.weight.device
        self.A, self.B = A.to(device, dtype), B.to(device, dtype)
        self.g = None if g is None else g.to(device, dtype)

    def drop(self, name: str) -> None:
        self.parts.pop(name, None)

    def gather(self, index: torch.Tensor | None, single: int | None) -> None:
        """Select the batch's adapters: ``index`` (``[B]`` slots), or ``single`` (one slot for every row)."""
        self.index = index
        if index is None:
            self.gA = self.gB = self.gg = None
        elif single is not None:
            self.gA, self.gB = self.A[single], self.B[single]
            self.gg = None if self.g is None else self.g[single]
        else:
            index = index.to(self.A.device)
            self.gA, self.gB = self.A[index].transpose(1, 2), self.B[index].transpose(1, 2)
            self.gg = None if self.g is None else self.g[index]

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return output
        x = args[0]
        rows = x.shape[0]
        if rows != self.index.shape[0]:
            raise RuntimeError(f"a gathered LoRA layer got {rows} rows for {self.index.shape[0]} samples")
        if self.gA.dim() == 2:  # one adapter for the whole batch
            delta = (x.to(self.gA.dtype) @ self.gA.T) @ self.gB.T
        else:
            flat = x.reshape(rows, -1, x.shape[-1]).to(self.gA.dtype)
            delta = torch.bmm(torch.bmm(flat, self.gA), self.gB)
        delta = delta.reshape(output.shape).to(output.dtype)
        if self.gg is None:
            return output + delta
        gg = self.gg if self.gg.dim() == 2 else self.gg[None]
        scale = gg.reshape(gg.shape[0], *([1] * (output.dim() - 2)), -1).to(output.dtype)
        bias = module.get_base_layer().bias
        if bias is None:
            return scale * (output + delta)
        return bias + scale * (output - bias + delta)


class LoraPool:
    """The stacked adapters of a :class:`peft.PeftModel` (see the module docstring)."""

    def __init__(self):
        self.names: list[str] = []
        self.layers: dict[str, _LayerPool] = {}
        self._model: nn.Module | None = None

    def sync(self, model: nn.Module, names: Sequence[str]) -> None:
        """Stack ``names`` (the adapters loaded in ``model``, in slot order) in every adapted layer."""
        found = dict(_lora_linears(model))
        if model is not self._model:
            self.layers, self._model = {}, model
        for key in list(self.layers):
            if key not in found:
                del self.layers[key]
        for key, module in found.items():
            if key not in self.layers:
                self.layers[key] = _LayerPool(module)
        gone = set(self.names) - set(names)
        for layer in self.layers.values():
            for name in gone:
                layer.drop(name)
            layer.stack(names)
        self.names = list(names)

    def forget(self, name: str) -> None:
        """Drop ``name``'s cached parts (it was evicted; a later load may bring other weights)."""
        for layer in self.layers.values():
            layer.drop(name)

    def slots(self, adapters: Sequence[str]) -> torch.Tensor:
        """Slot per sample (0 for ``__base__``)."""
        where = {n: i for i, n in enumerate(self.names, start=1)}
        missing = sorted({a for a in adapters if a != BASE and a not in where})
        if missing:
            raise KeyError(f"adapters {missing} are not stacked (loaded: {self.names})")
        return torch.tensor([0 if a == BASE else where[a] for a in adapters], dtype=torch.long)

    @contextmanager
    def route(self, model: nn.Module, adapters: Sequence[str]) -> Iterator[None]:
        """Within: ``model`` (the PeftModel) runs row ``b`` with ``adapters[b]``'s LoRA (gathered)."""
        index = self.slots(adapters)
        single = int(index[0]) if len(set(index.tolist())) == 1 else None
        handles, before = [], {}
        try:
            for key, layer in self.layers.items():
                layer.gather(index, single)
                handles.append(layer.module.register_forward_hook(layer.hook))
                # PEFT's per-layer "adapters disabled" flag (what ``disable_adapter_layers`` sets on each
                # layer): each layer then returns its base output. Not ``PeftModel.disable_adapter()``:
                # that builds a model status report and resets ``requires_grad`` of every adapter's
                # weights on entry and exit, a cost that grows with the adapters loaded (3x the batch's
                # generation time at 64 adapters on tiny-llava).
                before[key] = layer.module._disable_adapters
                layer.module._disable_adapters = True
            yield
        finally:
            for h in handles:
                h.remove()
            for key, layer in self.layers.items():
                layer.gather(None, None)
                if key in before:
                    layer.module._disable_adapters = before[key]

    def nbytes(self) -> int:
        """Bytes of the stacks (the pool's memory beyond PEFT's own copies of the adapters)."""
        return sum(t.numel() * t.element_size() for layer in self.layers.values()
                   for t in (layer.A, layer.B, layer.g) if t is not None)
