"""Optional dependencies: import a heavy library that lives in an extra, or say in one line how to get it.

The core install is what planning and training need; the rest is in extras (``pyproject.toml``)::

    quant   bitsandbytes        4-bit / 8-bit quantized modalities (QLoRA, QDoRA)
    clip    open_clip_torch     open_clip CLIP models (contrastive training, segmentation, few-shot)
    eval    pycocoevalcap       caption metrics (METEOR, SPICE and the PTB tokenizer also need Java)
    serve   fastapi, uvicorn    the HTTP API and demo page
    plot    matplotlib          loss curves in run folders
    data    datasets            the Hugging Face ``datasets`` reader (``hf``)

``require("bitsandbytes", "quant", "4-bit/8-bit quantization")`` returns the module, or raises
:class:`~mmlora.errors.MmloraError` with ``4-bit/8-bit quantization needs bitsandbytes (pip install
'mmlora[quant]')``, which the CLI prints as one line. ``make setup`` installs every extra.

:func:`quiet_known_noise` silences the few lines libraries print on every command that are known to
be harmless (listed in ``KNOWN_LOG_LINES`` and ``KNOWN_WARNINGS``, each matched by its logger or
category and its message); every other warning still shows.
"""

from __future__ import annotations

import importlib
import logging
import re
import warnings
from types import ModuleType

from mmlora.errors import MmloraError

#: Top-level module name → the pip package that provides it (the default is the module name).
PIP_NAMES: dict[str, str] = {
    "bitsandbytes": "bitsandbytes",
    "open_clip": "open_clip_torch",
    "pycocoevalcap": "pycocoevalcap",
    "matplotlib": "matplotlib",
    "datasets": "datasets",
    "fastapi": "fastapi",
    "num2words": "num2words",
    "uvicorn": "uvicorn",
}


def pip_name(module: str) -> str:
    """The pip package that provides ``module`` (its top-level package decides)."""
    top = module.split(".", 1)[0]
    return PIP_NAMES.get(top, top)


def _is_missing(exc: ImportError, module: str) -> bool:
    """Whether ``exc`` says ``module`` (or a package above it) is not installed, rather than that it
    is installed and failed while importing."""
    if not isinstance(exc, ModuleNotFoundError) or exc.name is None:
        return False
    return module == exc.name or module.startswith(exc.name + ".")


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import and return ``module`` (as ``importlib.import_module`` does), which the extra ``extra``
    installs; ``purpose`` says what needs it, for the message when it cannot be imported."""
    try:  # the top package first: a submodule imported earlier stays cached after its package is gone
        importlib.import_module(module.partition(".")[0])
        return importlib.import_module(module)
    except ImportError as exc:
        package = pip_name(module)
        fix = f"pip install 'mmlora[{extra}]'"
        if _is_missing(exc, module):
            raise MmloraError(f"{purpose} needs {package} ({fix})") from exc
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MmloraError(f"{purpose} needs {package}, which is installed but failed to import "
                          f"({reason}); reinstall it: {fix}") from exc


#: ``(logger, message regex)``: log lines known to be harmless, matched against the formatted message.
KNOWN_LOG_LINES: tuple[tuple[str, str], ...] = (
    # bitsandbytes >= 0.49 on a CPU with AVX512-BF16 tries the optional ``kernels`` package at import,
    # even when nothing is 4-bit; without it the CPU path simply uses bitsandbytes' own kernel.
    ("bitsandbytes.backends.cpu.ops",
     r"Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"),
)
#: ``(category, message regex, module regex)``: warnings known to be harmless (``warnings.filterwarnings``).
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # PEFT probes ``getattr(model, "is_gradient_checkpointing", True)`` when it wraps or loads a model;
    # transformers 5 deprecated the name. Nothing for a user to change.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # PEFT looks for the base's config.json to decide whether to save resized embeddings; a preset name
    # or an offline hub id has none to look up. mmlora never resizes a base's vocabulary, so PEFT's
    # assumption ("the vocabulary was not modified") is right.
    (UserWarning, r"Could not find a config file in .* - will assume that the vocabulary was not modified",
     r"peft\.utils\.save_and_load"),
    # AdaLoRA modules its budget pruned to rank 0 save as (0, n) / (n, 0) factors; PEFT takes any empty
    # factor for an ungathered ZeRO-3 shard. Matched only when every tensor it names is 2-D with a zero
    # rank (ZeRO-3's ungathered shards are 1-D).
    (UserWarning, r"Adapter '[^']*': \d+ LoRA tensor\(s\) have invalid shape: ([^:]+:\((0, \d+|\d+, 0)\)(, |\. ))+A 1-D",
     r"peft\.utils\.save_and_load"),
    # A saved AdaLoRA config's rank_pattern names the lora_E of each module (PEFT's own format, which
    # its loader then uses to resize the modules); PEFT's generic check expects module names there.
    (RuntimeWarning, r"The following rank_pattern keys did not match any targeted module and were ignored: "
                     r"\[('[^']*\.lora_E(\.[^']*)?'(, )?)+\]", r"peft\.tuners\.tuners_utils"),
)


class _KnownNoise(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_known_noise() -> None:
    """Silence exactly the lines in ``KNOWN_LOG_LINES`` and ``KNOWN_WARNINGS`` (call it before the
    libraries are imported; calling it again changes nothing)."""
    for name, pattern in KNOWN_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_KnownNoise(pattern))
    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
