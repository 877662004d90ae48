"""Export a run.

* :func:`export_run` — adapters-only (a copy of ``final/``: PEFT folders, full modules, manifest,
  processor, model card) or ``merge=True``: a quantized base is dequantized, the adapters are merged
  into it, and the result is saved as an ordinary transformers checkpoint. A merge is checked:
  merged outputs must equal the adapter model's outputs on a probe batch. QA-LoRA adapters merge
  into their INT4 zero points, so such a run exports an INT4 model (``mmlora.adapters.int4``);
  ``int4_group_size`` re-quantizes the merged layers of a run's quantized modalities to INT4
  (the QLoRA → merge → INT4 path that QA-LoRA is compared against). ``as_lora=True`` rewrites an
  AdaLoRA run's adapter as a plain LoRA adapter at the allocated per-module ranks, for tools that do
  not know AdaLoRA, checked the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from mmlora.adapters.int4 import int4_layers, quantize_linears, save_int4_model
from mmlora.adapters.qalora import merge_qalora
from mmlora.data.batching import Collator
from mmlora.data.build import read_dataset
from mmlora.data.processing import ConversationEncoder
from mmlora.data.samples import Sample
from mmlora.errors import MmloraError
from mmlora.models.layers import is_linear
from mmlora.models.modality import discover_modalities, is_open_clip, unwrap
from mmlora.runs.card import append_to_card
from mmlora.runs.layout import find_weights, require_weights
from mmlora.runs.reference import load_run


def _probe_batch(processor, recipe) -> dict[str, torch.Tensor]:
    """A real batch from the run's validation (or training) data for the merge check."""
    specs = (recipe.data.val or recipe.data.train) if recipe and recipe.data else []
    for spec in specs:
        try:
            records = [r for r in read_dataset(spec)[:8] if isinstance(r, Sample)]
        except MmloraError:
            continue
        if records:
            enc = ConversationEncoder(processor, recipe.data.max_length)
            return Collator(processor.tokenizer.pad_token_id)([enc.encode(r) for r in records[:2]])
    ids = torch.arange(3, 19).reshape(2, 8)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _quantized_linears(model: nn.Module, recipe) -> list[str]:
    """Linear layers (heads excepted) of the modalities a recipe quantizes (4bit, 8bit) or places with qalora."""
    mmap = discover_modalities(model, recipe.model.modalities)
    specs = dict(recipe.placement.items())
    chosen = {n for n, s in specs.items() if s.precision in ("4bit", "8bit") or s.mode == "qalora"}
    return [n for n, m in model.named_modules() if n and mmap.modality_of(n) in chosen and n not in mmap.heads
            and is_linear(m) and type(m) is nn.Linear]


def _adalora_as_lora(model: nn.Module, adapter: str, out: Path) -> dict[str, int]:
    """Write the AdaLoRA adapter ``adapter`` of ``model`` as a plain LoRA adapter folder in ``out``.

    An AdaLoRA layer adds ``B (A ⊙ E) x · α / (ranknum + 1e-5)`` (PEFT's ``SVDLinear``); as LoRA
    that is ``A' = A ⊙ E`` and ``B' = B · α / (ranknum + 1e-5)`` at scaling 1 (``lora_alpha = r``),
    each module at its own allocated rank (``rank_pattern``, ``alpha_pattern``). Modules pruned to
    rank 0 add nothing and are left out. Returns module → rank."""
    import re

    from peft import LoraConfig
    from peft.tuners.adalora.layer import AdaLoraLayer
    from safetensors.torch import save_file

    config = model.peft_config[adapter]
    inner = model.base_model.model
    tensors, ranks = {}, {}
    for name, layer in inner.named_modules():
        if not isinstance(layer, AdaLoraLayer) or adapter not in layer.lora_A:
            continue
        a, e, b = layer.lora_A[adapter], layer.lora_E[adapter], layer.lora_B[adapter]
        if a.shape[0] == 0:
            continue
        scale = layer.scaling[adapter] / (float(layer.ranknum[adapter]) + 1e-5)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (a * e).detach().float().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (b * scale).detach().float().cpu().contiguous()
        ranks[name] = int(a.shape[0])
    if not ranks:
        raise MmloraError("--as-lora: every module of the AdaLoRA adapter was pruned to rank 0; nothing to export")
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    lora = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(ranks), lora_dropout=config.lora_dropout, bias="none",
        fan_in_fan_out=config.fan_in_fan_out, task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        rank_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={re.escape(n): r for n, r in ranks.items() if r != rank},
    )
    out.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return ranks


