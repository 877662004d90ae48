"""Load a model with each modality in the precision its recipe asks, and verify what loaded.

Quantization goes through transformers' ``BitsAndBytesConfig``: the quantized modalities' linear
layers become bitsandbytes ``Linear4bit`` / ``Linear8bitLt``; every other modality (and the LM head)
is on the config's skip list, derived from the modality map of the model built on the meta device.
One config holds one kind of quantization, so 4-bit and 8-bit modalities in one model are refused
with a clear error. Float modalities are cast to their dtype after load. Afterwards every modality
is checked: a linear layer in the wrong form or a parameter in the wrong dtype stops the run.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mmlora.config.schema import ModelSpec, PlacementSpec, QuantSpec
from mmlora.errors import MmloraError
from mmlora.models.build import load_model
from mmlora.models.layers import is_linear
from mmlora.models.modality import ModalityMap, discover_modalities, is_open_clip
from mmlora.optional import require

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_CLASS = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}

# bitsandbytes' 8-bit matmul warns on every call that it casts fp32 inputs to fp16: expected, and
# it would drown every other warning.
warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")


def modality_precisions(placement: PlacementSpec, mmap: ModalityMap) -> dict[str, str | None]:
    specs = dict(placement.items())
    return {name: (specs[name].precision if name in specs else None) for name in mmap.modalities}


def quantization_config(precisions: dict[str, str | None], mmap: ModalityMap, quant: QuantSpec):
    """``BitsAndBytesConfig`` for the quantized modalities, or None when nothing is quantized."""
    kinds = {p for p in precisions.values() if p in QUANT_CLASS}
    if not kinds:
        return None
    if len(kinds) > 1:
        raise MmloraError(
            "precision: 4bit and 8bit modalities in one model cannot be expressed by one BitsAndBytesConfig; "
            "pick one quantization for the quantized modalities"
        )
    # transformers loads a BitsAndBytesConfig through bitsandbytes: say which extra installs it up front.
    require("bitsandbytes", "quant", f"precision {'/'.join(sorted(kinds))} (QLoRA/QDoRA quantization)")
    from transformers import BitsAndBytesConfig

    kind = kinds.pop()
    skip = [root for name, m in mmap.modalities.items() if precisions[name] != kind for root in m.roots] + list(mmap.heads)
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype], llm_int8_skip_modules=sorted(set(skip)),
            bnb_4bit_quant_storage=torch.uint8 if quant.quant_storage == "uint8" else DTYPES[quant.quant_storage],
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=sorted(set(skip)))


def verify_precision(model: nn.Module, mmap: ModalityMap, precisions: dict[str, str | None]) -> None:
    """Raise if any modality's layers are not in the precision the recipe asked for."""
    problems = []
    for name, module in model.named_modules():
        modality = mmap.modality_of(name)
        want = precisions.get(modality) if modality else None
        if want is None or not is_linear(module) or name in mmap.heads:
            continue
        kind = type(module).__name__
        if want in QUANT_CLASS:
            if kind != QUANT_CLASS[want]:
                problems.append(f"{name} is {kind}, not {QUANT_CLASS[want]} ({modality}: {want})")
        elif kind in QUANT_CLASS.values():
            problems.append(f"{name} is quantized ({kind}) but {modality} asks for {want}")
        elif module.weight.dtype != DTYPES[want]:
            problems.append(f"{name} is {module.weight.dtype}, not {DTYPES[want]} ({modality}: {want})")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise MmloraError("loaded precision differs from the recipe: " + "; ".join(problems[:3]) + more)


def load_for_training(spec: ModelSpec, placement: PlacementSpec, quant: QuantSpec,
                      attn_implementation: str | None = None) -> tuple[nn.Module, ModalityMap]:
    """The recipe's model, each modality in its precision (verified), and its modality map."""

    meta = load_model(spec, meta=True)
    meta_map = discover_modalities(meta, spec.modalities)
    precisions = modality_precisions(placement, meta_map)
    qconfig = quantization_config(precisions, meta_map, quant)
    kwargs = {}
    if is_open_clip(meta):
        if qconfig is not None:
            raise MmloraError("precision: 4bit/8bit is not supported for open_clip models; use bf16, fp16 or fp32")
    else:
        kwargs["dtype"] = torch.float32
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
    del meta
    model = load_model(spec, **kwargs)
    mmap = discover_modalities(model, spec.modalities)
    for name, m in mmap.modalities.items():
        want = precisions.get(name)
        if want in DTYPES:
            for root in m.roots:
                sub = model.get_submodule(root) if root else model
                for pname, p in sub.named_parameters():
                    full = f"{root}.{pname}" if root else pname
                    if mmap.modality_of(full) == name and p.dtype.is_floating_point:
                        p.data = p.data.to(DTYPES[want])
    _keep_4bit_trainable_on_cpu(model)
    verify_precision(model, mmap, precisions)
    return model, mmap


def _keep_4bit_trainable_on_cpu(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a CPU ``Linear4bit``'s weight for an AVX512-BF16 inference kernel
    the first time it runs in eval mode without grad (e.g. a validation pass), and from then on uses
    that kernel, which has no backward: every adapter below it silently stops getting gradient (our
    gradient-flow audit caught it). Training models opt out of the repacking."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def dequantize(model: nn.Module) -> list[str]:
    """Replace bitsandbytes 4-bit / 8-bit linear layers by fp32 ``nn.Linear`` holding the exact
    dequantized weights (what the quantized layer computed with). Returns the names replaced."""
    bnb = require("bitsandbytes", "quant", "dequantizing 4-bit/8-bit layers")
    replaced = []
    for name, module in list(model.named_modules()):
        kind = type(module).__name__
        if kind not in ("Linear4bit", "Linear8bitLt"):
            continue
        if kind == "Linear4bit":
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        else:
            w = module.weight
            weight = (w.CB.float() * w.SCB.float().unsqueeze(1) / 127.0) if getattr(w, "CB", None) is not None else w.data.float()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.reshape(module.out_features, module.in_features))
            if module.bias is not None:
                linear.bias.copy_(module.bias.float())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        replaced.append(name)
    return replaced

