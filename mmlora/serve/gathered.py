"""Gathered multi-adapter LoRA (S-LoRA's batched LoRA, in plain torch): a batch whose rows use
different adapters costs one base matmul plus two batched matmuls per adapted layer, whatever the
number of different adapters in it, and loading one more adapter costs the same with 1 or 1,000 loaded.

**Page-in.** :func:`mmlora.adapters.parts.read_adapter` reads a PEFT LoRA folder (``adapter_config.json`` through PEFT's
``LoraConfig``, ``adapter_model.safetensors``) straight into per-layer parts ``(A, s·B, g)``, the
scaling ``s`` as PEFT computes it (``lora_alpha / r``, ``/ √r`` with rsLoRA, ``alpha_pattern`` matched
by PEFT's ``get_pattern_key``). Why not ``PeftModel.load_adapter``: each PEFT adapter adds modules to
every adapted layer, and loading the next one walks all of them, so the k-th load costs O(k) (0.5 s
at 128 adapters on tiny-llava, and growing) — a server with thousands of adapters cannot page them in
that way. What the reader does not handle (``modules_to_save``, bias training, QA-LoRA, trainable
tokens, non-``nn.Linear`` targets) is refused in one line.

**Stacks.** Per adapted ``nn.Linear`` of the base, :class:`LayerStack` holds every loaded adapter's
``A`` (``[C, r_max, in]``) and ``s·B`` (``[C, out, r_max]``) in slots (capacity ``C`` doubling as
adapters arrive, ranks zero-padded to the largest — exact: the padded rows and columns contribute 0;
slot 0 all zeros: the base). A freed slot is zeroed and reused.

**Routing.** While :meth:`LoraPool.route` is active, each stacked base layer (its ``forward`` taken over
by its :class:`LayerStack`, a cheaper path than a forward hook) adds,
for each row ``b`` of the batch with slot ``i = index[b]``, ``(x_b A_iᵀ)(s_i B_i)ᵀ`` by two
``torch.bmm`` on ``A[index]``, ``B[index]`` (gathered once per batch composition: consecutive decoding
steps of the same rows reuse them until an adapter is paged in or out; plain matmuls when the whole
batch has one adapter). PEFT's own mixed batches (``adapter_names``) loop
over the distinct adapters of the batch in every layer instead.

**DoRA** at inference is the LoRA output rescaled per output feature by a constant of the adapter:
``y = bias + g ⊙ (W x + s B A x)`` with ``g = m / ‖W + s B A‖`` (row norms, as PEFT's
``DoraLinearLayer.get_weight_norm``), computed once at page-in and gathered per row like ``A``, ``B``.

Rows are samples: every stacked layer must see the batch as its first dimension (one image per
sample for a vision tower, as PEFT's mixed batches also require; the engine checks it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from mmlora.adapters.parts import Parts
from mmlora.runs.compose import BASE

class LayerStack:
    """One base linear layer's adapters in slots (see the module docstring). While it exists, the layer's
    ``forward`` is the stack's: the base layer's own forward, plus the gathered LoRA term while the pool
    routes — an instance attribute rather than a forward hook, so a routed forward pays no hook
    registration and no hook dispatch per layer."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.device = module.weight.device  # stacks live beside the layer they add to (fp32)
        self.A = torch.zeros(1, 1, module.in_features, device=self.device)  # slot 0: the base
        self.B = torch.zeros(1, module.out_features, 1, device=self.device)
        self.g: torch.Tensor | None = None
        self.used: set[int] = set()  # slots holding an adapter of this layer
        self.index: torch.Tensor | None = None
        self.gA = self.gB = self.gg = None  # per route: the batch's gathered A, s·B, g (2-D: one adapter)
        self.active = False  # set while the pool routes
        self._base_forward = type(module).forward.__get__(module)
        module.forward = self.forward

    def release(self) -> None:
        """Give the layer its own forward back."""
        self.module.__dict__.pop("forward", None)

    def reserve(self, slots: int, rank: int = 1) -> None:
        """Room for ``slots`` slots (slot 0 included) of rank ``rank``: capacity doubles, rank pads."""
        cap, r = self.A.shape[0], self.A.shape[1]
        if slots <= cap and rank <= r:
            return
        new_cap = cap
        while new_cap < slots:
            new_cap *= 2
        new_r = max(r, rank)
        A = torch.zeros(new_cap, new_r, self.A.shape[2], device=self.device)
        B = torch.zeros(new_cap, self.B.shape[1], new_r, device=self.device)
        A[:cap, :r], B[:cap, :, :r] = self.A, self.B
        self.A, self.B = A, B
        if self.g is not None:
            self.g = torch.cat([self.g, torch.ones(new_cap - cap, self.g.shape[1], device=self.device)])

    def put(self, slot: int, parts: Parts | None) -> None:
        """Write ``parts`` (None: zeros) into ``slot``, growing the capacity or the rank as needed."""
        a, b, g = parts if parts is not None else (None, None, None)
        self.reserve(slot + 1, a.shape[0] if a is not None else 1)
        if g is not None and self.g is None:
            self.g = torch.ones(self.A.shape[0], self.B.shape[1], device=self.device)
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.used.discard(slot)
        if self.g is not None:
            self.g[slot] = 1.0
        if a is not None:
            self.A[slot, : a.shape[0]] = a.to(self.device)
            self.B[slot, :, : b.shape[1]] = b.to(self.device)
            self.used.add(slot)
            if g is not None:
                self.g[slot] = g.to(self.device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.g) if t is not None)

    def gather(self, index: torch.Tensor | None, single: int | None) -> None:
        """Select the batch's adapters: ``index`` (``[B]`` slots) or ``single`` (one slot, any rows); nothing
        where none of them adapts this layer."""
        self.index = index
        if single is not None:
            index = None
            if single not in self.used:
                single = None
        elif index is not None and not self.used.intersection(index.tolist()):
            index = None
        if index is None and single is None:
            self.gA = self.gB = self.gg = None
        elif single is not None:  # Aᵀ [in, r] and (s·B)ᵀ [r, out], ready for two plain matmuls
            self.gA, self.gB = self.A[single].T.contiguous(), self.B[single].T.contiguous()
            self.gg = None if self.g is None else self.g[single]
        else:
            self.gA, self.gB = self.A[index].transpose(1, 2), self.B[index].transpose(1, 2)
            self.gg = None if self.g is None else self.g[index]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self._base_forward(x, *args, **kwargs)
        if not self.active or self.gA is None:
            return output
        h = x if x.dtype == self.gA.dtype else x.to(self.gA.dtype)
        if self.gA.dim() == 2:  # one adapter for the whole batch
            delta = torch.matmul(torch.matmul(h, self.gA), self.gB)
        else:
            rows = h.shape[0]
            if rows != self.index.shape[0]:
                raise RuntimeError(f"a gathered LoRA layer got {rows} rows for {self.index.shape[0]} samples")
            delta = torch.bmm(torch.bmm(h.reshape(rows, -1, h.shape[-1]), self.gA), self.gB).view(output.shape)
        if delta.dtype != output.dtype:
            delta = delta.to(output.dtype)
        if self.gg is None:
            return output.add_(delta)  # the base's output is ours alone (inference, no autograd)
        gg = self.gg if self.gg.dim() == 2 else self.gg[None]
        scale = gg.reshape(gg.shape[0], *([1] * (output.dim() - 2)), -1).to(output.dtype)
        bias = self.module.bias
        if bias is None:
            return scale * (output + delta)
        return bias + scale * (output - bias + delta)


