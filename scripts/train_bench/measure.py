"""Measurement: peak memory above the post-load baseline, step clocks, and a per-component time
breakdown from module hooks.

Memory on CPU is the process's resident set: the baseline is the RSS after the model, adapters and
data are set up; the peak is the kernel's high-water mark (``VmHWM``), reset to the baseline just
before training by writing ``5`` to ``/proc/self/clear_refs``, so nothing from loading counts and no
sampling can miss a short peak. On a GPU: ``max_memory_allocated`` above ``memory_allocated`` at the
same point.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def touch_weights(model: nn.Module) -> None:
    """Read every parameter and buffer once: safetensors weights are memory-mapped, and without this
    the first forward pass would page the whole model in and count it as training memory."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


class MemoryMeter:
    """``start()`` after loading, ``peak()`` at the end of training: bytes above the baseline."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.baseline = 0

    def start(self) -> None:
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current RSS
            self.baseline = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.baseline
        return _status_kib("VmHWM") * 1024 - self.baseline


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def cpu_seconds() -> float:
    """CPU time of this process (all threads): on a shared machine a steadier measure of the work
    done than wall time, which also counts the time other processes hold the cores."""
    return time.process_time()


class Breakdown:
    """Wall time per component of a LLaVA training step, from hooks (a separate, profiled pass).

    Forward: pre/post hooks on the vision tower, the projector and the language model (embedding
    lookup to final norm); the head and loss are the time from the final norm to the call of
    backward. Backward: a gradient hook on each boundary tensor (the final norm's output, the first
    decoder layer's input, the projector's input) marks when backward leaves that component, so the
    span between two marks is that component's backward, recomputation under checkpointing included.
    Forward hooks that fire during backward (checkpoint recomputation) are ignored. ``optimizer``
    covers gradient clipping and the optimizer step; ``data`` the dataset's encoding and collation,
    counted per batch (``batches``): Accelerate's data loader fetches one batch ahead, so the batches
    fetched within a window of steps are not always the steps' own.
    """

    COMPONENTS = ("vision", "projector", "language_layers", "head_loss", "optimizer", "data")

    def __init__(self, model: nn.Module, device: torch.device):
        self.device, self.seconds = device, defaultdict(float)
        self.batches = 0
        self.in_backward = False
        self.marks: dict[str, float] = {}
        self.handles: list[Any] = []
        base = _llava_base(model)
        lm = base.model.language_model
        self._span(base.model.vision_tower, "vision")
        self._span(base.model.multi_modal_projector, "projector")
        self._span(lm, "language_layers")
        self.handles.append(lm.norm.register_forward_hook(self._after_norm))
        self.handles.append(lm.layers[0].register_forward_pre_hook(self._before_first_layer, with_kwargs=True))
        self.handles.append(base.model.multi_modal_projector.register_forward_pre_hook(self._before_projector))

    def _t(self) -> float:
        return now(self.device)

    def _span(self, module: nn.Module, name: str) -> None:
        def pre(*_):
            if not self.in_backward:
                self.marks[name] = self._t()

        def post(*_):
            if not self.in_backward and name in self.marks:
                self.seconds[name] += self._t() - self.marks.pop(name)

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _grad_mark(self, tensor: torch.Tensor, name: str) -> None:
        if tensor.requires_grad and torch.is_grad_enabled():
            tensor.register_hook(lambda g: self.marks.__setitem__(name, self._t()))

    def _after_norm(self, module, args, output):
        if not self.in_backward:
            self.marks["norm_done"] = self._t()
            self._grad_mark(output, "bwd_head_done")

    def _before_first_layer(self, module, args, kwargs):
        if not self.in_backward:
            hidden = args[0] if args else kwargs.get("hidden_states")
            self._grad_mark(hidden, "bwd_layers_done")

    def _before_projector(self, module, args):
        if not self.in_backward:
            self._grad_mark(args[0], "bwd_projector_done")

    def backward(self, run: Callable[[], Any]) -> Any:
        """Run ``run`` (the backward call) and attribute its time to components."""
        start = self._t()
        if "norm_done" in self.marks:
            self.seconds["head_loss"] += start - self.marks.pop("norm_done")
        self.in_backward = True
        try:
            out = run()
        finally:
            self.in_backward = False
        end = self._t()
        m = self.marks
        head = m.pop("bwd_head_done", start)
        layers = m.pop("bwd_layers_done", head)
        projector = m.pop("bwd_projector_done", None)
        self.seconds["head_loss"] += head - start
        self.seconds["language_layers"] += layers - head
        if projector is None:  # nothing below the projector is in the graph
            self.seconds["projector"] += end - layers
        else:
            self.seconds["projector"] += projector - layers
            self.seconds["vision"] += end - projector
        return out

    def timed(self, name: str, fn: Callable, batch: bool = False) -> Callable:
        def wrapper(*args, **kwargs):
            self.batches += batch
            t = self._t()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += self._t() - t

        return wrapper

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _llava_base(model: nn.Module) -> nn.Module:
    """The ``LlavaForConditionalGeneration`` inside PEFT / Accelerate wrappers."""
    for m in model.modules():
        if type(m).__name__ == "LlavaForConditionalGeneration":
            return m
    raise TypeError("no LlavaForConditionalGeneration inside the model")
