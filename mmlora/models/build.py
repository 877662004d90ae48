"""Load the model a recipe names: with weights for training, or on the meta device for planning.

``meta=True`` builds the architecture from its config alone (a recipe's ``model.config`` file, or the
checkpoint folder's config): no weights are read, so planning a 7B model takes seconds. open_clip
models always get their attention unfused into q/k/v/out linear layers (``mmlora.models.unfuse``).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from mmlora.config.schema import ModelSpec
from mmlora.errors import MmloraError
from mmlora.models.loading import load_clip, resolve_pretrained
from mmlora.models.unfuse import unfuse_attention
from mmlora.optional import require


def _config_path(spec: ModelSpec) -> Path:
    if spec.config:
        path = Path(spec.config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise MmloraError(f"model.config: no config file at {spec.config}")
        return path
    resolved = resolve_pretrained(spec.name)
    if not isinstance(resolved, Path):
        raise MmloraError(f"model.name {spec.name!r} is not available locally; set model.config to plan without it")
    clip_cfg = resolved / "open_clip_config.json"
    return clip_cfg if clip_cfg.is_file() else resolved / "config.json"


def load_model(spec: ModelSpec, meta: bool = False, **kwargs) -> nn.Module:
    """The recipe's model (a transformers image-text-to-text model or an unfused open_clip CLIP)."""
    import torch

    if meta:
        cfg_path = _config_path(spec)
        if cfg_path.name == "open_clip_config.json":
            open_clip = require("open_clip", "clip", "an open_clip CLIP model")
            model_cfg = json.loads(cfg_path.read_text())["model_cfg"]
            with torch.device("meta"):
                model = open_clip.CLIP(**model_cfg)
            unfuse_attention(model)
            return model
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(cfg_path.parent if cfg_path.name == "config.json" else cfg_path,
                                            trust_remote_code=spec.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForImageTextToText.from_config(config, trust_remote_code=spec.trust_remote_code)

    path = resolve_pretrained(spec.name)
    if isinstance(path, Path) and (path / "open_clip_config.json").is_file():
        model, _, _ = load_clip(path)
        unfuse_attention(model)
        return model
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=spec.trust_remote_code, **kwargs)
