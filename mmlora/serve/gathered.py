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

**Stacks, rank-exact** (S-LoRA's unified paging, in rows): per adapted ``nn.Linear`` of the base,
:class:`LayerStack` holds every loaded adapter's ``A`` rows (``[r, in]``) one after another in one
tensor ``[rows, in]``, and its ``s·B`` the same way, transposed (``[rows, out]``) — an adapter of rank
``r`` takes ``r`` rows, whatever the other adapters' ranks, and only in the layers it adapts. Row 0 is
zeros. Rows freed by an evicted adapter are reused by the next one that fits; the tensors grow by a
quarter when full. The pool's tables give, per layer and slot, the adapter's first row and rank.

**Routing.** While :meth:`LoraPool.route` is active, each stacked base layer (its ``forward`` taken over
by its :class:`LayerStack`, a cheaper path than a forward hook) adds, for each row ``b`` of the batch,
``(x_b A_bᵀ)(s_b B_b)ᵀ`` by two ``torch.bmm`` on ``A[rows_b]``, ``B[rows_b]`` — each sample's rows
gathered in one indexing per layer and padded with row 0 to the largest rank *in the batch* (exact: the
zero rows add 0); a sample whose adapter does not adapt the layer gathers only row 0, and a layer no
sample of the batch adapts is skipped. Gathering is done once per batch composition: consecutive
decoding steps of the same rows reuse it until an adapter is paged in or out. A batch with one adapter
runs two plain matmuls of that adapter's own rank. PEFT's own mixed batches (``adapter_names``) loop
over the distinct adapters of the batch in every layer instead.

**DoRA** at inference is the LoRA output rescaled per output feature by a constant of the adapter:
``y = bias + g ⊙ (W x + s B A x)`` with ``g = m / ‖W + s B A‖`` (row norms, as PEFT's
``DoraLinearLayer.get_weight_norm``), computed once at page-in, kept in a row of its own (row 0: ones,
for the batch's samples that are not DoRA on this layer) and gathered per sample like ``A``, ``B``.

Rows are samples: every stacked layer must see the batch as its first dimension (one image per
sample for a vision tower, as PEFT's mixed batches also require; the engine checks it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from mmlora.adapters.parts import Parts
from mmlora.runs.compose import BASE


class _Rows:
    """Row allocation in a tensor whose row 0 is reserved: exact-size holes first, then the first larger
    hole, then the end (the caller grows the tensor to :attr:`end`)."""

    def __init__(self) -> None:
        self.end = 1
        self.holes: list[tuple[int, int]] = []  # (start, count), freed and not yet reused

    def take(self, count: int) -> int:
        fits = [h for h in self.holes if h[1] >= count]
        if fits:
            start, size = min(fits, key=lambda h: (h[1] != count, h[0]))
            self.holes.remove((start, size))
            if size > count:
                self.holes.append((start + count, size - count))
            return start
        start, self.end = self.end, self.end + count
        return start

    def give(self, start: int, count: int) -> None:
        if start + count == self.end:  # the last block: shrink the end instead of keeping a hole
            self.end = start
        else:
            self.holes.append((start, count))


def _grown(t: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """``t`` with at least ``rows`` rows (a quarter more than asked, to amortise the copies)."""
    if rows <= t.shape[0]:
        return t
    new = torch.full((rows + rows // 4, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    new[: t.shape[0]] = t
    return new


class LayerStack:
    """One base linear layer's adapters, rank-exact (see the module docstring). While it exists, the
    layer's ``forward`` is the stack's: the base layer's own forward, plus the gathered LoRA term while
    the pool routes — an instance attribute rather than a forward hook, so a routed forward pays no hook
    registration and no hook dispatch per layer."""

    def __init__(self, module: nn.Linear):
        self.module = module
        device = module.weight.device  # stacks live beside the layer they add to (fp32)
        self.A = torch.zeros(1, module.in_features, device=device)  # rows of every adapter's A; row 0 zeros
        self.B = torch.zeros(1, module.out_features, device=device)  # rows of every adapter's (s·B)ᵀ
        self.g: torch.Tensor | None = None  # DoRA scales, one row per DoRA adapter; row 0 ones
        self.rows, self.g_rows = _Rows(), _Rows()
        self.gA = self.gB = self.gg = None  # per route: the batch's gathered A, s·B, g (2-D: one adapter)
        self.batch = 0  # rows the gathered tensors are for (0: one adapter, any rows)
        self.active = False  # set while the pool routes
        self._base_forward = type(module).forward.__get__(module)
        module.forward = self.forward

    def release(self) -> None:
        """Give the layer its own forward back."""
        self.module.__dict__.pop("forward", None)

    def put(self, parts: Parts) -> tuple[int, int, int]:
        """Write one adapter's ``parts``; its ``(first row, rank, g row)`` (g row 0: not DoRA)."""
        a, b, g = parts
        rank = a.shape[0]
        start = self.rows.take(rank)
        self.A, self.B = _grown(self.A, self.rows.end), _grown(self.B, self.rows.end)
        self.A[start:start + rank] = a.to(self.A.device)
        self.B[start:start + rank] = b.T.to(self.B.device)
        g_row = 0
        if g is not None:
            if self.g is None:
                self.g = torch.ones(1, self.module.out_features, device=self.A.device)
            g_row = self.g_rows.take(1)
            self.g = _grown(self.g, self.g_rows.end, fill=1.0)
            self.g[g_row] = g.to(self.g.device)
        return start, rank, g_row

    def drop(self, start: int, rank: int, g_row: int) -> None:
        """Free an adapter's rows (nothing indexes them once the pool's tables forget it)."""
        self.rows.give(start, rank)
        if g_row:
            self.g_rows.give(g_row, 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.g) if t is not None)

    def gather(self, rows: torch.Tensor | None, g_rows: torch.Tensor | None) -> None:
        """The batch's rows: ``[B, r]`` indices into the stacks (row 0: padding), ``g_rows`` ``[B]`` (None: no
        sample is DoRA here); ``rows`` None: no sample adapts this layer."""
        if rows is None:
            self.gA = self.gB = self.gg = None
            return
        self.batch = rows.shape[0]
        # embedding: the cheapest row gather in torch (fewer checks than advanced indexing or index_select)
        self.gA, self.gB = F.embedding(rows, self.A).transpose(1, 2), F.embedding(rows, self.B)
        self.gg = None if g_rows is None else F.embedding(g_rows, self.g)

    def single(self, start: int, rank: int, g_row: int) -> None:
        """One adapter for every row: ``Aᵀ`` ``[in, r]`` and ``s·B`` ``[r, out]`` for two plain matmuls."""
        if rank == 0:
            self.gA = self.gB = self.gg = None
            return
        self.batch = 0
        self.gA = self.A[start:start + rank].T.contiguous()
        self.gB = self.B[start:start + rank].contiguous()
        self.gg = self.g[g_row] if g_row else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        output = self._base_forward(x, *args, **kwargs)
        if not self.active or self.gA is None:
            return output
        # the base's output is ours alone (inference, no autograd): the LoRA term and DoRA's scale go into it
        h = x if x.dtype == self.gA.dtype else x.to(self.gA.dtype)
        rows = h.shape[0]
        into = output.dtype == self.gA.dtype and output.is_contiguous()
        if not self.batch:  # one adapter for the whole batch: plain matmuls
            down = torch.matmul(h, self.gA).view(-1, self.gB.shape[0])
            if into:
                output.view(-1, output.shape[-1]).addmm_(down, self.gB)
            else:
                output.add_(torch.mm(down, self.gB).view(output.shape).to(output.dtype))
        else:
            if rows != self.batch:
                raise RuntimeError(f"a gathered LoRA layer got {rows} rows for {self.batch} samples")
            down = torch.bmm(h.reshape(rows, -1, h.shape[-1]), self.gA)
            if into:
                output.view(rows, -1, output.shape[-1]).baddbmm_(down, self.gB)
            else:
                output.add_(torch.bmm(down, self.gB).view(output.shape).to(output.dtype))
        if self.gg is not None:  # DoRA: bias + g ⊙ (W x + s B A x)
            gg = self.gg if self.gg.dim() == 2 else self.gg[None]
            scale = gg.reshape(gg.shape[0], *([1] * (output.dim() - 2)), -1).to(output.dtype)
            bias = self.module.bias
            if bias is None:
                output.mul_(scale)
            else:
                output.sub_(bias).mul_(scale).add_(bias)
        return output


class LoraPool:
    """Adapters paged into rank-exact stacks on one base model (see the module docstring)."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.modules = {n: m for n, m in base.named_modules() if isinstance(m, nn.Linear)}
        self.layers: dict[str, LayerStack] = {}
        self.slot: dict[str, int] = {}  # adapter → slot (≥ 1; slot 0: the base)
        self.targets: dict[str, list[str]] = {}  # adapter → the layers it adapts
        self._free: list[int] = []
        # [layer, slot] → first row, rank, DoRA g row of the slot's adapter in that layer's stack (0: none)
        self.start = torch.zeros(0, 1, dtype=torch.long)
        self.rank = torch.zeros(0, 1, dtype=torch.long)
        self.g_row = torch.zeros(0, 1, dtype=torch.long)
        self.version = 0  # bumped whenever a slot's content changes: gathered tensors older than it are stale
        self._gathered: tuple | None = None  # (version, rows) of what the stacks hold gathered now

    @property
    def names(self) -> list[str]:
        return sorted(self.slot)

    def _tables(self, layers: int, slots: int) -> None:
        """Room in the tables for ``layers`` × ``slots`` (doubling; a few bytes per entry)."""
        n_l, n_s = self.start.shape
        if layers <= n_l and slots <= n_s:
            return
        shape = (max(layers, 2 * n_l if layers > n_l else n_l), max(slots, 2 * n_s if slots > n_s else n_s))
        for key in ("start", "rank", "g_row"):
            new = torch.zeros(shape, dtype=torch.long)
            new[:n_l, :n_s] = getattr(self, key)
            setattr(self, key, new)

    def add(self, name: str, parts: dict[str, Parts]) -> None:
        """Page in adapter ``name`` (``read_adapter``'s parts) into a free slot."""
        if name in self.slot:
            self.remove(name)
        slot = self._free.pop() if self._free else len(self.slot) + 1
        for layer_name in parts:
            if layer_name not in self.layers:
                self.layers[layer_name] = LayerStack(self.modules[layer_name])
        self._tables(len(self.layers), slot + 1)
        index = {n: i for i, n in enumerate(self.layers)}
        for layer_name, p in parts.items():
            i = index[layer_name]
            self.start[i, slot], self.rank[i, slot], self.g_row[i, slot] = self.layers[layer_name].put(p)
        self.slot[name], self.targets[name] = slot, list(parts)
        self.version += 1

    def remove(self, name: str) -> None:
        slot = self.slot.pop(name)
        index = {n: i for i, n in enumerate(self.layers)}
        for layer_name in self.targets.pop(name):
            i = index[layer_name]
            self.layers[layer_name].drop(int(self.start[i, slot]), int(self.rank[i, slot]), int(self.g_row[i, slot]))
        self.start[:, slot] = self.rank[:, slot] = self.g_row[:, slot] = 0
        self._free.append(slot)
        self.version += 1

    def slots(self, adapters: Sequence[str]) -> torch.Tensor:
        """Slot per sample (0 for ``__base__``)."""
        missing = sorted({a for a in adapters if a != BASE and a not in self.slot})
        if missing:
            raise KeyError(f"adapters {missing} are not paged in (loaded: {self.names})")
        return torch.tensor([0 if a == BASE else self.slot[a] for a in adapters], dtype=torch.long)

    def _gather(self, index: torch.Tensor | None, single: int | None) -> None:
        layers = list(self.layers.values())
        n = len(layers)
        if single is not None:
            for layer, start, rank, g_row in zip(layers, self.start[:n, single].tolist(),
                                                 self.rank[:n, single].tolist(), self.g_row[:n, single].tolist()):
                layer.single(start, rank, g_row)
            return
        ranks = self.rank[:n, index]  # [L, B]
        width = int(ranks.max()) if n else 0  # the batch's largest rank: what every sample pads to
        steps = torch.arange(width)
        rows = torch.where(steps < ranks[..., None], self.start[:n, index][..., None] + steps, 0)  # [L, B, r]
        g_rows = self.g_row[:n, index]
        adapted, dora = (ranks > 0).any(1).tolist(), (g_rows > 0).any(1).tolist()
        for i, layer in enumerate(layers):
            layer.gather(rows[i] if adapted[i] else None, g_rows[i] if dora[i] else None)

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
            self._gather(index, single)
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
        """Bytes of the stacks and tables: the pool's memory beyond the base."""
        tables = sum(t.numel() * t.element_size() for t in (self.start, self.rank, self.g_row))
        return tables + sum(layer.nbytes() for layer in self.layers.values())
