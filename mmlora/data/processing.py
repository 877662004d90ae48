"""Conversation → model inputs with labels on the assistant answers only.

The model's own processor and chat template render and tokenize the *whole* conversation once. The
supervised characters are found from the template itself: for each assistant turn, the text the
template adds between "the conversation so far + generation prompt" and "the conversation including
this answer" is the answer plus the template's end-of-turn marker. Tokens whose characters fall in
those spans are labelled; everything else (system, user, image tokens, role headers) is ``-100``.
This works for any chat template (LLaVA-1.5, Llama-3, ChatML, Gemma, ...) without ``{% generation %}``
markers, and never tokenizes pieces separately (which shifts token boundaries).

Image tokens always match what the model expects: the processor expands each image placeholder into
its feature count, and truncation shortens text only — a sample whose image tokens would be cut is a
``BadSample`` (an error, or skipped, per ``on_bad_sample``).
"""

from __future__ import annotations

from typing import Any

import torch

from mmlora.data.samples import MAX_IMAGE_PIXELS, BadSample, Sample, load_image
from mmlora.errors import MmloraError

IGNORE = -100


class ConversationEncoder:
    """Encodes :class:`Sample` values with ``processor`` (a VLM processor or a plain tokenizer)."""

    def __init__(self, processor: Any, max_length: int = 2048, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        image_token = getattr(processor, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(image_token) if image_token else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of each assistant answer (+ end of turn)."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(prefix)):
                raise MmloraError(
                    "the chat template does not render a conversation as a growing prefix of itself, so answer "
                    "spans cannot be located; use a template whose turns append to the text"
                )
            region = upto[len(prefix):]
            spans.append((len(prefix), len(prefix) + len(region.rstrip())))
        return full, spans

    def _tokenize_with_labels(self, text: str, spans: list[tuple[int, int]], add_special: bool) -> tuple[list[int], list[int]]:
        enc = self.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        labels = []
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]):
            inside = b > a and any(s <= a and b <= e for s, e in spans)
            labels.append(tok if inside else IGNORE)
        return enc["input_ids"], labels

    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` ``[L]`` plus the processor's image tensors."""
        images = [load_image(img, sample.where, sample.id, self.max_image_pixels) for img in sample.images]
        text, spans = self.assistant_spans(sample.messages)
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        ids, labels = self._tokenize_with_labels(text, spans, add_special)
        if self.tokenizer is self.processor:
            out: dict[str, Any] = {"input_ids": torch.tensor(ids)}
        else:
            kwargs = {"images": images} if images else {}
            proc = self.processor(text=[text], add_special_tokens=add_special, return_tensors="pt", **kwargs)
            out = {k: v for k, v in proc.items()}
            out["input_ids"] = proc["input_ids"][0]
            labels = self._expand_labels(ids, labels, out["input_ids"].tolist(), sample)
        if len(labels) != len(out["input_ids"]):
            raise MmloraError(f"{sample.where}: internal label alignment failed")
        return self._truncate(out, torch.tensor(labels), sample)

    def _expand_labels(self, ids: list[int], labels: list[int], expanded: list[int], sample: Sample) -> list[int]:
        """Carry labels over to the processor's ids, where each image token became a run of them."""
        out, j = [], 0
        for tok, lab in zip(ids, labels):
            if j < len(expanded) and expanded[j] == tok and tok != self.image_token_id:
                out.append(lab)
                j += 1
            elif tok == self.image_token_id:
                start = j
                while j < len(expanded) and expanded[j] == self.image_token_id:
                    out.append(IGNORE)
                    j += 1
                if j == start:
                    raise BadSample(sample.where, sample.id, "the processor produced no image tokens for an image")
            else:
                raise MmloraError(f"{sample.where}: the processor tokenized the conversation differently from its tokenizer")
        if j != len(expanded):
            raise MmloraError(f"{sample.where}: the processor added {len(expanded) - j} unexpected tokens")
        return out

    def _truncate(self, out: dict[str, Any], labels: torch.Tensor, sample: Sample) -> dict[str, torch.Tensor]:
        ids = out["input_ids"]
        n = len(ids)
        if n > self.max_length:
            if self.image_token_id is not None:
                image_pos = (ids == self.image_token_id).nonzero()
                if len(image_pos) and int(image_pos[-1]) >= self.max_length:
                    raise BadSample(
                        sample.where, sample.id,
                        f"needs {int(image_pos[-1]) + 1} tokens to reach the end of its image tokens, over "
                        f"max_length {self.max_length}; image tokens are never cut",
                    )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not (labels != IGNORE).any():
            raise BadSample(sample.where, sample.id, f"no answer token left within max_length {self.max_length}")
        result = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        result["input_ids"] = ids
        result["attention_mask"] = torch.ones_like(ids)
        result["labels"] = labels
        return result
