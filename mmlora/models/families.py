"""Complete tiny folders (model + processor) of the major VLM families, built offline from config.

``mmlora models tiny TYPE --out DIR`` writes a folder that ``AutoProcessor.from_pretrained(DIR)`` and
``AutoModelForImageTextToText.from_pretrained(DIR)`` load without network: the model from
:func:`mmlora.models.tiny_any.tiny_config`, plus what a hub checkpoint ships with it —

* a tokenizer: the shapes-world BPE (:mod:`mmlora.models.tokenizer`) with the family's special tokens
  (image placeholder, vision start/end, ``<fake_token_around_image>``, ...) and its chat template
  (the structure of the real one, simplified: image placeholders where the processor expects them);
* an image processor of the family's own class at toy size (small images, few tiles/patches), and
  the video processor where the family's processor requires one;
* the config's token ids set to the tokenizer's ids, its vocabulary to the tokenizer's size, and the
  vision tower's image/patch sizes to what the image processor produces.

The family knowledge is one small builder per family in :data:`FAMILIES` (model type → builder). A
type without a builder, or one that cannot work here, is refused with a one-line reason
(:func:`refusal`). Usage::

    model, processor = build_family("qwen2_vl")
    save_family("qwen2_vl", "models/tiny-qwen2-vl")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmlora.errors import MmloraError
from mmlora.optional import require
from mmlora.models.corpus import tokenizer_corpus
from mmlora.models.tiny_any import WIDTH, tiny_config
from mmlora.models.llava import build_llava_processor
from mmlora.models.tokenizer import LLAVA_CHAT_TEMPLATE, train_bpe

TOKENIZER_VOCAB = 640
#: Role words of the families' templates, part of the tokenizer's training text as in a real model.
_ROLE_TEXT = "User: Assistant: user assistant model system You are a helpful assistant. USER: ASSISTANT:"


def _content(part_image: str, sep: str = "") -> str:
    """Jinja: a message's content, string or parts (images as ``part_image``, texts in order)."""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + part_image + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}" + sep
    )


# Qwen2-VL / Qwen2.5-VL: ChatML with a default system turn; an image is <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n" + _content("<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL: the same turns without the default system message.
QWEN3_VL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n" + _content("<|vision_start|><|image_pad|><|vision_end|>") + "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3 ("User:<image>Describe.<end_of_utterance>\nAssistant: a red circle.<end_of_utterance>\n"); SmolVLM
# is the same after <|im_start|>.
def _idefics_template(start: str) -> str:
    return (
        start + "{% for message in messages %}"
        "{{ message['role'] | capitalize }}"
        "{% if message['content'] is not string and message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        + _content("<image>") + "<end_of_utterance>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    )


