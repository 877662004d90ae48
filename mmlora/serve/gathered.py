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

**Stacks, rank-exact** (S-LoRA's unified paging, in rows). The adapted ``nn.Linear`` layers of the base
fall into kinds: the same module path but for the layer number, the same shape (every decoder layer's
``q_proj``, say). A kind's :class:`_Kind` holds every loaded adapter's ``A`` as rows of one tensor
``[layers, rows, in]`` and its ``s·B`` transposed as ``[layers, rows, out]``: an adapter of rank ``r``
takes ``r`` rows (its largest rank in the kind, for a ``rank_pattern``), in the kinds it adapts only,
whatever the other adapters' ranks. Row 0 is zeros. Rows freed by an evicted adapter are reused by the
next one that fits; the tensors grow by a quarter when full. The pool's tables give, per slot, its
first row and row count in each kind, and its rank in each layer.

**Routing.** While :meth:`LoraPool.route` is active, each stacked base layer (its ``forward`` taken over
by its :class:`LayerStack`, a cheaper path than a forward hook) adds, for each row ``b`` of the batch,
``(x_b A_bᵀ)(s_b B_b)ᵀ`` by two ``torch.bmm``. The batch's rows are gathered once per kind — one
``index_select`` for all the kind's layers, each sample's rows padded with row 0 to the largest count in
the batch (exact: zero rows add 0) — so gathering costs a few operations per kind, not per layer (a
7B decoder has 7 kinds and 224 adapted layers). A layer no sample of the batch adapts is skipped. The
gathered rows are kept while the batch's composition stays: consecutive decoding steps of the same
rows reuse them until an adapter is paged in or out. A batch with one adapter runs two plain matmuls of
that adapter's own rank. PEFT's own mixed batches (``adapter_names``) loop over the distinct adapters
of the batch in every layer instead.

**DoRA** at inference is the LoRA output rescaled per output feature by a constant of the adapter:
``y = bias + g ⊙ (W x + s B A x)`` with ``g = m / ‖W + s B A‖`` (row norms, as PEFT's
``DoraLinearLayer.get_weight_norm``), computed once at page-in, kept in a row of the kind's ``g``
``[layers, rows, out]`` (ones where the adapter is not DoRA; row 0 ones, for the base) and gathered
per sample like ``A``, ``B``.

Rows are samples: every stacked layer must see the batch as its first dimension (one image per
sample for a vision tower, as PEFT's mixed batches also require; the engine checks it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

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
        """Free ``count`` rows from ``start``: merged with the holes beside them, and the end pulled back
        over a hole that reaches it (so mixed ranks coming and going do not fragment the rows)."""
        for hole in [h for h in self.holes if h[0] + h[1] == start or start + count == h[0]]:
            self.holes.remove(hole)
            start, count = min(start, hole[0]), count + hole[1]
        if start + count == self.end:
            self.end = start
        else:
            self.holes.append((start, count))


def _grown(t: torch.Tensor, rows: int, fill: float = 0.0) -> torch.Tensor:
    """``t`` (``[layers, rows, features]``) with at least ``rows`` rows (a quarter more than asked, to
    amortise the copies)."""
    if rows <= t.shape[1]:
        return t
    new = torch.full((t.shape[0], rows + rows // 4, t.shape[2]), fill, dtype=t.dtype, device=t.device)
    new[:, : t.shape[1]] = t
    return new


def kind_of(name: str, module: nn.Linear) -> tuple:
    """The kind of an adapted layer: its path with the layer numbers left out, its shape and its device
    (a model split over devices keeps each kind's stacks beside its layers)."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name), module.in_features, module.out_features, str(module.weight.device)


class _Kind:
    """The adapters of one kind of layer, rows of ``[layers, rows, features]`` tensors (module docstring)."""

    def __init__(self, module: nn.Linear):
        device = module.weight.device  # stacks live beside the layers they add to (fp32)
        self.A = torch.zeros(0, 1, module.in_features, device=device)  # row 0: zeros
        self.B = torch.zeros(0, 1, module.out_features, device=device)
        self.g: torch.Tensor | None = None  # DoRA scales; ones where not DoRA
        self.rows, self.g_rows = _Rows(), _Rows()
        self.stacks: list[LayerStack] = []

    def add_layer(self, stack: LayerStack) -> int:
        """One more layer of this kind (zeros for the adapters already in); its index in the kind."""
        self.stacks.append(stack)
        self.A = torch.cat([self.A, self.A.new_zeros(1, *self.A.shape[1:])])
        self.B = torch.cat([self.B, self.B.new_zeros(1, *self.B.shape[1:])])
        if self.g is not None:
            self.g = torch.cat([self.g, self.g.new_ones(1, *self.g.shape[1:])])
        return len(self.stacks) - 1

    def put(self, parts: dict[int, Parts]) -> tuple[int, int, int]:
        """Write one adapter's parts (layer index in the kind → parts); ``(first row, rows, g row)``."""
        count = max(a.shape[0] for a, _, _ in parts.values())
        start = self.rows.take(count)
        self.A, self.B = _grown(self.A, self.rows.end), _grown(self.B, self.rows.end)
        self.A[:, start:start + count] = 0  # reused rows: what this adapter leaves out must be zeros
        self.B[:, start:start + count] = 0
        g_row = 0
        if any(g is not None for _, _, g in parts.values()):
            if self.g is None:
                self.g = torch.ones(self.A.shape[0], 1, self.B.shape[2], device=self.A.device)
            g_row = self.g_rows.take(1)
            self.g = _grown(self.g, self.g_rows.end, fill=1.0)
            self.g[:, g_row] = 1.0
        for i, (a, b, g) in parts.items():
            self.A[i, start:start + a.shape[0]] = a.to(self.A.device)
            self.B[i, start:start + a.shape[0]] = b.T.to(self.B.device)
            if g is not None:
                self.g[i, g_row] = g.to(self.g.device)
        return start, count, g_row

    def drop(self, start: int, count: int, g_row: int) -> None:
        """Free an adapter's rows (nothing indexes them once the pool's tables forget it)."""
        self.rows.give(start, count)
        if g_row:
            self.g_rows.give(g_row, 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.g) if t is not None)

    def gather(self, rows: torch.Tensor, g_rows: torch.Tensor | None, adapted: list[bool], dora: list[bool]) -> None:
        """Hand each layer its share of the batch's rows (``[B, w]`` row indices, ``g_rows`` ``[B]``): one
        ``index_select`` per tensor for all the kind's layers."""
        n, w = rows.shape
        flat = rows.reshape(-1).to(self.A.device)  # the tables live on the CPU, the stacks beside their layers
        A = self.A.index_select(1, flat).view(len(self.stacks), n, w, -1)
        B = self.B.index_select(1, flat).view(len(self.stacks), n, w, -1)
        G = self.g.index_select(1, g_rows.to(self.g.device)) if g_rows is not None else None
        for i, stack in enumerate(self.stacks):
            if adapted[i]:
                stack.set(n, A[i].transpose(1, 2), B[i], G[i] if G is not None and dora[i] else None)
            else:
                stack.set(0, None, None, None)

    def single(self, start: int, ranks: list[int], g_row: int, dora: list[bool]) -> None:
        """One adapter for every row: ``Aᵀ`` ``[in, r]`` and ``s·B`` ``[r, out]`` per layer, its own rank."""
        for i, (stack, r) in enumerate(zip(self.stacks, ranks)):
            if not r:
                stack.set(0, None, None, None)
                continue
            g = self.g[i, g_row] if g_row and dora[i] else None
            stack.set(0, self.A[i, start:start + r].T.contiguous(), self.B[i, start:start + r].contiguous(), g)

    def off(self) -> None:
        for stack in self.stacks:
            stack.set(0, None, None, None)


class LayerStack:
    """One adapted base linear layer (see the module docstring). While it exists, the layer's ``forward``
    is the stack's: the base layer's own forward, plus the gathered LoRA term while the pool routes —
    an instance attribute rather than a forward hook, so a routed forward pays no hook registration and
    no hook dispatch per layer."""

    def __init__(self, module: nn.Linear):
        self.module = module
        self.gA = self.gB = self.gg = None  # per route: the batch's gathered A, s·B, g (2-D: one adapter)
        self.batch = 0  # rows the gathered tensors are for (0: one adapter, any rows)
        self.active = False  # set while the pool routes
        self._base_forward = type(module).forward.__get__(module)
        module.forward = self.forward

    def release(self) -> None:
        """Give the layer its own forward back."""
        self.module.__dict__.pop("forward", None)

    def set(self, batch: int, gA: torch.Tensor | None, gB: torch.Tensor | None, gg: torch.Tensor | None) -> None:
        self.batch, self.gA, self.gB, self.gg = batch, gA, gB, gg

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
        self.kinds: dict[tuple, _Kind] = {}
        # layer → (kind number, index in the kind, number in ``layers``: its row of the layer tables)
        self._where: dict[str, tuple[int, int, int]] = {}
        self._numbers: list[list[int]] = []  # per kind, the numbers of its layers, in the kind's order
        self.slot: dict[str, int] = {}  # adapter → slot (≥ 1; slot 0: the base)
        self._free: list[int] = []
        # [kind, slot] → first row, row count, g row (0: none); [layer, slot] → rank, DoRA (0/1)
        self.start = torch.zeros(0, 1, dtype=torch.long)
        self.count = torch.zeros(0, 1, dtype=torch.long)
        self.g_row = torch.zeros(0, 1, dtype=torch.long)
        self.rank = torch.zeros(0, 1, dtype=torch.long)
        self.dora = torch.zeros(0, 1, dtype=torch.long)
        self.version = 0  # bumped whenever a slot's content changes: gathered tensors older than it are stale
        self._gathered: tuple | None = None  # (version, rows) of what the stacks hold gathered now

    @property
    def names(self) -> list[str]:
        return sorted(self.slot)

    def _tables(self, slots: int) -> None:
        """Room in the tables for every kind and layer and ``slots`` slots (a few bytes per entry)."""
        want = {"start": len(self.kinds), "count": len(self.kinds), "g_row": len(self.kinds),
                "rank": len(self.layers), "dora": len(self.layers)}
        for key, rows in want.items():
            t = getattr(self, key)
            if rows > t.shape[0] or slots > t.shape[1]:
                shape = [max(want, 2 * have) if want > have else have for want, have in zip((rows, slots), t.shape)]
                new = torch.zeros(shape, dtype=torch.long)
                new[: t.shape[0], : t.shape[1]] = t
                setattr(self, key, new)

    def _layer(self, name: str) -> tuple[int, int, int]:
        """Where adapted layer ``name`` is (see ``_where``), stacking it on first use."""
        if name not in self._where:
            module = self.modules[name]
            key = kind_of(name, module)
            if key not in self.kinds:
                self.kinds[key] = _Kind(module)
                self._numbers.append([])
            stack = self.layers[name] = LayerStack(module)
            k = list(self.kinds).index(key)
            self._where[name] = (k, self.kinds[key].add_layer(stack), len(self.layers) - 1)
            self._numbers[k].append(len(self.layers) - 1)
        return self._where[name]

    def kind(self, layer: str) -> _Kind:
        """The kind the adapted layer ``layer`` is stacked in."""
        return list(self.kinds.values())[self._where[layer][0]]

    def add(self, name: str, parts: dict[str, Parts]) -> None:
        """Page in adapter ``name`` (``read_adapter``'s parts) into a free slot."""
        if name in self.slot:
            self.remove(name)
        slot = self._free.pop() if self._free else len(self.slot) + 1
        by_kind: dict[int, dict[int, Parts]] = {}
        for layer_name, p in parts.items():
            k, i, _ = self._layer(layer_name)
            by_kind.setdefault(k, {})[i] = p
        self._tables(slot + 1)
        kinds = list(self.kinds.values())
        for k, kind_parts in by_kind.items():
            self.start[k, slot], self.count[k, slot], self.g_row[k, slot] = kinds[k].put(kind_parts)
        for layer_name, (a, _, g) in parts.items():
            j = self._where[layer_name][2]
            self.rank[j, slot], self.dora[j, slot] = a.shape[0], int(g is not None)
        self.slot[name] = slot
        self.version += 1

    def remove(self, name: str) -> None:
        slot = self.slot.pop(name)
        for k, kind in enumerate(self.kinds.values()):
            if self.count[k, slot]:
                kind.drop(int(self.start[k, slot]), int(self.count[k, slot]), int(self.g_row[k, slot]))
        for t in (self.start, self.count, self.g_row, self.rank, self.dora):
            t[:, slot] = 0
        self._free.append(slot)
        self.version += 1

    def slots(self, adapters: Sequence[str]) -> torch.Tensor:
        """Slot per sample (0 for ``__base__``)."""
        missing = sorted({a for a in adapters if a != BASE and a not in self.slot})
        if missing:
            raise KeyError(f"adapters {missing} are not paged in (loaded: {self.names})")
        return torch.tensor([0 if a == BASE else self.slot[a] for a in adapters], dtype=torch.long)

    def _gather(self, index: torch.Tensor | None, single: int | None) -> None:
        kinds, n_k, n_l = list(self.kinds.values()), len(self.kinds), len(self.layers)
        numbers = self._numbers
        if single is not None:
            ranks, dora = self.rank[:n_l, single].tolist(), self.dora[:n_l, single].tolist()
            for kind, js, start, g_row in zip(kinds, numbers, self.start[:n_k, single].tolist(),
                                              self.g_row[:n_k, single].tolist()):
                kind.single(start, [ranks[j] for j in js], g_row, [bool(dora[j]) for j in js])
            return
        counts = self.count[:n_k, index]  # [K, B]
        width = int(counts.max()) if counts.numel() else 0  # the batch's largest row count: every sample pads to it
        if not width:
            for kind in kinds:
                kind.off()
            return
        steps = torch.arange(width)
        rows = torch.where(steps < counts[..., None], self.start[:n_k, index][..., None] + steps, 0)  # [K, B, w]
        g_rows = self.g_row[:n_k, index]
        adapted = (self.rank[:n_l, index] > 0).any(1).tolist()
        dora = self.dora[:n_l, index].bool().any(1).tolist()
        for k, (kind, js) in enumerate(zip(kinds, numbers)):
            kind_dora = [dora[j] for j in js]
            kind.gather(rows[k], g_rows[k] if any(kind_dora) else None, [adapted[j] for j in js], kind_dora)

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
        tables = sum(t.numel() * t.element_size() for t in (self.start, self.count, self.g_row, self.rank, self.dora))
        return tables + sum(kind.nbytes() for kind in self.kinds.values())