class LoraPool:
    """Adapters paged into slot stacks on one base model (see the module docstring)."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.modules = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
        self.layers: dict[str, LayerStack] = {}
        self.slot: dict[str, int] = {}  # adapter → slot (≥ 1)
        self.targets: dict[str, list[str]] = {}  # adapter → the layers it adapts
        self._free: list[int] = []
        self.version = 0  # bumped whenever a slot's content changes: gathered tensors older than it are stale
        self._gathered: tuple | None = None  # (version, rows) of what the stacks hold gathered now

    @property
    def names(self) -> list[str]:
        return sorted(self.slot)

    def add(self, name: str, parts: dict[str, Parts]) -> None:
        """Page in adapter ``name`` (``read_adapter``'s parts) into a free slot."""
        if name in self.slot:
            self.remove(name)
        slot = self._free.pop() if self._free else len(self.slot) + 1
        for layer_name, p in parts.items():
            if layer_name not in self.layers:
                self.layers[layer_name] = LayerStack(self.modules[layer_name])
            self.layers[layer_name].put(slot, p)
        self.slot[name], self.targets[name] = slot, list(parts)
        self.version += 1
        top = max(self.slot.values()) + 1
        for layer in self.layers.values():  # every slot must index every stack (zeros where not adapted)
            layer.reserve(top)

    def remove(self, name: str) -> None:
        slot = self.slot.pop(name)
        for layer_name in self.targets.pop(name):
            self.layers[layer_name].put(slot, None)
        self._free.append(slot)
        self.version += 1

    def slots(self, adapters: Sequence[str]) -> torch.Tensor:
        """Slot per sample (0 for ``__base__``)."""
        missing = sorted({a for a in adapters if a != BASE and a not in self.slot})
        if missing:
            raise KeyError(f"adapters {missing} are not paged in (loaded: {self.names})")
        return torch.tensor([0 if a == BASE else self.slot[a] for a in adapters], dtype=torch.long)

    @contextmanager
    def route(self, adapters: Sequence[str] | None = None, every_row: str | None = None) -> Iterator[None]:
        """Within: the base runs row ``b`` with ``adapters[b]``'s LoRA, or every row with ``every_row``'s."""
        index = self.slots(adapters) if adapters is not None else None
        if every_row is not None:
            single = int(self.slots([every_row])[0])
        else:
            single = int(index[0]) if len(set(index.tolist())) == 1 else None
        key = (self.version, single if single is not None else tuple(index.tolist()))
        if key != self._gathered:  # the same rows with the same adapters as last time: gathered already
            for layer in self.layers.values():
                layer.gather(index, single)
            self._gathered = key
        layers = list(self.layers.values())
        try:
            for layer in layers:
                layer.active = True
            yield
        finally:
            for layer in layers:
                layer.active = False

    def nbytes(self) -> int:
        """Bytes of the stacks: the pool's memory beyond the base."""
        return sum(layer.nbytes() for layer in self.layers.values())
