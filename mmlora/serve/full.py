"""Fully trained modules served per adapter: a run whose projector (say) was trained in place
(``mode: full``, saved in ``full_modules.safetensors``) is served as a small copy of that module,
routed per sample beside the gathered LoRA layers.

**Owners.** A run's full tensors are grouped under their *owner*: the outermost module of the base all
of whose parameters the run trained in full (LLaVA's whole ``multi_modal_projector`` for a full
projector). Page-in reads the tensors (:func:`read_full`, off the decoding loop), then copies each
owner from the served base and loads the run's tensors into the copy (:func:`make_copies`).

**Routing.** While :meth:`FullCopies.route` is active, a forward hook on each owner of the base replaces
the output rows of the samples whose adapter has a copy of it by that copy's output on the same input
rows: one call of the copy per adapter present, on its rows only (these modules are small; the base's
output for those rows is computed and discarded). Rows are samples, as for the gathered LoRA layers:
the owner must see the batch as its first dimension (LLaVA's projector reads one image per sample).

**Refused**: a run that trained more than :data:`MAX_FULL_FRACTION` of the base's parameters in full
(a copy per adapter would be a good part of the base each time): serve it merged, or export it merged
and serve the export as its own base.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from mmlora.errors import MmloraError

#: the largest share of the base's parameters a run may have trained in full and still be served per adapter
MAX_FULL_FRACTION = 0.10


def full_tensor_count(path: Path) -> int:
    """Parameters in a ``full_modules.safetensors`` file, read from its header alone."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def owners(base: nn.Module, names: Sequence[str]) -> dict[str, list[str]]:
    """``{owner module name: [its parameter names, relative to it]}`` for the parameter ``names`` of ``base``
    (the outermost module whose parameters are all in ``names``; never the whole model)."""
    full = set(names)
    unknown = sorted(full - dict(base.named_parameters()).keys())
    if unknown:
        raise MmloraError(f"full tensors {unknown[:3]} are not parameters of the served base")
    modules = dict(base.named_modules())
    out: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts)):
            owner = ".".join(parts[:k])
            if all(f"{owner}.{p}" in full for p, _ in modules[owner].named_parameters()):
                out.setdefault(owner, []).append(".".join(parts[k:]))
                break
    return out


def read_full(path: Path) -> dict[str, torch.Tensor]:
    """The run's full tensors (``full_modules.safetensors``), read from disk: the part of a page-in that
    may run beside decoding (:func:`make_copies` then touches the served base, between steps)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def make_copies(base: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """``{owner name: a copy of the base's owner holding the run's tensors}``."""
    modules = dict(base.named_modules())
    copies = {}
    for owner, params in owners(base, list(state)).items():
        # the base's routing (gathered layers' forwards, hooks) stays on the base, out of the copy
        taken = {m: m.__dict__.pop("forward") for m in modules[owner].modules() if "forward" in m.__dict__}
        try:
            module = copy.deepcopy(modules[owner])
        finally:
            for m, forward in taken.items():
                m.forward = forward
        for m in module.modules():
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        with torch.no_grad():
            own = dict(module.named_parameters())
            for p in params:
                own[p].copy_(state[f"{owner}.{p}"].to(own[p].dtype))
        copies[owner] = module.eval()
    return copies


def module_bytes(modules: dict[str, nn.Module]) -> int:
    return sum(p.numel() * p.element_size() for m in modules.values() for p in m.parameters())


class FullCopies:
    """Per-adapter copies of fully trained modules on one base (see the module docstring)."""

    def __init__(self, base: nn.Module):
        self.base = base
        self.modules = dict(base.named_modules())
        self.copies: dict[str, dict[str, nn.Module]] = {}  # adapter → owner → copy

    def add(self, name: str, copies: dict[str, nn.Module]) -> None:
        if copies:
            self.copies[name] = copies

    def remove(self, name: str) -> None:
        self.copies.pop(name, None)

    def nbytes(self, name: str | None = None) -> int:
        names = [name] if name is not None else list(self.copies)
        return sum(module_bytes(self.copies.get(n, {})) for n in names)

    @contextmanager
    def route(self, adapters: Sequence[str] | None = None, every_row: str | None = None) -> Iterator[None]:
        """Within: owner modules answer row ``b`` with ``adapters[b]``'s copy (or every row with ``every_row``'s)."""
        present = {every_row} if every_row is not None else set(adapters or [])
        owners_used = {o for a in present if a in self.copies for o in self.copies[a]}
        handles = []
        try:
            for owner in owners_used:
                hook = self._hook(owner, adapters, every_row)
                handles.append(self.modules[owner].register_forward_hook(hook, with_kwargs=True))
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, owner: str, adapters: Sequence[str] | None, every_row: str | None):
        if every_row is not None:
            def whole(module, args, kwargs, output):
                return self.copies[every_row][owner](*args, **kwargs)
            return whole
        groups: dict[str, list[int]] = {}
        for row, a in enumerate(adapters or []):
            if owner in self.copies.get(a, {}):
                groups.setdefault(a, []).append(row)

        def routed(module, args, kwargs, output):
            if not torch.is_tensor(output) or output.shape[0] != len(adapters):
                rows = output.shape[0] if torch.is_tensor(output) else type(output).__name__
                raise RuntimeError(f"a per-adapter copy of {owner} got {rows} rows for {len(adapters)} samples")
            output = output.clone()
            for a, rows in groups.items():
                index = torch.tensor(rows, device=output.device)
                sub = [x.index_select(0, index) if torch.is_tensor(x) and x.shape[:1] == output.shape[:1] else x for x in args]
                output[index] = self.copies[a][owner](*sub, **kwargs).to(output.dtype)
            return output
        return routed