# PaliGemma: "<image>prefix" then the answer; the processor itself puts <bos> after the images and "\n"
# after the text, so the user turn ends with "\n" only when an answer follows.
PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + _content("<image>") + "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}" + _content("") + "{{ eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}{% endif %}"
    "{% endfor %}"
)
# Gemma 3: <start_of_turn>user ... <end_of_turn>; an image is <start_of_image> (the processor expands it).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n" + _content("<start_of_image>") + "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Gemma 4: <|turn>user ... <turn|>; an image is <|image|> (the processor expands it to <|image>...<image|>).
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n" + _content("<|image|>") + "<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# LLaVA-OneVision: ChatML, "<image>\n" before the text.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n" + _content("<image>\n") + "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# InternVL 3: ChatML, "<IMG_CONTEXT>\n" where an image goes (the processor wraps it in <img>...</img>).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n" + _content("<IMG_CONTEXT>\n") + "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3.2 Vision: <|start_header_id|>role<|end_header_id|>\n\n ... <|eot_id|>; an image is <|image|>.
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n" + _content("<|image|>") + "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def family_tokenizer(specials: list[str], chat_template: str, bos: str | None = "<s>", eos: str = "</s>",
                     pad: str = "<pad>", named: dict[str, str] | None = None, add_bos: bool = True):
    """The shapes-world BPE with ``specials`` added as special tokens (after the base vocabulary, as
    real checkpoints add theirs); ``named`` are model-specific token attributes (``image_token``,
    ``boi_token``, ...) that some processors read from the tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    front = ["<unk>"] + [t for t in (bos, eos, pad) if t]
    front = list(dict.fromkeys(front))
    texts = tokenizer_corpus() + [_ROLE_TEXT] * 200
    tok = train_bpe(texts, TOKENIZER_VOCAB, front, lowercase=False)
    if bos and add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs: dict[str, Any] = {"extra_special_tokens": named} if named else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>", pad_token=pad,
                                   padding_side="left", model_max_length=4096, **kwargs)
    extra = [t for t in dict.fromkeys(specials + list((named or {}).values())) if t not in fast.get_vocab()]
    fast.add_tokens(extra, special_tokens=True)
    fast.chat_template = chat_template
    return fast


@dataclass
class Built:
    """What a family builder returns: the processor and the config changes for the model."""

    processor: Any
    #: config attribute → token string, set on the config (and its text config where it has the key)
    token_ids: dict[str, str] = field(default_factory=dict)
    #: vision config attribute → value (image size, patch size, ...)
    vision: dict[str, Any] = field(default_factory=dict)
    #: top-level config attribute → value
    config: dict[str, Any] = field(default_factory=dict)
    #: text config attribute → value
    text: dict[str, Any] = field(default_factory=dict)
    #: names (endings) of zero-initialised gate parameters the tiny build opens (see :func:`build_family`)
    gates: tuple[str, ...] = ()


def _qwen_vl(model_type: str) -> Built:
    from transformers import Qwen2VLImageProcessor

    qwen3 = model_type == "qwen3_vl"
    patch = 16 if qwen3 else 14
    side = patch * 2 * 4  # 4x4 merged tokens: 16 image tokens per image
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = family_tokenizer(specials, QWEN3_VL_TEMPLATE if qwen3 else QWEN_VL_TEMPLATE, bos=None, eos="<|im_end|>",
                           pad="<|endoftext|>")
    image = Qwen2VLImageProcessor(size={"shortest_edge": side * side, "longest_edge": side * side}, patch_size=patch,
                                  merge_size=2, temporal_patch_size=2)
    if qwen3:
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(size={"shortest_edge": side * side, "longest_edge": side * side * 2},
                                      patch_size=patch, merge_size=2, temporal_patch_size=2)
        processor = Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video, chat_template=tok.chat_template)
    else:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(size={"shortest_edge": side * side, "longest_edge": side * side * 2},
                                      patch_size=patch, merge_size=2, temporal_patch_size=2)
        cls = _processor_class(model_type)
        processor = cls(image_processor=image, tokenizer=tok, video_processor=video, chat_template=tok.chat_template)
    ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
           "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    vision: dict[str, Any] = {"patch_size": patch}
    if qwen3:  # DeepStack taps vision layers 8/16/24 by default: past the tiny tower, so its mergers would idle
        vision["deepstack_visual_indexes"] = [0]  # injected after LM layer 0 it reaches the answers
    return Built(processor, ids, vision)


def _processor_class(model_type: str):
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    import transformers

    return getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type])


SMALL_IMAGE, SMALL_PATCH = 32, 8  # 4x4 patches: 16 image tokens per image (as the tiny LLaVA)
IDEFICS_IMAGE = 64  # px; patch 8 → 8x8 patches, pixel shuffle (scale 2) → 16 image tokens
IDEFICS_PATCH = 8


def _idefics3(model_type: str) -> Built:
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    specials += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = family_tokenizer(specials, _idefics_template("{{ bos_token }}"), eos="<end_of_utterance>", add_bos=False)
    image = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": IDEFICS_IMAGE},
                                   max_image_size={"longest_edge": IDEFICS_IMAGE})
    seq = (IDEFICS_IMAGE // IDEFICS_PATCH) ** 2 // 4
    processor = Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=seq, chat_template=tok.chat_template)
    return Built(processor, {"image_token_id": "<image>"}, {"image_size": IDEFICS_IMAGE, "patch_size": IDEFICS_PATCH},
                 {"scale_factor": 2})


def _smolvlm(model_type: str) -> Built:
    require("num2words", "smolvlm", "SmolVLM's processor")
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>", "<|im_start|>"]
    specials += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = family_tokenizer(specials, _idefics_template("<|im_start|>"), bos=None, eos="<end_of_utterance>")
    size = {"longest_edge": IDEFICS_IMAGE}
    image = SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size)
    video = SmolVLMVideoProcessor(size=size, max_image_size=size)
    seq = (IDEFICS_IMAGE // IDEFICS_PATCH) ** 2 // 4
    processor = SmolVLMProcessor(image_processor=image, tokenizer=tok, video_processor=video, image_seq_len=seq,
                                 chat_template=tok.chat_template)
    return Built(processor, {"image_token_id": "<image>"}, {"image_size": IDEFICS_IMAGE, "patch_size": IDEFICS_PATCH},
                 {"scale_factor": 2})


def _paligemma(model_type: str) -> Built:
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    tok = family_tokenizer(["<image>"], PALIGEMMA_TEMPLATE, bos="<bos>", eos="<eos>", named={"image_token": "<image>"},
                           add_bos=False)
    image = SiglipImageProcessor(size={"height": SMALL_IMAGE, "width": SMALL_IMAGE})
    image.image_seq_length = (SMALL_IMAGE // SMALL_PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image, tokenizer=tok, chat_template=tok.chat_template)
    # The projector maps the vision width to the text width (the default 2048 is the 3B model's).
    return Built(processor, {"image_token_index": "<image>"},
                 {"image_size": SMALL_IMAGE, "patch_size": SMALL_PATCH, "projection_dim": WIDTH}, {"projection_dim": WIDTH})


def _gemma3(model_type: str) -> Built:
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = family_tokenizer(["<start_of_turn>", "<end_of_turn>"], GEMMA3_TEMPLATE, bos="<bos>", eos="<end_of_turn>",
                           named=named, add_bos=False)
    image = Gemma3ImageProcessor(size={"height": IDEFICS_IMAGE, "width": IDEFICS_IMAGE}, do_pan_and_scan=False)
    tokens = (IDEFICS_IMAGE // IDEFICS_PATCH) ** 2 // 4  # the projector pools 2x2 patches
    processor = Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=tokens, chat_template=tok.chat_template)
    ids = {"image_token_index": "<image_soft_token>", "boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>"}
    return Built(processor, ids, {"image_size": IDEFICS_IMAGE, "patch_size": IDEFICS_PATCH}, {"mm_tokens_per_image": tokens})


#: Gemma 4's soft-token budget per image (the smallest it supports) with 8 px patches pooled 2x2: a
#: 128 px image becomes 16x16 patches, 64 image tokens; every image is padded to 280 patches.
GEMMA4_SOFT_TOKENS, GEMMA4_PATCH, GEMMA4_POOL = 70, 8, 2


def _gemma4(model_type: str) -> Built:
    """Gemma 4: images resized to the soft-token budget keeping their aspect ratio (so the number of
    image tokens varies with the size), one row of padded patches per image; the processor also
    requires its audio feature extractor and video processor, built at their defaults."""
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4ImageProcessor, Gemma4Processor,
                              Gemma4VideoProcessor)

    named = {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
             "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"}
    tok = family_tokenizer(["<|turn>", "<turn|>"], GEMMA4_TEMPLATE, bos="<bos>", eos="<turn|>", named=named,
                           add_bos=False)
    sizes = {"patch_size": GEMMA4_PATCH, "max_soft_tokens": GEMMA4_SOFT_TOKENS, "pooling_kernel_size": GEMMA4_POOL}
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=Gemma4ImageProcessor(**sizes),
                                tokenizer=tok, video_processor=Gemma4VideoProcessor(**sizes),
                                image_seq_length=GEMMA4_SOFT_TOKENS, chat_template=tok.chat_template)
    ids = {"image_token_id": "<|image|>", "boi_token_id": "<|image>", "eoi_token_id": "<image|>",
           "video_token_id": processor.video_token, "audio_token_id": "<|audio|>", "boa_token_id": "<|audio>",
           "eoa_token_index": "<audio|>"}
    # Position tables as long as the longest side of a padded image in patches (the default has 10240 rows).
    side = GEMMA4_SOFT_TOKENS * GEMMA4_POOL
    vision = {"patch_size": GEMMA4_PATCH, "pooling_kernel_size": GEMMA4_POOL, "position_embedding_size": side}
    # The per-layer input embeddings are [vocabulary, layers x width]: toy width, the tokenizer's vocabulary.
    # Gemma 4's last layer is full attention (its config forces it at load): the tiny one's too, so the
    # saved folder reloads as built.
    text = {"hidden_size_per_layer_input": WIDTH // 4, "vocab_size_per_layer_input": len(processor.tokenizer),
            "layer_types": ["sliding_attention", "full_attention"]}
    return Built(processor, ids, vision, text=text)


#: Any-resolution grids at toy size: a 32 px base image plus 32x64 / 64x32 / 64x64 tilings.
PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _llava_next(model_type: str) -> Built:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tok = family_tokenizer(["<image>"], LLAVA_CHAT_TEMPLATE)
    image = LlavaNextImageProcessor(size={"shortest_edge": SMALL_IMAGE}, crop_size={"height": SMALL_IMAGE, "width": SMALL_IMAGE},
                                    image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image, tokenizer=tok, patch_size=SMALL_PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=tok.chat_template)
    return Built(processor, {"image_token_index": "<image>"}, {"image_size": SMALL_IMAGE, "patch_size": SMALL_PATCH},
                 {"image_grid_pinpoints": PINPOINTS, "image_seq_length": (SMALL_IMAGE // SMALL_PATCH) ** 2})


def _llava_onevision(model_type: str) -> Built:
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    tok = family_tokenizer(["<|im_start|>", "<|im_end|>", "<image>", "<video>"], ONEVISION_TEMPLATE, bos=None,
                           eos="<|im_end|>", pad="<|endoftext|>")
    pinpoints = [[SMALL_IMAGE, SMALL_IMAGE]] + PINPOINTS
    size = {"height": SMALL_IMAGE, "width": SMALL_IMAGE}
    image = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints)
    video = LlavaOnevisionVideoProcessor(size=size)
    processor = LlavaOnevisionProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                        num_image_tokens=(SMALL_IMAGE // SMALL_PATCH) ** 2,
                                        vision_feature_select_strategy="full", chat_template=tok.chat_template)
    return Built(processor, {"image_token_index": "<image>", "video_token_index": "<video>"},
                 {"image_size": SMALL_IMAGE, "patch_size": SMALL_PATCH},
                 {"image_grid_pinpoints": pinpoints, "vision_feature_select_strategy": "full"})


def _internvl(model_type: str) -> Built:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = family_tokenizer(["<|im_start|>", "<|im_end|>"], INTERNVL_TEMPLATE, bos=None, eos="<|im_end|>",
                           pad="<|endoftext|>", named=named)
    size = {"height": IDEFICS_IMAGE, "width": IDEFICS_IMAGE}
    image = GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=2)  # the processor always crops
    video = InternVLVideoProcessor(size=size)
    tokens = (IDEFICS_IMAGE // IDEFICS_PATCH) ** 2 // 4  # pixel shuffle with downsample ratio 0.5
    processor = InternVLProcessor(image_processor=image, tokenizer=tok, video_processor=video, image_seq_length=tokens,
                                  chat_template=tok.chat_template)
    return Built(processor, {"image_token_id": "<IMG_CONTEXT>"},
                 {"image_size": [IDEFICS_IMAGE, IDEFICS_IMAGE], "patch_size": [IDEFICS_PATCH, IDEFICS_PATCH]},
                 {"image_seq_length": tokens, "downsample_ratio": 0.5})


#: Llama 3.2 Vision's tiles at toy size: 32 px tiles of 8 px patches, up to 2 tiles (1x1, 1x2, 2x1).
MLLAMA_TILE, MLLAMA_TILES = 32, 2


def _mllama(model_type: str) -> Built:
    """Llama 3.2 Vision: one ``<|image|>`` per image in the text (the features enter through the
    cross-attention layers, not in place of tokens); images cut into up to two 32 px tiles."""
    from transformers import MllamaImageProcessor, MllamaProcessor

    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"]
    tok = family_tokenizer(specials, MLLAMA_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
                           pad="<|finetune_right_pad_id|>", named={"image_token": "<|image|>"}, add_bos=False)
    image = MllamaImageProcessor(size={"height": MLLAMA_TILE, "width": MLLAMA_TILE}, max_image_tiles=MLLAMA_TILES)
    processor = MllamaProcessor(image_processor=image, tokenizer=tok, chat_template=tok.chat_template)
    taps = [1]  # the tower's output is its last layer + these inner layers (concatenated), as the real one's 5 taps
    vision = {"image_size": MLLAMA_TILE, "patch_size": SMALL_PATCH, "attention_heads": 4, "max_num_tiles": MLLAMA_TILES,
              "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]], "intermediate_layers_indices": taps,
              "vision_output_dim": WIDTH * (1 + len(taps))}
    return Built(processor, {"image_token_index": "<|image|>"}, vision,
                 gates=("cross_attn_attn_gate", "cross_attn_mlp_gate"))


def _llava(model_type: str) -> Built:
    """LLaVA-1.5's layout (CLIP tower, 2-layer projector, Llama) with the ``tiny-llava`` preset's
    processor settings: 32 px images, 8 px patches, CLS dropped (16 image tokens)."""
    tok = family_tokenizer(["<image>"], LLAVA_CHAT_TEMPLATE)
    processor = build_llava_processor(tok, SMALL_IMAGE, SMALL_PATCH)
    return Built(processor, {"image_token_index": "<image>"}, {"image_size": SMALL_IMAGE, "patch_size": SMALL_PATCH},
                 {"image_seq_length": (SMALL_IMAGE // SMALL_PATCH) ** 2, "vision_feature_select_strategy": "default"})


FAMILIES: dict[str, Callable[[str], Built]] = {
    "llava": _llava,
    "qwen2_vl": _qwen_vl,
    "qwen2_5_vl": _qwen_vl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "paligemma": _paligemma,
    "gemma3": _gemma3,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
    "qwen3_vl": _qwen_vl,
    "gemma4": _gemma4,
    "mllama": _mllama,
}


def _set_token_ids(config: Any, tokenizer: Any, token_ids: dict[str, str]) -> None:
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in token_ids.items()}
    text = config.get_text_config()
    for key, value in ids.items():
        setattr(config, key, value)
        if text is not config and key in text.__dict__:
            setattr(text, key, value)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    for key, value in special.items():
        setattr(text, key, value)
        if text is not config and key in config.__dict__:
            setattr(config, key, value)


def build_family(model_type: str, seed: int = 0):
    """``(model, processor)``: a tiny random ``model_type`` with a processor that fits it."""
    import torch
    from transformers import AutoModelForImageTextToText

    if model_type not in FAMILIES:
        raise MmloraError(f"no processor recipe for {model_type!r} yet; families with one: {', '.join(FAMILIES)}")
    built = FAMILIES[model_type](model_type)
    processor = built.processor
    tokenizer = processor.tokenizer
    config = tiny_config(model_type)
    for key, value in built.vision.items():
        setattr(config.vision_config, key, value)
    for key, value in built.config.items():
        setattr(config, key, value)
    for key, value in built.text.items():
        setattr(config.get_text_config(), key, value)
    _set_token_ids(config, tokenizer, built.token_ids)
    config.get_text_config().vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        # Some inits zero a matrix that training fills (Gemma 3's projection): random stands in for trained,
        # else the image features are all zero and no gradient reaches the vision tower.
        for param in model.parameters():
            if param.dim() == 2 and not param.any():
                param.normal_(std=0.02)
        # Likewise tanh gates that start closed: mllama's cross-attention layers add gate.tanh() * (image
        # attention), so at zero the images change nothing and no gradient reaches the vision tower. A
        # trained checkpoint has them open; only this random stand-in sets them.
        for name, param in model.named_parameters():
            if built.gates and name.endswith(built.gates) and not param.any():
                param.fill_(0.5)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    return model, processor


def check_out_dir(out: str | Path, force: bool = False) -> None:
    """Refuse to write into a file or a non-empty folder unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MmloraError(f"{out} is a file, not a folder: pass another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MmloraError(f"{out} already exists and is not empty: pass --force to overwrite it, or another --out")


def save_family(model_type: str, out: str | Path, seed: int = 0, force: bool = False):
    """Build ``model_type`` and write model + processor to ``out`` (refused if ``out`` holds files,
    unless ``force``). Returns the model."""
    out = Path(out)
    check_out_dir(out, force)
    model, processor = build_family(model_type, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return model