def _export_as_lora(weights, out: Path, atol: float) -> dict:
    """``export_run(..., as_lora=True)``: the run's files with its AdaLoRA adapter rewritten as LoRA,
    checked on a probe batch against the AdaLoRA model."""
    manifest = weights.manifest()
    adalora = [a for a in manifest["adapters"] if a.get("variant") == "adalora"]
    if not adalora:
        kinds = ", ".join(sorted({a.get("variant") or "?" for a in manifest["adapters"]})) or "no adapters"
        raise MmloraError(f"--as-lora: {weights.folder} is not an AdaLoRA run ({kinds}); it converts AdaLoRA adapters")
    loaded = load_run(weights)
    model, processor, recipe = loaded.model, loaded.processor, loaded.recipe
    if is_open_clip(unwrap(model)):
        raise MmloraError("--as-lora: open_clip runs are not supported; export the adapters")
    shutil.copytree(weights.folder, out, dirs_exist_ok=True)
    ranks = {}
    for entry in adalora:
        dest = out / entry["path"]
        shutil.rmtree(dest)
        ranks.update(_adalora_as_lora(model, entry["name"], dest))
        entry.update(variant="lora", converted_from="adalora")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    batch = _probe_batch(processor, recipe)
    batch.pop("labels", None)  # PEFT's AdaLoRA forward adds its regulariser to a loss, and fails in eval mode
    with torch.no_grad():
        before = model(**batch).logits
        after = load_run(find_weights(out)).model(**batch).logits
    diff = float((before - after).abs().max())
    if diff > atol:
        shutil.rmtree(out)
        raise MmloraError(f"--as-lora: the LoRA adapter's outputs differ from AdaLoRA's by {diff:.2e} (> {atol:.0e}); not exported")
    card = weights.card_file.read_text() if weights.card_file.is_file() else ""
    (out / "README.md").write_text(append_to_card(card, {
        "export": f"AdaLoRA adapter as LoRA: {len(ranks)} modules at their allocated ranks "
                  f"({min(ranks.values())}..{max(ranks.values())}; `rank_pattern` in the adapter config)",
        "check": f"max |logits(LoRA) - logits(AdaLoRA)| = {diff:.2e} on a probe batch",
    }))
    return {"out": str(out), "merged": False, "as_lora": True, "max_abs_diff": diff, "modules": len(ranks)}


def export_run(path: str | Path, out: str | Path, merge: bool = False, atol: float = 1e-4,
               int4_group_size: int | None = None, as_lora: bool = False) -> dict:
    """Export a run (see module docstring). Returns what was written and, for a merge, the check.

    ``int4_group_size`` (with ``merge``): after merging, quantize the linear layers of the run's
    quantized modalities to INT4 with this group size; the probe-batch difference is then the
    re-quantization error, recorded rather than checked."""
    if find_weights(path) is None and (Path(path) / "config.json").is_file():
        raise MmloraError(f"{path} is already a merged model")
    weights, out = require_weights(path, "export"), Path(out)
    folder = weights.folder
    if out.exists() and any(out.iterdir()):
        raise MmloraError(f"{out} exists and is not empty")
    if int4_group_size is not None and not merge:
        raise MmloraError("re-quantizing to INT4 applies to a merged export: add --merge")
    if as_lora:
        if merge:
            raise MmloraError("--as-lora writes adapters; leave out --merge (a merged model has no adapters to convert)")
        return _export_as_lora(weights, out, atol)
    if not merge:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        return {"out": str(out), "merged": False}
    loaded = load_run(weights, dequantize_base=True)
    model, processor, recipe = loaded.model, loaded.processor, loaded.recipe
    if is_open_clip(unwrap(model)):
        raise MmloraError("merged export of open_clip models is not supported; export the adapters")
    batch = _probe_batch(processor, recipe)
    batch.pop("labels", None)
    with torch.no_grad():
        before = model(**batch).logits
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        qalora_merged = merge_qalora(merged)
        after = merged(**batch).logits
        diff = float((before - after).abs().max())
        if diff > atol:
            raise MmloraError(f"merged outputs differ from the adapter outputs by {diff:.2e} (> {atol:.0e}); not exported")
        requantized: list[str] = []
        if int4_group_size is not None:
            requantized = quantize_linears(merged, _quantized_linears(merged, recipe), int4_group_size)
            if not requantized:
                raise MmloraError("--int4: the run has no 4bit/8bit or qalora modality to re-quantize")
            diff = float((before - merged(**batch).logits).abs().max())
    # The base was loaded quantized and then dequantized: the merged model is a plain fp32 model, and
    # its config must not tell from_pretrained to quantize it again.
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("is_loaded_in_4bit", False),
                        ("is_loaded_in_8bit", False), ("quantization_method", None)):
        if hasattr(merged, attr):
            setattr(merged, attr, value)
    int4 = int4_layers(merged)
    if int4:
        how = (f"QA-LoRA adapters folded into the INT4 zero points of {len(qalora_merged)} layers"
               if qalora_merged else "")
        if requantized:
            how = f"merged, then {len(requantized)} layers re-quantized to INT4 (group size {int4_group_size})"
        save_int4_model(merged, out, {"source": str(folder), "how": how})
    else:
        merged.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    check = ("max |logits(INT4 re-quantized) - logits(adapters)|" if requantized
             else "max |logits(merged) - logits(adapters)|")
    card = weights.card_file.read_text() if weights.card_file.is_file() else ""
    (out / "README.md").write_text(append_to_card(card, {
        "export": ("INT4 model: " + how) if int4 else "adapters merged into the (dequantized) base",
        "merge check": f"{check} = {diff:.2e} on a probe batch",
    }))
    (out / "mmlora_export.json").write_text(json.dumps({"source": str(folder), "max_abs_diff": diff,
                                                        "int4_layers": len(int4)}, indent=2) + "\n")
    return {"out": str(out), "merged": True, "max_abs_diff": diff, "int4_layers": len(int4),
            "requantized": bool(requantized)}


