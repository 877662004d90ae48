"""The adapter pool: the runs a server may serve (registered by name), which of them are loaded, and
their page-in off the decoding loop.

* :func:`register` reads a run's manifest and its tensors' headers only — no weights — so thousands
  of runs register in seconds; it refuses, in one line, what no mode can serve and what this mode
  cannot (the run's base, QA-LoRA, several adapters or full modules in PEFT's modes, DoRA in PEFT's
  mixed batches, too large a full part).
* :class:`Budget` keeps the loaded set within ``--max-loaded``: a number of adapters (``64``) or their
  memory (``512MiB``, ``2GiB``), evicting the least recently used adapters that no running sequence uses.
* :class:`Pager` reads adapters from disk on a thread of its own, so that a request for an adapter that
  is not loaded waits for it without stopping the sequences that are decoding.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmlora.errors import MmloraError
from mmlora.models.loading import resolve_pretrained
from mmlora.runs.layout import require_weights
from mmlora.serve.full import MAX_FULL_FRACTION, full_tensor_count

#: modes whose adapters live in PEFT's multi-adapter model (one PEFT adapter per run, nothing in place)
PEFT_MODES = ("mixed", "switch")

_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_max_loaded(value: str | int) -> tuple[int | None, int | None]:
    """``--max-loaded``: ``(adapters, None)`` for a count (``64``), ``(None, bytes)`` for a size (``512MiB``)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KiB|MiB|GiB)?\s*", str(value), flags=re.IGNORECASE)
    if m is None:
        raise MmloraError(f"--max-loaded {value!r}: give a number of adapters (64) or a size (512MiB, 2GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    if not unit:
        if number != int(number) or number < 1:
            raise MmloraError(f"--max-loaded {value!r}: give a whole number of adapters, at least 1")
        return int(number), None
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise MmloraError(f"--max-loaded {value!r}: give a size above 0")
    return None, size


@dataclass(frozen=True)
class ServedRun:
    """What a server needs of a run: its PEFT folders, its full tensors, and their size when loaded."""

    name: str
    folder: Path
    adapters: tuple[Path, ...]
    full: Path | None
    full_params: int
    dora: bool
    nbytes: int  # the adapter's tensors and full copies, fp32 as served


def _tensor_bytes(path: Path) -> int:
    return 4 * full_tensor_count(path)


@functools.lru_cache(maxsize=64)
def _resolved(ref: str) -> str:
    """The local folder of a model reference (runs of one base name it once: resolved once)."""
    return str(resolve_pretrained(ref))


def register(name: str, run: str | Path, base_ref: str, mode: str, base_params: int) -> ServedRun:
    """Read run ``run``'s manifest (see the module docstring); a one-line error if it cannot be served."""
    weights = require_weights(run)
    manifest = weights.manifest()
    if _resolved(manifest["base_model"]) != _resolved(base_ref):
        raise MmloraError(f"{run} adapted {manifest['base_model']}, not the served base {base_ref}")
    if manifest.get("qalora"):
        raise MmloraError(f"{run}: QA-LoRA layers re-quantize the base; export it merged (mmlora export RUN --merge) "
                          "and serve the export as its own base")
    adapters = tuple(weights.path(a["path"]) for a in manifest["adapters"])
    full = weights.path(manifest["full_modules"]["path"]) if manifest.get("full_modules") else None
    full_params = full_tensor_count(full) if full is not None else 0
    if not adapters and full is None:
        raise MmloraError(f"{run}: the run holds no adapter and no trained module; serve its base with --base")
    if mode in PEFT_MODES and (len(adapters) != 1 or full is not None):
        what = f"{len(adapters)} PEFT adapters" if len(adapters) != 1 else "modules trained in place (full)"
        raise MmloraError(f"{run}: --mode {mode} serves runs of exactly one PEFT adapter; this one has {what}: "
                          "serve it with --mode gathered or merged")
    if mode == "gathered" and full_params > MAX_FULL_FRACTION * base_params:
        raise MmloraError(f"{run}: trained {full_params:,} parameters in place ({full_params / base_params:.0%} of the "
                          f"base; per-adapter copies are for small parts like a projector, at most "
                          f"{MAX_FULL_FRACTION:.0%}): serve it with --mode merged, or export it merged and serve that")
    dora = any(json.loads((a / "adapter_config.json").read_text()).get("use_dora") for a in adapters)
    if dora and mode == "mixed":  # PEFT's mixed batches refuse DoRA layers (adapter_names)
        raise MmloraError(f"{run}: DoRA adapters cannot share a PEFT mixed batch; serve it with --mode gathered")
    nbytes = sum(_tensor_bytes(a / "adapter_model.safetensors") for a in adapters) + 4 * full_params
    return ServedRun(name, weights.folder, adapters, full, full_params, dora, nbytes)


def register_adapter(name: str, folder: Path) -> ServedRun:
    """A bare PEFT LoRA folder (a router run's expert) as a servable run of that one adapter."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return ServedRun(name, folder, (folder,), None, 0, bool(config.get("use_dora")),
                     _tensor_bytes(folder / "adapter_model.safetensors"))


class Budget:
    """The loaded set in least-recently-used order, within a count or a byte budget."""

    def __init__(self, max_count: int | None, max_bytes: int | None):
        self.max_count, self.max_bytes = max_count, max_bytes
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name → bytes, least recently used first

    def __contains__(self, name: str) -> bool:
        return name in self.loaded

    @property
    def nbytes(self) -> int:
        return sum(self.loaded.values())

    def fits(self, sizes: dict[str, int]) -> bool:
        """Whether the adapters ``sizes`` (name → bytes) may be loaded together at all."""
        if self.max_count is not None and len(sizes) > self.max_count:
            return False
        return self.max_bytes is None or sum(sizes.values()) <= self.max_bytes

    def touch(self, name: str) -> None:
        self.loaded.move_to_end(name)

    def victims(self, add: dict[str, int], keep: Iterable[str]) -> list[str]:
        """The least recently used loaded adapters (none of ``keep``) to evict so that ``add`` fits beside the
        rest; raises :class:`MmloraError` if even evicting every other one would not make room."""
        keep = set(keep) | set(add)
        count = len(self.loaded) + len([n for n in add if n not in self.loaded])
        size = self.nbytes + sum(b for n, b in add.items() if n not in self.loaded)
        out = []
        for name, nbytes in self.loaded.items():
            over = (self.max_count is not None and count > self.max_count) or (self.max_bytes is not None and size > self.max_bytes)
            if not over:
                break
            if name not in keep:
                out.append(name)
                count, size = count - 1, size - nbytes
        over = (self.max_count is not None and count > self.max_count) or (self.max_bytes is not None and size > self.max_bytes)
        if over:
            limit = f"{self.max_count} adapters" if self.max_count is not None else f"{self.max_bytes / 2**20:.1f} MiB"
            raise MmloraError(f"adapters {sorted(add)} do not fit beside those in use (at most {limit} may be loaded)")
        return out


class Pager:
    """Reads adapters on a background thread: ``request`` starts a read, ``ready`` says whether it ended,
    ``take`` returns what was read (or raises the read's error). ``notify`` is called when a read ends."""

    def __init__(self, read: Callable[[str], Any], notify: Callable[[], None] | None = None):
        self.read, self.notify = read, notify
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmlora-pager")
        self._reads: dict[str, Future] = {}
        self._lock = threading.Lock()

    def request(self, name: str) -> None:
        with self._lock:
            if name in self._reads:
                return
            future = self._pool.submit(self.read, name)
            self._reads[name] = future
        if self.notify is not None:
            future.add_done_callback(lambda _: self.notify())

    def ready(self, name: str) -> bool:
        with self._lock:
            future = self._reads.get(name)
        return future is not None and future.done()

    def take(self, name: str) -> Any:
        with self._lock:
            future = self._reads.pop(name)
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
