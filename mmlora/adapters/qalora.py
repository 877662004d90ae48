"""QA-LoRA: LoRA on an INT4 group-wise base whose update merges into the zero points.

Written here rather than taken from PEFT because PEFT's ``use_qalora`` only wraps GPTQ checkpoints
(an auto-gptq / gptqmodel ``QuantLinear``): it cannot quantize a plain model itself, and its merge
goes back to float weights. This layer quantizes any ``nn.Linear`` with mmlora's affine INT4
(``mmlora.adapters.int4``) and keeps the merged model INT4.

The adapter sees the input pooled per quantization group: the group's mean times its size ``k``
(``pooled = k * mean(x[..., g*k:(g+1)*k])``, i.e. the group sum), ``A [r, G]``, ``B [out, r]``,
``y = x @ W_deq.T + b + scaling * B A pooled``. Its update to the weight is therefore constant within a
group, ``dW[o, i] = scaling * (B A)[o, g(i)]``: exactly a LoRA whose ``A`` repeats each column ``k``
times, on the same scale as plain LoRA (with the bare mean, the adapter's output moves ``k`` times
slower; PEFT's GPTQ QA-LoRA rescales its pooled input too, by ``G``). A constant per (row, group) is a
shift of that group's zero point: ``W_deq + dW = s * (q - z')`` with ``z' = z - scaling * (B A) / s``.
After the merge the integer codes ``q`` and the scales ``s`` are unchanged; only the (float) zero
points move.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from mmlora.errors import MmloraError
from mmlora.adapters.int4 import Int4Linear, replace_module

#: Saved beside the PEFT adapters: ``<module>.qalora_A.weight`` / ``<module>.qalora_B.weight`` per layer.
class QALoraLinear(Int4Linear):
    """An :class:`Int4Linear` base plus a group-pooled low-rank adapter (see the module docstring).

    ``qalora_A`` maps ``[..., G] → [..., r]``, ``qalora_B`` maps ``[..., r] → [..., out]``. Parameter
    names contain ``qalora_`` (not ``lora_``) so PEFT's own save never picks them up.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, rank: int, alpha: float,
                 bias: bool = True, dropout: float = 0.0, rslora: bool = False):
        super().__init__(in_features, out_features, group_size, bias)
        groups = in_features // group_size
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.qalora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.qalora_A = nn.Linear(groups, rank, bias=False)
        self.qalora_B = nn.Linear(rank, out_features, bias=False)
        # PEFT's default LoRA init: A Kaiming-uniform, B zero (the adapter starts as the identity update).
        nn.init.kaiming_uniform_(self.qalora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.qalora_B.weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, rank: int = 8, alpha: float = 16.0,
                    dropout: float = 0.0, rslora: bool = False) -> QALoraLinear:
        layer = cls(linear.in_features, linear.out_features, group_size, rank, alpha,
                    bias=linear.bias is not None, dropout=dropout, rslora=rslora)
        layer.load_quantized(linear.weight, linear.bias)
        return layer.to(linear.weight.device)

    def options(self) -> dict:
        """What rebuilds this layer (written to a saved placement's manifest)."""
        dropout = self.qalora_dropout.p if isinstance(self.qalora_dropout, nn.Dropout) else 0.0
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora, "group_size": self.group_size,
                "dropout": dropout}

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in]`` → ``[..., G]``: each quantization group's mean times its size (its sum)."""
        return x.unflatten(-1, (-1, self.group_size)).mean(-1) * self.group_size

    def delta_groups(self) -> torch.Tensor:
        """The weight update per (row, group), ``[out, G]``: ``dW[o, i] = delta_groups[o, i // k]``."""
        return self.scaling * (self.qalora_B.weight @ self.qalora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        update = self.qalora_B(self.qalora_A(self.qalora_dropout(self.pool(x))))
        return base + update * self.scaling

    def merged(self) -> Int4Linear:
        """An :class:`Int4Linear` with the update folded into the zero points (codes, scales unchanged)."""
        out = Int4Linear(self.in_features, self.out_features, self.group_size, bias=self.bias is not None)
        with torch.no_grad():
            out.qweight.copy_(self.qweight)
            out.scales.copy_(self.scales)
            out.zeros.copy_(self.zeros - self.delta_groups().float() / self.scales)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out.to(self.qweight.device)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", qalora rank={self.rank}, scaling={self.scaling:g}"


def apply_qalora(model: nn.Module, targets: list[tuple[str, int, float]], group_size: int,
                 dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Quantize each ``(module name, rank, alpha)`` target of ``model`` to INT4 and give it a trainable
    QA-LoRA adapter (only ``qalora_A``/``qalora_B`` require grad). Returns the names replaced."""
    done = []
    for name, rank, alpha in targets:
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            raise MmloraError(f"qalora: {name} is {type(module).__name__}; QA-LoRA quantizes plain nn.Linear "
                              "layers itself (leave this modality's precision unset)")
        layer = QALoraLinear.from_linear(module, group_size, rank, alpha, dropout, rslora)
        layer.qalora_A.requires_grad_(True)
        layer.qalora_B.requires_grad_(True)
        replace_module(model, name, layer)
        done.append(name)
    return done


def qalora_layers(model: nn.Module) -> dict[str, QALoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoraLinear)}


def merge_qalora(model: nn.Module) -> list[str]:
    """Fold every QA-LoRA adapter of ``model`` into its zero points, in place; the layers become
    :class:`Int4Linear`. Returns the names merged."""
    layers = qalora_layers(model)
    for name, layer in layers.items():
        replace_module(model, name, layer.merged())
    return list(layers)


def save_qalora(model: nn.Module, path: str | Path) -> dict[str, dict]:
    """Write every QA-LoRA adapter to a safetensors file — not the quantized base: it is re-derived
    from the base weights, round-to-nearest being deterministic. Returns ``{module: options}`` for
    the manifest."""
    from safetensors.torch import save_file

    layers = qalora_layers(model)
    state = {}
    for name, layer in layers.items():
        state[f"{name}.qalora_A.weight"] = layer.qalora_A.weight.detach().cpu().contiguous()
        state[f"{name}.qalora_B.weight"] = layer.qalora_B.weight.detach().cpu().contiguous()
    save_file(state, str(path))
    return {name: layer.options() for name, layer in layers.items()}


def load_qalora(model: nn.Module, path: str | Path, modules: dict[str, dict]) -> list[str]:
    """Quantize ``model``'s layers named in ``modules`` (``{name: options}`` as :func:`save_qalora`
    returned) and load their adapters from ``path``."""
    from safetensors.torch import load_file

    for name, o in modules.items():
        apply_qalora(model, [(name, int(o["rank"]), float(o["alpha"]))], int(o["group_size"]),
                     float(o.get("dropout", 0.0)), bool(o.get("rslora", False)))
    state = load_file(str(path))
    layers = qalora_layers(model)
    with torch.no_grad():
        for key, value in state.items():
            module, _, param = key.rpartition(".qalora_")
            if module not in layers:
                raise MmloraError(f"{path}: {key} names no QA-LoRA layer of the model")
            getattr(layers[module], f"qalora_{param.split('.')[0]}").weight.copy_(value)
    return list(modules)
