"""The one generation path: prompt building, left padding and ``generate``, for every caller.

``mmlora predict``, ``mmlora eval caption``, the in-training caption metrics, the server and the demo
all answer images through :func:`generate_answers` (a fixed batch, ``generate``) or, in the server's
continuous batching, :class:`mmlora.generate.iteration.RunningBatch` (sequences join and leave between
decoding steps); both build their batches with :func:`encode_requests`, so a model family's prompting
specifics (its chat template, image placeholders, padding side) live here and in
``mmlora.data.processing``, nowhere else.

Layer: generation. Imports ``mmlora.data`` and the foundation only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from mmlora.data.samples import CAPTION_PROMPT
from mmlora.errors import MmloraError


def pixel_rows(pixel_values: torch.Tensor) -> int:
    """Rows the vision tower's layers see for ``pixel_values``: every dim before an image's ``(C, H, W)``
    (samples, images, tiles: LLaVA-NeXT's any-resolution tiles and mllama's tiles are flattened into
    rows, and mllama's cross-attention reads one row per tile), or the patch rows of a flattened
    ``[patches, dim]`` (Qwen2-VL)."""
    shape = pixel_values.shape
    return math.prod(shape[:-3]) if len(shape) >= 4 else int(shape[0])


def pixel_rows_per_image(processor: Any) -> int:
    """How many rows one image becomes (:func:`pixel_rows`): 1 for batch-major vision towers reading
    one untiled image, more where patches are flattened or images cut into tiles."""
    from PIL import Image

    batch = processor(images=[[Image.new("RGB", (32, 32))]], text=[image_prompt(processor, "x")], return_tensors="pt")
    return pixel_rows(batch["pixel_values"])


def image_prompt(processor: Any, prompt: str) -> str:
    """The chat-templated text of one user turn holding an image and ``prompt``, ready for the answer."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def encode_requests(processor: Any, images: Sequence[Any], prompts: Sequence[str]) -> Any:
    """The processor's batch for one image and one prompt per row, each prompt chat-templated as a user
    turn, left padded so that every row ends where its answer starts."""
    tokenizer = processor.tokenizer
    texts = {p: image_prompt(processor, p) for p in dict.fromkeys(prompts)}
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        # One list of images per prompt: the layout every family's processor reads unambiguously
        # (Gemma 3 and Idefics3 would take a flat list as all images of the first prompt).
        return processor(images=[[image] for image in images], text=[texts[p] for p in prompts],
                         return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def generate_answers(model: Any, processor: Any, images: Sequence[Any], prompts: str | Sequence[str] = CAPTION_PROMPT,
                     batch_size: int = 16, max_new_tokens: int = 64, num_beams: int = 1,
                     adapter_names: Sequence[str] | None = None,
                     gone: Sequence[Callable[[], bool]] | None = None) -> list[str]:
    """Greedy (or beam) answers, one per image, with the KV cache.

    ``images``: RGB PIL images; ``prompts``: one prompt for all or one per image; ``adapter_names``
    (one per image) runs each image with its own PEFT adapter in the same batch. Prompts are left
    padded so that every row ends where generation starts. ``gone`` (greedy only; one per image): a
    row whose ``gone()`` turns true stops at the next token (its answer is what it had), and the
    batch stops once every row has stopped — for answers nobody waits for any more.
    """
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    if gone is not None and len(gone) != len(images):
        raise ValueError(f"{len(gone)} gone() callables for {len(images)} images")
    tokenizer = processor.tokenizer
    out: list[str] = []
    for k in range(0, len(images), batch_size):
        chunk = list(images[k:k + batch_size])
        batch = encode_requests(processor, chunk, prompts[k:k + batch_size])
        routed = {"adapter_names": list(adapter_names[k:k + batch_size])} if adapter_names else {}
        if routed and (rows := pixel_rows(batch["pixel_values"])) != len(chunk):
            # PEFT routes row i of every layer's input to adapter i: a vision tower that reads
            # flattened patches (Qwen2-VL) or tiles (LLaVA-NeXT, mllama) has no row per image to route.
            raise MmloraError(f"mixed-adapter batches need one pixel row per image, but this processor gives {rows} "
                              f"for {len(chunk)} (patches flattened, as Qwen2-VL does, or images cut into tiles): "
                              "run one adapter per batch (mmlora serve --mode switch or merged)")
        guard = _one_row_per_sample(model, len(chunk) * num_beams) if routed else contextlib.nullcontext()
        stop = {}
        if gone is not None and num_beams == 1:
            from transformers import StoppingCriteriaList

            stop = {"stopping_criteria": StoppingCriteriaList([_Gone(gone[k:k + batch_size])])}
        with guard:
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                                 use_cache=True, pad_token_id=tokenizer.pad_token_id, **routed, **stop)
        out += [s.strip() for s in processor.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


class _Gone:
    """A per-row stopping criterion for ``generate`` (transformers' protocol: a bool per row, the
    rows that are true stop): the rows whose caller is gone."""

    def __init__(self, gone: Sequence[Callable[[], bool]]):
        self.gone = list(gone)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor([g() for g in self.gone], dtype=torch.bool, device=input_ids.device)


@contextlib.contextmanager
def _one_row_per_sample(model: Any, rows: int) -> Iterator[None]:
    """Refuse, in one line, a mixed-adapter batch that reaches an adapter layer with other than ``rows``
    input rows: PEFT routes row i to sample i's adapter, so a layer that reads the features of all
    images as one sequence (Gemma 4's projector) cannot be routed."""
    def check(name: str):
        def hook(module: Any, args: tuple) -> None:
            if args and torch.is_tensor(args[0]) and args[0].shape[0] != rows:
                raise MmloraError(f"mixed-adapter batches need one row per sample in every adapted layer, but "
                                  f"{name.removeprefix('base_model.model.')} "
                                  f"reads {args[0].shape[0]} rows for {rows} samples (the images' features as one "
                                  "sequence): run one adapter per batch (mmlora serve --mode switch or merged)")
        return hook

    adapted = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]
    handles = [m.register_forward_pre_hook(check(n)) for n, m in adapted]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
