"""PEFT adapters saved under another transformers layout (4.x) → keys of the model at hand.

transformers 5 renamed the modules of most VLMs (LLaVA's ``language_model.model.layers`` became
``model.language_model.layers``, ``vision_tower.vision_model`` became ``model.vision_tower``, ...).
PEFT loads an adapter whose keys name no module of the model without complaint: the weights are just
missing and the model computes its base outputs. Here every adapter key must name a module of the
model, as it is or after the key renames transformers itself applies to old checkpoints of that
model (``transformers.conversion_mapping.get_model_conversion_mapping``); anything else is refused,
by name.

Usage::

    convert_legacy_adapter("old_adapter/", "converted/", model)   # then PeftModel.from_pretrained
    with in_layout_of(model, "old_adapter/") as (folder,):       # converted only when it must be
        PeftModel.from_pretrained(model, folder)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from mmlora.errors import MmloraError
from mmlora.models.modality import unwrap

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _module_path(key: str) -> str:
    """The module an adapter key belongs to: the part before its PEFT parts (``lora_A``, ...; and
    ``base_layer``, under which PEFT saves the weights of an adapted embedding or output layer)."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):
        if part.startswith("lora_") or part in ("modules_to_save", "original_module", "base_layer"):
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def _renamer(model: nn.Module):
    """transformers' own key renames for old checkpoints of ``model`` (renames only: a key that needs
    its tensor converted, e.g. fused experts, is not an adapter key this can move)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # another transformers: no renames known
        return lambda key: key
    try:
        renames = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # noqa: BLE001 - a model transformers has no mapping for
        renames = []
    return lambda key: apply_renamings(key, renames) if renames else key


def legacy_key_map(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{adapter key: key in this model's layout}`` for every key; raises MmloraError naming the keys
    that name no module of ``model`` either way (PEFT would drop them silently)."""
    base = unwrap(model)
    modules = {n for n, _ in base.named_modules()}
    rename = _renamer(base)
    out: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        if _module_path(key) in modules:
            out[key] = key
            continue
        bare = key.removeprefix(PEFT_PREFIX)
        new = PEFT_PREFIX + rename(bare) if key.startswith(PEFT_PREFIX) else rename(bare)
        if _module_path(new) in modules:
            out[key] = new
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise MmloraError(
            f"adapter keys name no module of {type(base).__name__}, even after transformers' renames of older "
            f"layouts; they would load as missing: {shown}"
        )
    if len(set(out.values())) != len(out):
        raise MmloraError(f"adapter keys collide once renamed to {type(base).__name__}'s layout (old and new keys mixed)")
    return out


def adapter_keys(folder: str | Path) -> list[str]:
    from safetensors import safe_open

    path = Path(folder) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise MmloraError(f"{folder}: no {ADAPTER_WEIGHTS} (a PEFT adapter folder holds one)")
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def needs_conversion(folder: str | Path, model: nn.Module) -> bool:
    """Whether the adapter in ``folder`` names modules ``model`` lacks (raises if not even renames help)."""
    mapping = legacy_key_map(model, adapter_keys(folder))
    return any(k != v for k, v in mapping.items())


def convert_legacy_adapter(src: str | Path, dst: str | Path, model: nn.Module) -> Path:
    """Write the PEFT adapter folder ``src`` to ``dst`` with its keys (and ``target_modules``) in the
    layout of ``model``; refuses (MmloraError, naming them) keys that name no module of ``model``."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if not (src / ADAPTER_CONFIG).is_file():
        raise MmloraError(f"{src}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    state = load_file(str(src / ADAPTER_WEIGHTS))
    mapping = legacy_key_map(model, list(state))
    config = json.loads((src / ADAPTER_CONFIG).read_text())
    if any(k != v for k, v in mapping.items()):
        # Old target_modules (suffixes of old names) may match nothing now: target exactly the modules
        # the adapter has weights for.
        targets = sorted({_module_path(v).removeprefix(PEFT_PREFIX) for k, v in mapping.items() if ".lora_" in k})
        if targets:
            config["target_modules"] = targets
            config["exclude_modules"] = None
            config["layers_to_transform"] = None
            config["layers_pattern"] = None
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(item, dst / item.name)
    (dst / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file({mapping[k]: v.contiguous() for k, v in state.items()}, str(dst / ADAPTER_WEIGHTS))
    return dst


@contextlib.contextmanager
def in_layout_of(model: nn.Module, *folders: str | Path) -> Iterator[list[Path]]:
    """Inside: the PEFT adapter ``folders`` with keys that name modules of ``model`` — each folder
    itself when it already does, else a converted copy in a temporary folder (removed on exit). Keys
    that name no module of ``model`` either way are refused."""
    with tempfile.TemporaryDirectory() as tmp:
        out = [convert_legacy_adapter(f, Path(tmp) / str(i), model) if needs_conversion(f, model) else Path(f)
               for i, f in enumerate(folders)]
        yield out
