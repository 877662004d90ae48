"""LLaVA-style models: a tiny one built from config, and one assembled from a vision encoder + an LLM.

Both end as a standard ``LlavaForConditionalGeneration`` folder (config, safetensors weights,
tokenizer, processor with chat template) written by ``save_pretrained``, so they load back through
the same ``from_pretrained`` path that serves ``llava-hf/llava-1.5-7b-hf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mmlora.models.clip import CLIP_MEAN, CLIP_STD
from mmlora.models.convert import hf_vision_from_open_clip
from mmlora.models.corpus import tokenizer_corpus
from mmlora.models.tokenizer import build_llava_tokenizer

if TYPE_CHECKING:  # heavy imports stay lazy so `mmlora --help` is fast
    from transformers import LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerBase



@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of a tiny LLaVA. Defaults keep LLaVA-1.5's structure: CLIP tower, 2-layer GELU projector,
    Llama decoder, features from the second-to-last vision layer without the CLS token."""

    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    lm_width: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_kv_heads: int = 2
    lm_intermediate: int = 128
    max_positions: int = 512
    tokenizer_vocab: int = 640
    #: punctuation kept out of word pieces (``train_bpe``): the shapes worlds' caption styles differ in it
    split_punctuation: bool = False

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_image_processor(image_size: int):
    """CLIP's preprocessing (resize shortest edge, centre crop, CLIP mean/std) at ``image_size``."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )


def build_llava_processor(tokenizer: PreTrainedTokenizerBase, image_size: int, patch_size: int) -> LlavaProcessor:
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )


def llava_config(vision_config, text_config, tokenizer, num_image_tokens: int):
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    config.pad_token_id = tokenizer.pad_token_id
    return config


def set_text_token_ids(text_config, tokenizer) -> None:
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.pad_token_id = tokenizer.pad_token_id


def build_tiny_llava(spec: TinyLlavaSpec, seed: int = 0, vision_config=None,
                     texts: Sequence[str] | None = None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised tiny LLaVA with a real tokenizer (trained on ``texts``, default the
    shipped corpus) and processor (``vision_config`` replaces the spec's vision sizes, e.g. to take a
    pretrained tower)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaForConditionalGeneration

    tokenizer = build_llava_tokenizer(tokenizer_corpus() if texts is None else texts, vocab_size=spec.tokenizer_vocab,
                                      split_punctuation=spec.split_punctuation)
    vision = vision_config or CLIPVisionConfig(
        hidden_size=spec.vision_width,
        intermediate_size=spec.vision_width * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.lm_width,
        intermediate_size=spec.lm_intermediate,
        num_hidden_layers=spec.lm_layers,
        num_attention_heads=spec.lm_heads,
        num_key_value_heads=spec.lm_kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
    )
    set_text_token_ids(text, tokenizer)
    config = llava_config(vision, text, tokenizer, spec.num_image_tokens)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval(), build_llava_processor(tokenizer, spec.image_size, spec.patch_size)


def llava_from_clip(clip_dir: str | Path, spec: TinyLlavaSpec, seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A tiny LLaVA whose vision tower is the image tower of the open_clip model in ``clip_dir``
    (converted, at ``spec.image_size``), with a new projector and a new language model."""
    tower = hf_vision_from_open_clip(clip_dir, image_size=spec.image_size)
    model, processor = build_tiny_llava(spec, seed, vision_config=tower.config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    return model, processor


def save_llava(model, processor, out_dir: str | Path) -> Path:
    """``save_pretrained`` for model and processor: the folder loads with ``from_pretrained``."""
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
