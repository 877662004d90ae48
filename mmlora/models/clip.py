"""Tiny open_clip CLIP models: architectures are JSON configs (``open_clip_configs/``), registered
with open_clip on first use, and saved in open_clip's own folder format (``open_clip_config.json`` +
``open_clip_model.safetensors`` + tokenizer files), which loads with
``open_clip.create_model_and_transforms("local-dir:PATH")`` exactly as a hub checkpoint does.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from mmlora.models.corpus import tokenizer_corpus
from mmlora.models.tokenizer import build_clip_tokenizer
from mmlora.optional import require

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONFIG_DIR = Path(__file__).resolve().parent / "open_clip_configs"
_registered = False


def register_configs() -> None:
    """Register mmlora's architecture JSONs with open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip = require("open_clip", "clip", "an open_clip CLIP model")
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def model_config(arch: str) -> dict[str, Any]:
    return json.loads((CONFIG_DIR / f"{arch}.json").read_text())


def build_tiny_clip(arch: str = "mmlora-clip-tiny", seed: int = 0, texts: Sequence[str] | None = None):
    """A randomly initialised open_clip CLIP of architecture ``arch`` and its tokenizer, trained on
    ``texts`` (default: the shipped corpus, ``mmlora.models.corpus``)."""
    import torch

    open_clip = require("open_clip", "clip", "building an open_clip CLIP model")
    register_configs()
    cfg = model_config(arch)
    text_cfg = cfg["text_cfg"]
    tokenizer = build_clip_tokenizer(tokenizer_corpus() if texts is None else texts, vocab_size=text_cfg["vocab_size"], context_length=text_cfg["context_length"])
    if len(tokenizer) > text_cfg["vocab_size"] or tokenizer.eos_token_id != text_cfg["eos_id"]:
        raise RuntimeError(f"{arch}: tokenizer (size {len(tokenizer)}, eos {tokenizer.eos_token_id}) does not fit the config")
    torch.manual_seed(seed)
    # open_clip logs a warning when it builds without pretrained weights: that is the point here.
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR
    try:
        model = open_clip.create_model(arch, pretrained=None)
    finally:
        root.setLevel(level)
    return model.eval(), tokenizer, cfg


def save_clip(model, tokenizer, model_cfg: dict[str, Any], out_dir: str | Path) -> Path:
    """Write the open_clip folder format (see module docstring)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    tokenizer.save_pretrained(out)
    return out


def image_settings(model) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(input size, mean, std)`` of an open_clip model's image tower."""
    visual = model.visual
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    return int(size), tuple(visual.image_mean or CLIP_MEAN), tuple(visual.image_std or CLIP_STD)


def save_clip_processor(model_dir: Path, tokenizer, folder: Path) -> None:
    """Write what a CLIP run needs to rebuild its preprocessing: the open_clip config and tokenizer."""
    config = json.loads((Path(model_dir) / "open_clip_config.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer.save_pretrained(folder)
