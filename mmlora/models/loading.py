"""Resolve a model reference (preset name, local folder, Hugging Face id) to something loadable.

Nothing is downloaded when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set: a hub id that is not
already in the local cache fails at once with a message saying what to pass instead, rather than
hanging on network retries or ending in a wall of traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from mmlora.errors import MmloraError

_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.sep + os.sep in ref or ref.endswith(os.sep)


def resolve_pretrained(ref: str | Path, kind: str | None = None) -> Path | str:
    """Return a local folder for ``ref``, or (online only) the hub id for ``from_pretrained`` to fetch.

    ``ref`` may be a preset name (``mmlora models list``; built once and cached), a folder, or a hub
    id such as ``llava-hf/llava-1.5-7b-hf``. ``kind`` ("llava" or "clip") checks a preset's kind.
    """
    from mmlora.models.presets import PRESETS, preset_path

    ref_str = str(ref)
    path = Path(ref_str).expanduser()
    if path.is_dir():
        return path
    if ref_str in PRESETS:
        preset = PRESETS[ref_str]
        if kind is not None and preset.kind != kind:
            raise MmloraError(f"preset {ref_str!r} is a {preset.kind} model, but a {kind} model is needed here")
        return preset_path(ref_str)
    if isinstance(ref, Path) or _looks_like_path(ref_str) or path.exists():
        raise MmloraError(f"no model folder at {ref_str!r}: pass a folder written by save_pretrained, or a preset")

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref_str, local_files_only=True))
    except Exception:  # not cached (or not a valid id): decide below whether we may download
        pass
    if offline():
        raise MmloraError(
            f"{ref_str!r} is not a local folder, a preset ({', '.join(PRESETS)}) or a model in the local "
            "Hugging Face cache, and downloads are off (HF_HUB_OFFLINE=1). Pass the path of a folder "
            f"that holds the checkpoint (on a machine with network: `hf download {ref_str} --local-dir DIR`, "
            "then copy DIR here), or a preset from `mmlora models list`."
        )
    return ref_str
