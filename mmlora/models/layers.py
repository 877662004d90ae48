"""Which modules count as linear layers: plain, bitsandbytes-quantized and transposed (GPT-2's Conv1D),
and which modules only wrap one (Gemma 4's clippable linears).

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


def linear_wrappers(model: nn.Module) -> dict[str, str]:
    """``{inner linear's name: wrapper's name}`` for every module that only wraps one linear layer: no
    parameter of its own and a single child, a linear one that carries the weight (Gemma 4's clippable
    linears clamp the input and output of one ``nn.Linear``; their buffers are the bounds).

    The wrapper's name says the layer's role (``self_attn.q_proj``); the linear inside it
    (``self_attn.q_proj.linear``) is what an adapter wraps, so the wrapper's clamps still apply around
    the adapted output."""
    found = {}
    for name, module in model.named_modules():
        children = list(module.named_children())
        if (len(children) == 1 and is_linear(children[0][1]) and not is_linear(module)
                and next(module.parameters(recurse=False), None) is None):
            found[f"{name}.{children[0][0]}" if name else children[0][0]] = name
    return found
