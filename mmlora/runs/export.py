"""Load what a run produced, answer an image with it, and export it.

* :func:`load_run` — a run folder (its ``final/``, or a checkpoint folder) → the base model in the
  precision the run trained it in, with the run's adapters and fully trained modules, and its
  processor; an exported merged folder loads as a plain model.
* :func:`export_run` — adapters-only (a copy of ``final/``: PEFT folders, full modules, manifest,
  processor, model card) or ``merge=True``: a quantized base is dequantized, the adapters are merged
  into it, and the result is saved as an ordinary transformers checkpoint. A merge is checked:
  merged outputs must equal the adapter model's outputs on a probe batch. QA-LoRA adapters merge
  into their INT4 zero points, so such a run exports an INT4 model (``mmlora.adapters.int4``);
  ``int4_group_size`` re-quantizes the merged layers of a run's quantized modalities to INT4
  (the QLoRA → merge → INT4 path that QA-LoRA is compared against).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from mmlora.errors import MmloraError


def run_folder(path: str | Path) -> Path:
    """The folder with ``manifest.json`` for a run path (run root → ``final/``)."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / "manifest.json").is_file():
            return candidate
    if (path / "config.json").is_file():
        return path  # an exported merged model
    raise MmloraError(f"{path}: not a run (no final/manifest.json) or an exported model (no config.json)")




def load_run(path: str | Path, dequantize_base: bool = False):
    """``(model, processor, recipe)`` for a run; ``model`` carries the run's adapters (PEFT)."""
    from transformers import AutoProcessor

    from mmlora.config.loading import load_recipe
    from mmlora.runs.save import load_placement
    from mmlora.models.precision import load_for_training

    from mmlora.adapters.int4 import INT4_MANIFEST, load_int4_model

    folder = run_folder(path)
    if (folder / INT4_MANIFEST).is_file():
        return load_int4_model(folder), AutoProcessor.from_pretrained(folder), None
    if not (folder / "manifest.json").is_file():
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder), None
    recipe = load_recipe(folder / "recipe.yaml")
    base, _ = load_for_training(recipe.model, recipe.placement, recipe.train.quantization)
    if dequantize_base:
        dequantize(base)
    model = load_placement(base, folder)
    processor = AutoProcessor.from_pretrained(folder) if (folder / "processor_config.json").is_file() else None
    return model.eval(), processor, recipe


def _probe_batch(processor, recipe) -> dict[str, torch.Tensor]:
    """A real batch from the run's validation (or training) data for the merge check."""
    from mmlora.data.build import read_dataset
    from mmlora.data.processing import ConversationEncoder
    from mmlora.data.samples import Sample

    specs = (recipe.data.val or recipe.data.train) if recipe and recipe.data else []
    for spec in specs:
        try:
            records = [r for r in read_dataset(spec)[:8] if isinstance(r, Sample)]
        except MmloraError:
            continue
        if records:
            from mmlora.data.batching import Collator

            enc = ConversationEncoder(processor, recipe.data.max_length)
            return Collator(processor.tokenizer.pad_token_id)([enc.encode(r) for r in records[:2]])
    ids = torch.arange(3, 19).reshape(2, 8)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _quantized_linears(model: nn.Module, recipe) -> list[str]:
    """Linear layers (heads excepted) of the modalities a recipe quantizes (4bit, 8bit) or places with qalora."""
    from mmlora.models.modality import discover_modalities
    from mmlora.models.layers import is_linear

    mmap = discover_modalities(model, recipe.model.modalities)
    specs = dict(recipe.placement.items())
    chosen = {n for n, s in specs.items() if s.precision in ("4bit", "8bit") or s.mode == "qalora"}
    return [n for n, m in model.named_modules() if n and mmap.modality_of(n) in chosen and n not in mmap.heads
            and is_linear(m) and type(m) is nn.Linear]


def export_run(path: str | Path, out: str | Path, merge: bool = False, atol: float = 1e-4,
               int4_group_size: int | None = None) -> dict:
    """Export a run (see module docstring). Returns what was written and, for a merge, the check.

    ``int4_group_size`` (with ``merge``): after merging, quantize the linear layers of the run's
    quantized modalities to INT4 with this group size; the probe-batch difference is then the
    re-quantization error, recorded rather than checked."""
    from mmlora.runs.card import append_to_card

    folder, out = run_folder(path), Path(out)
    if out.exists() and any(out.iterdir()):
        raise MmloraError(f"{out} exists and is not empty")
    if int4_group_size is not None and not merge:
        raise MmloraError("re-quantizing to INT4 applies to a merged export: add --merge")
    if not merge:
        shutil.copytree(folder, out, dirs_exist_ok=True)
        return {"out": str(out), "merged": False}
    model, processor, recipe = load_run(folder, dequantize_base=True)
    if recipe is None:
        raise MmloraError(f"{folder} is already a merged model")
    from mmlora.models.modality import is_open_clip, unwrap

    if is_open_clip(unwrap(model)):
        raise MmloraError("merged export of open_clip models is not supported; export the adapters")
    batch = _probe_batch(processor, recipe)
    batch.pop("labels", None)
    from mmlora.adapters.int4 import int4_layers, quantize_linears, save_int4_model
    from mmlora.adapters.qalora import merge_qalora

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
    card = (folder / "README.md").read_text() if (folder / "README.md").is_file() else ""
    (out / "README.md").write_text(append_to_card(card, {
        "export": ("INT4 model: " + how) if int4 else "adapters merged into the (dequantized) base",
        "merge check": f"{check} = {diff:.2e} on a probe batch",
    }))
    (out / "mmlora_export.json").write_text(json.dumps({"source": str(folder), "max_abs_diff": diff,
                                                        "int4_layers": len(int4)}, indent=2) + "\n")
    return {"out": str(out), "merged": True, "max_abs_diff": diff, "int4_layers": len(int4),
            "requantized": bool(requantized)}


@torch.no_grad()
def predict(model, processor, image_path: str | Path, prompt: str, max_new_tokens: int = 64) -> str:
    """Greedy answer to ``prompt`` about one image."""
    from mmlora.data.samples import load_image

    image = load_image(Path(image_path), str(image_path), None)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conv, add_generation_prompt=True)
    batch = processor(images=[image], text=[text], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
