"""A build-once cache for generated artefacts (tiny models, shapes worlds), keyed by what built them.

An entry's key hashes the builder's parameters and the source files of the code that builds it, so
a change to either builds a new entry. Entries are written to a temporary folder and renamed into
place, under a file lock, so concurrent test workers never see a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def cache_root() -> Path:
    """``$MMLORA_CACHE``, else ``~/.cache/mmlora``."""
    return Path(os.environ.get("MMLORA_CACHE") or Path.home() / ".cache" / "mmlora")


def source_digest(modules: Iterable[str]) -> str:
    """SHA-256 over the source of package files given relative to ``mmlora/`` (e.g. ``models/llava.py``)."""
    h = hashlib.sha256()
    for rel in sorted(modules):
        h.update(rel.encode())
        h.update((PACKAGE_ROOT / rel).read_bytes())
    return h.hexdigest()


def cache_key(params: dict, modules: Iterable[str]) -> str:
    blob = json.dumps(params, sort_keys=True, default=str) + source_digest(modules)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_dir(kind: str, params: dict, modules: Iterable[str], build: Callable[[Path], None]) -> Path:
    """Return ``<cache>/<kind>-<key>``, calling ``build(tmp_dir)`` to make it the first time."""
    from filelock import FileLock

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{kind}-{cache_key(params, modules)}"
    if (final / ".complete").exists():
        return final
    with FileLock(str(final) + ".lock"):
        if (final / ".complete").exists():
            return final
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        build(tmp)
        (tmp / ".complete").write_text(json.dumps(params, sort_keys=True, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final
