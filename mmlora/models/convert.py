"""Convert an open_clip ViT image tower into a transformers ``CLIPVisionModel``.

LLaVA's vision tower is a transformers CLIP vision model; the shapes world's CLIP is an open_clip
model. This maps open_clip's weights onto transformers' layout (the fused q/k/v input projection is
split, ``conv1`` becomes the patch embedding, ``ln_pre``/``ln_post`` the pre/post layer norms) with
GELU as the activation, as open_clip uses. ``image_size`` may differ from the CLIP's own: the
position embeddings are then resized by bicubic interpolation over the patch grid (as when
fine-tuning a ViT at another resolution).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmlora.models.unfuse import fuse_state_dict


def _interpolate_positions(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """``[1 + g*g, D]`` → ``[1 + n*n, D]`` (class position kept, patch grid resized bicubically)."""
    cls, grid = pos[:1], pos[1:]
    g = int(round(grid.shape[0] ** 0.5))
    if g == new_grid:
        return pos
    img = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    img = torch.nn.functional.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)])


def clip_vision_config(open_clip_cfg: dict, image_size: int | None = None):
    from transformers import CLIPVisionConfig

    v = open_clip_cfg["vision_cfg"]
    width = v["width"]
    heads = width // v.get("head_width", 64)
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"],
        num_attention_heads=heads,
        image_size=image_size or v["image_size"],
        patch_size=v["patch_size"],
        projection_dim=open_clip_cfg["embed_dim"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def open_clip_to_hf_vision(state: dict[str, torch.Tensor], open_clip_cfg: dict, image_size: int | None = None):
    """``(CLIPVisionConfig, state dict for CLIPVisionModel)`` from an open_clip CLIP state dict
    (fused or unfused attention keys)."""
    state = fuse_state_dict({k: v for k, v in state.items() if k.startswith("visual.")})
    config = clip_vision_config(open_clip_cfg, image_size)
    grid = config.image_size // config.patch_size
    out = {
        "embeddings.class_embedding": state["visual.class_embedding"],
        "embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "embeddings.position_embedding.weight": _interpolate_positions(state["visual.positional_embedding"], grid),
        "pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "post_layernorm.weight": state["visual.ln_post.weight"],
        "post_layernorm.bias": state["visual.ln_post.bias"],
    }
    width = config.hidden_size
    for i in range(config.num_hidden_layers):
        src, dst = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
        w, b = state[src + "attn.in_proj_weight"], state[src + "attn.in_proj_bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[dst + f"self_attn.{name}.weight"] = w[j * width:(j + 1) * width]
            out[dst + f"self_attn.{name}.bias"] = b[j * width:(j + 1) * width]
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, c in pairs.items():
            out[dst + c + ".weight"] = state[src + a + ".weight"]
            out[dst + c + ".bias"] = state[src + a + ".bias"]
    return config, {k: v.clone().contiguous() for k, v in out.items()}


def hf_vision_from_open_clip(folder: str | Path, image_size: int | None = None):
    """A ``CLIPVisionModel`` with the image tower of the open_clip folder ``folder``."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    folder = Path(folder)
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    config, state = open_clip_to_hf_vision(load_file(str(folder / "open_clip_model.safetensors")), cfg, image_size)
    model = CLIPVisionModel(config)
    # transformers 5 keeps the tower at the top of CLIPVisionModel; 4.x nested it under vision_model.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
    missing, unexpected = model.load_state_dict({prefix + k: v for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"open_clip → CLIPVisionModel: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()
