"""Resolve a model reference (preset name, local folder, Hugging Face id) to something loadable.

Nothing is downloaded when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set: a hub id that is not
already in the local cache fails at once with a message saying what to pass instead, rather than
hanging on network retries or ending in a wall of traceback.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mmlora.errors import MmloraError
from mmlora.models.llava import llava_config, set_text_token_ids, build_llava_processor
from mmlora.models.presets import PRESETS, preset_path
from mmlora.models.tokenizer import LLAVA_CHAT_TEMPLATE
from mmlora.optional import require

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

_TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.sep + os.sep in ref or ref.endswith(os.sep)


def resolve_pretrained(ref: str | Path, kind: str | None = None) -> Path | str:
    """Return a local folder for ``ref``, or (online only) the hub id for ``from_pretrained`` to fetch.

    ``ref`` may be a preset name (``mmlora models list``; built once and cached), a folder, or a hub
    id such as ``llava-hf/llava-1.5-7b-hf``. ``kind`` ("llava" or "clip") checks a preset's kind.
    """
    ref_str = str(ref)
    path = Path(ref_str).expanduser()
    if path.is_dir():
        return path
    if ref_str in PRESETS:
        preset = PRESETS[ref_str]
        if kind is not None and preset.kind != kind:
            raise MmloraError(f"preset {ref_str!r} is a {preset.kind} model, but a {kind} model is needed here")
        return preset_path(ref_str)
    if isinstance(ref, Path) or _looks_like_path(ref_str) or path.exists():
        raise MmloraError(f"no model folder at {ref_str!r}: pass a folder written by save_pretrained, or a preset")

    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref_str, local_files_only=True))
    except Exception:  # not cached (or not a valid id): decide below whether we may download
        pass
    if offline():
        raise MmloraError(
            f"{ref_str!r} is not a local folder, a preset ({', '.join(PRESETS)}) or a model in the local "
            "Hugging Face cache, and downloads are off (HF_HUB_OFFLINE=1). Pass the path of a folder "
            f"that holds the checkpoint (on a machine with network: `hf download {ref_str} --local-dir DIR`, "
            "then copy DIR here), or a preset from `mmlora models list`."
        )
    return ref_str


def load_clip(name_or_path: str | Path, device: str = "cpu"):
    """Load an open_clip folder (or a preset name). Returns ``(model, preprocess, tokenizer)`` where
    ``tokenizer(texts) -> LongTensor[B, context_length]`` as open_clip's tokenizers do."""
    open_clip = require("open_clip", "clip", "loading an open_clip CLIP model")


    path = resolve_pretrained(name_or_path, kind="clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.eval(), preprocess, tokenizer



def assemble_llava(
    vision_encoder: str | Path,
    language_model: str | Path,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build a LLaVA from a CLIP vision encoder and a causal LM, with a new projector (LLaVA's
    2-layer GELU MLP, randomly initialised): how a user makes their own VLM before projector
    pre-training. The LM's tokenizer gains ``<image>`` (and ``<pad>`` if it has none); its embedding
    matrix is resized to match. Both inputs are local folders (or ids already in the HF cache).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel


    vision_path = resolve_pretrained(vision_encoder)
    lm_path = resolve_pretrained(language_model)
    vision_cfg = AutoConfig.from_pretrained(vision_path)
    vision_cfg = getattr(vision_cfg, "vision_config", vision_cfg)  # a full CLIP folder works too
    tower = CLIPVisionModel.from_pretrained(vision_path, config=vision_cfg)
    lm = AutoModelForCausalLM.from_pretrained(lm_path)
    tokenizer = AutoTokenizer.from_pretrained(lm_path)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    lm.resize_token_embeddings(len(tokenizer))
    text_cfg = lm.config
    set_text_token_ids(text_cfg, tokenizer)
    num_image_tokens = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    config = llava_config(vision_cfg, text_cfg, tokenizer, num_image_tokens)

    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = build_llava_processor(tokenizer, vision_cfg.image_size, vision_cfg.patch_size)
    return model.eval(), processor



def load_llava(name_or_path: str | Path, **kwargs) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load any LLaVA checkpoint (a preset name, a local folder, or a cached hub id) and its processor."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration


    path = resolve_pretrained(name_or_path)
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def clip_tokenizer(ref: str | Path):
    """The open_clip tokenizer of a CLIP reference (preset or folder)."""
    open_clip = require("open_clip", "clip", "an open_clip CLIP tokenizer")
    return open_clip.get_tokenizer(f"local-dir:{resolve_pretrained(ref, kind='clip')}")


def is_clip_folder(path: str | Path) -> bool:
    """An open_clip folder (``open_clip_config.json``), as saved by ``mmlora.models.clip.save_clip``."""
    return (Path(path) / "open_clip_config.json").is_file()
