"""Which modules count as linear layers: plain, bitsandbytes-quantized and transposed (GPT-2's Conv1D).

Placement (what adapters may wrap), precision checks and exports all ask the same question here.
"""

from __future__ import annotations

from torch import nn


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and its quantized / transposed cousins that PEFT's LoRA layers wrap."""
    name = type(module).__name__
    return isinstance(module, nn.Linear) or name in {"Linear4bit", "Linear8bitLt", "Conv1D"}


def is_adaptable(module: nn.Module) -> bool:
    """Layers PEFT's LoRA can wrap (for explicit patterns)."""
    return is_linear(module) or isinstance(module, (nn.Embedding, nn.Conv2d, nn.Conv1d))

