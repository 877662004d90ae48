"""Tiny random instances of any image-text-to-text architecture in transformers, from its config.

Placement must work on every VLM family without per-model path tables, so tests need small models of
many families. This shrinks a model type's default config structurally: in the config and every
nested sub-config (text, vision, audio, ...), layer counts, widths, heads and vocabulary are cut to
toy sizes while keeping the divisibility rules (width = heads x head_dim) and per-layer lists in step.
Nothing is downloaded; ``device="meta"`` builds without allocating weights.

Usage::

    model = build_tiny("qwen2_vl")             # random weights, a few hundred thousand params
    model = build_tiny("mllama", device="meta")
"""

from __future__ import annotations

from typing import Any

LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
WIDTH = HEADS * HEAD_DIM  # 64
EXPERTS = 4

_LAYER_KEYS = (
    "layers", "num_hidden_layers", "num_layers", "depth", "n_layers", "encoder_layers", "decoder_layers", "num_global_layers",
)
_WIDTH_KEYS = ("hidden_size", "out_hidden_size", "d_model", "embed_dim", "width", "n_embd", "vision_hidden_size")
_FFN_KEYS = ("intermediate_size", "ffn_dim", "mlp_dim", "encoder_ffn_dim", "decoder_ffn_dim")
_HEAD_KEYS = ("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_LIST_PER_LAYER = ("layer_types", "sliding_window_pattern_list", "mlp_layer_types", "attn_layer_types")


def _shrink(cfg: Any, seen: set[int], width: int = WIDTH, heads: int = HEADS) -> None:
    """Cut ``cfg`` and its sub-configs to toy size in place. One width for every tower keeps the
    shapes that connect them (projector in/out, merger output = text width) consistent."""
    from transformers import PretrainedConfig

    if id(cfg) in seen:
        return
    seen.add(id(cfg))
    d = cfg.__dict__
    for key in _LAYER_KEYS:
        if isinstance(d.get(key), int) and d[key] > LAYERS:
            setattr(cfg, key, LAYERS)
    for key in _WIDTH_KEYS:
        if isinstance(d.get(key), int) and d[key] > width:
            setattr(cfg, key, width)
    for key in _FFN_KEYS:
        if isinstance(d.get(key), int) and d[key] > 2 * width:
            setattr(cfg, key, 2 * width)
    for key in _HEAD_KEYS:
        if isinstance(d.get(key), int) and d[key] > heads:
            setattr(cfg, key, heads)
    if isinstance(d.get("num_key_value_heads"), int) and d["num_key_value_heads"] > KV_HEADS:
        cfg.num_key_value_heads = KV_HEADS
    if isinstance(d.get("head_dim"), int):
        cfg.head_dim = HEAD_DIM
    for key in _EXPERT_KEYS:
        if isinstance(d.get(key), int) and d[key] > EXPERTS:
            setattr(cfg, key, EXPERTS)
    if isinstance(d.get("num_experts_per_tok"), int) and d["num_experts_per_tok"] > 2:
        cfg.num_experts_per_tok = 2
    for key in _LIST_PER_LAYER:
        if isinstance(d.get(key), list) and len(d[key]) > LAYERS:
            setattr(cfg, key, d[key][:LAYERS])
    # Per-layer overrides (Gemma 4's wider full-attention heads) are keyed by layer index: those past the
    # new depth go. What is left stays set, if empty: a config saved without it rebuilds the defaults.
    overrides = d.get("_heterogeneity_spec")
    if overrides is not None:
        cfg.per_layer_config = {i: o for i, o in overrides.per_layer_overrides.items() if i < LAYERS}
    for key, value in list(d.items()):
        # Multimodal RoPE splits each head's rotary half into sections: rescale them to the new head_dim.
        if isinstance(value, dict) and isinstance(value.get("mrope_section"), list):
            sec = value["mrope_section"]
            scaled = [max(1, round(x * (HEAD_DIM // 2) / sum(sec))) for x in sec]
            scaled[0] += HEAD_DIM // 2 - sum(scaled)
            setattr(cfg, key, {**value, "mrope_section": scaled})
        # Lists of layer indices (cross-attention layers, feature taps) must point inside the new depth.
        if "layer" in key and isinstance(value, list) and value and all(type(v) is int and v >= 0 for v in value):
            if key not in _LIST_PER_LAYER and max(value) >= LAYERS:
                setattr(cfg, key, sorted({v for v in value if v < LAYERS}) or [LAYERS - 1])
        if isinstance(value, PretrainedConfig):
            _shrink(value, seen, width, heads)


def _uses_mrope(config: Any) -> bool:
    """Whether the model's code reads ``mrope_section`` (multimodal RoPE), from its source file."""
    import importlib.util

    spec = importlib.util.find_spec(type(config).__module__.replace(".configuration_", ".modeling_"))
    return bool(spec and spec.origin and "mrope_section" in open(spec.origin, encoding="utf-8").read())


def _default_sub_config(spec: Any):
    if spec.model_type:
        from transformers import AutoConfig

        return AutoConfig.for_model(spec.model_type, **spec.init_kwargs)
    return spec.config_class(**spec.init_kwargs)


def tiny_config(model_type: str, **overrides: Any):
    """The default config of ``model_type``, shrunk to toy size (see module docstring)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    # Where the default config leaves its optional towers out (Gemma 4: no vision, no audio), build
    # them from their defaults, as real checkpoints ship them; an image-text-to-text model needs one.
    absent = {key: _default_sub_config(spec) for key, spec in type(config).sub_configs_defaults.items()
              if getattr(spec, "optional", False) and getattr(config, key, None) is None}
    if absent and getattr(config, "vision_config", None) is None:
        config = AutoConfig.for_model(model_type, **{key: sub.to_dict() for key, sub in absent.items()})
    _shrink(config, set())
    text = config.get_text_config()
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and "mrope_section" not in rope and _uses_mrope(config):
        # The code's default sections (e.g. [16, 24, 24]) assume a 128-wide head: give ours explicitly.
        half = HEAD_DIM // 2
        text.rope_parameters = {**rope, "mrope_section": [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]}
    # Some defaults put special-token ids (e.g. LLaVA's image token 32000) past the text vocabulary;
    # real checkpoints never do, so grow the vocabulary to hold them.
    ids = [v for k, v in config.__dict__.items() if k.endswith(("token_index", "token_id")) and type(v) is int]
    if ids and isinstance(getattr(text, "vocab_size", None), int) and max(ids) >= text.vocab_size:
        text.vocab_size = max(ids) + 1
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny(model_type: str, device: str = "cpu", seed: int = 0, **overrides: Any):
    """A randomly initialised image-text-to-text model of ``model_type`` at toy size."""
    import torch
    from transformers import AutoModelForImageTextToText

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config)
    return model.eval()


def image_text_to_text_types() -> list[str]:
    """Every model type transformers maps to ``AutoModelForImageTextToText``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
