"""Benchmark model shapes: LLaVA-style models built from config with random weights.

Each shape keeps a real model's proportions at a size the machine can train in seconds:

* ``llava7b-shape`` — LLaVA-1.5-7B (CLIP ViT-L/14 + Llama-2-7B): head dimension 128, MLP width
  2.6875 x hidden (11008 / 4096), vision width 1/4 of the LM's, vision depth 3/4 of the LM's, LoRA rank
  hidden / 32 (r=128 at 4096), image tokens most of the sequence. The vocabulary is scaled with the
  model so that the LM head keeps its share of the FLOPs and of the activation memory: V / (layers x
  hidden) is 0.24 in LLaVA-1.5-7B (head ~2% of the LM's FLOPs) and 0.25 here (the shapes-world
  tokenizer's 510 tokens on 4 x 512). A literal 32k head on a CPU-sized model would be ~55% of its
  FLOPs and turn this preset into a second ``vocab-heavy``.
* ``vocab-heavy`` — Qwen2-VL-2B's vocabulary (151,936) on a small LM (hidden 256, MLP 6 x hidden,
  grouped-query attention): the LM head is most of the FLOPs and its logits most of the memory.
* ``tiny`` — seconds; for tests of the benchmark itself.
* ``7b-shape`` — for a GPU: LLaVA-1.5-7B's exact layer shapes (CLIP-L at 336 px, 576 image tokens;
  Llama-2-7B layers, 32k vocabulary) with only a few layers.

The vocabulary of the model may be larger than the tokenizer's (as llava-hf pads 32000 to 32064):
token ids come from the shapes-world tokenizer, the embedding and the head have the full size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchShape:
    name: str
    about: str
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    lm_width: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_intermediate: int
    vocab: int | None  # None: the tokenizer's size
    rank: int
    batch_size: int
    steps: int  # one pass over steps x batch_size samples
    device: str = "cpu"

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self) | {"image_tokens": self.image_tokens}


SHAPES: dict[str, BenchShape] = {s.name: s for s in (
    BenchShape("tiny", "tiny-llava sizes (a test of the benchmark itself)", image_size=32, patch_size=8,
               vision_width=32, vision_layers=2, vision_heads=2, vision_intermediate=128, lm_width=64, lm_layers=2,
               lm_heads=4, lm_kv_heads=2, lm_intermediate=128, vocab=None, rank=4, batch_size=2, steps=3),
    BenchShape("llava7b-shape", "LLaVA-1.5-7B proportions: CLIP 3x128 (144 image tokens) + Llama 4x512 "
               "(head dim 128, MLP 1376), vocabulary scaled with the LM (head ~2% of its FLOPs), LoRA r=16",
               image_size=96, patch_size=8, vision_width=128, vision_layers=3, vision_heads=2,
               vision_intermediate=512, lm_width=512, lm_layers=4, lm_heads=4, lm_kv_heads=4, lm_intermediate=1376,
               vocab=None, rank=16, batch_size=4, steps=6),
    BenchShape("vocab-heavy", "Qwen2-VL-2B's 151,936-token vocabulary on a small LM: CLIP 4x128 (64 image tokens) "
               "+ Llama 4x256 (GQA 2/1, MLP 1536); the head is most of the FLOPs, LoRA r=8",
               image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=2,
               vision_intermediate=512, lm_width=256, lm_layers=4, lm_heads=2, lm_kv_heads=1, lm_intermediate=1536,
               vocab=151_936, rank=8, batch_size=4, steps=6),
    BenchShape("7b-shape", "LLaVA-1.5-7B layer shapes, few layers: CLIP-L/14 at 336 px (576 image tokens) 4x1024 + "
               "Llama-2-7B layers 4x4096 (MLP 11008), 32,064 vocabulary, LoRA r=128", image_size=336, patch_size=14,
               vision_width=1024, vision_layers=4, vision_heads=16, vision_intermediate=4096, lm_width=4096,
               lm_layers=4, lm_heads=32, lm_kv_heads=32, lm_intermediate=11008, vocab=32_064, rank=128, batch_size=8,
               steps=12, device="cuda"),
)}


def build_model_folder(shape: BenchShape, out: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Build ``shape`` with random weights (on ``shape.device`` when it is a GPU: fast initialisation) and
    save it as a standard ``LlavaForConditionalGeneration`` folder with a processor."""
    import torch
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmlora.models.llava import build_llava_processor
    from mmlora.models.presets import preset_path

    tokenizer = AutoTokenizer.from_pretrained(preset_path("tiny-llava"))  # the shapes-world tokenizer
    vocab = max(shape.vocab or 0, len(tokenizer))
    vision = CLIPVisionConfig(hidden_size=shape.vision_width, intermediate_size=shape.vision_intermediate,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=shape.vision_width)
    text = LlamaConfig(vocab_size=vocab, hidden_size=shape.lm_width, intermediate_size=shape.lm_intermediate,
                       num_hidden_layers=shape.lm_layers, num_attention_heads=shape.lm_heads,
                       num_key_value_heads=shape.lm_kv_heads, max_position_embeddings=2048, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=shape.image_tokens, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    device = shape.device if shape.device != "cuda" or torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    build_llava_processor(tokenizer, shape.image_size, shape.patch_size).save_pretrained(out)
    return out


def model_params(model_dir: Path) -> dict[str, int]:
    """Parameter counts by component, from the saved config (built on the meta device)."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(model_dir))
    lm = model.model.language_model
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"vision": count(model.model.vision_tower), "projector": count(model.model.multi_modal_projector),
            "language_layers": count(lm) - lm.embed_tokens.weight.numel(), "head": model.lm_head.weight.numel()}


def model_flops_per_sample(params: dict[str, int], tokens_per_sample: float, image_tokens: int) -> float:
    """Model FLOPs of one training sample of a frozen-base LoRA step (no recomputation counted):
    4 x parameters x tokens for the language model and head (forward, and backward to the inputs;
    the adapters' own weight gradients are negligible), 6 x parameters x image tokens for the trained
    projector, 2 x parameters x patches for the frozen vision tower's forward (with its CLS token)."""
    return (4 * (params["language_layers"] + params["head"]) * tokens_per_sample
            + 6 * params["projector"] * image_tokens + 2 * params["vision"] * (image_tokens + 1))
