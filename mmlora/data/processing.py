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

from mmlora.data.samples import MAX_IMAGE_PIXELS, BadSample, Sample, error_reason, load_image
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
        self.image_token_ids = image_token_ids(processor)

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
        blocks: list[tuple[int, int]] | None = None
        if self.tokenizer is self.processor:
            out: dict[str, Any] = {"input_ids": torch.tensor(ids)}
        else:
            # One list of images for the one text: a flat list reads as one image per sample to some
            # processors (LLaVA-OneVision then tiles each image of a multi-image sample as if alone).
            kwargs = {"images": [images]} if images else {}
            try:
                proc = self.processor(text=[text], add_special_tokens=add_special, return_tensors="pt",
                                      return_text_replacement_offsets=True, **kwargs)
            except ValueError as err:  # the processor's own checks (too many images for it, an image too small, ...)
                raise BadSample(sample.where, sample.id, f"{type(self.processor).__name__} cannot encode it with "
                                f"{len(images)} image(s): {error_reason(err)}") from None
            offsets = proc.pop("text_replacement_offsets", None)
            proc.pop("labels", None)  # PaliGemma's own (everything after the prefix); ours are the answers only
            expanded = proc["input_ids"][0]
            n = len(expanded)
            out = {}
            for k, v in proc.items():
                # Per-token outputs (mm_token_type_ids, token_type_ids, ...) lose the batch dim like input_ids.
                per_token = torch.is_tensor(v) and v.dim() == 2 and tuple(v.shape) == (1, n) and not k.startswith("pixel")
                out[k] = v[0] if per_token else v
            if offsets is not None and (len(offsets[0]) or not images):
                labels, blocks = self._labels_from_replacements(text, spans, offsets[0], add_special, expanded.tolist(), sample)
            else:  # a processor that does not report its replacements: follow the image token's runs
                labels = self._expand_labels(ids, labels, expanded.tolist(), sample)
            if "token_type_ids" in out and type(self.processor).__name__ in SUFFIX_TOKEN_TYPES:
                out["token_type_ids"] = _suffix_types(torch.tensor(labels))
        if len(labels) != len(out["input_ids"]):
            raise MmloraError(f"{sample.where}: internal label alignment failed")
        return self._truncate(out, torch.tensor(labels), sample, blocks)

    def _labels_from_replacements(self, text: str, spans: list[tuple[int, int]], replacements: list[dict],
                                  add_special: bool, expanded: list[int], sample: Sample) -> tuple[list[int], list[tuple[int, int]]]:
        """Labels and image blocks from the processor's own account of what it put in the text.

        The processor replaced each image placeholder by a run of its own (``<fake_token_around_image>
        <global-img><image>...``, ``<img><IMG_CONTEXT>...</img>``, ...) and tokenized the result. The
        same replacements are applied here, the answer spans shifted past them, and the expanded text
        tokenized once: tokens inside a shifted answer span are labelled, tokens inside a replacement form
        that image's block ``[start, end)`` (never cut by truncation). Should the processor have changed
        more than the placeholders (PaliGemma adds ``<bos>`` after the images and a final newline), the
        two tokenizations are aligned and the tokens only the processor has are unlabelled.
        """
        pieces, last, new_spans, shift = [], 0, [], []
        for r in sorted(replacements, key=lambda r: r["span"][0]):
            a, b = r["span"]
            pieces += [text[last:a], r["replacement"]]
            last = b
            new_spans.append(tuple(r["new_span"]))
            shift.append((b, len(r["replacement"]) - (b - a)))
        pieces.append(text[last:])
        full = "".join(pieces)

        def moved(pos: int) -> int:
            return pos + sum(delta for end, delta in shift if end <= pos)

        answer_spans = [(moved(a), moved(b)) for a, b in spans]
        enc = self.tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
        ours, marks = enc["input_ids"], enc["offset_mapping"]
        labels = [tok if b > a and any(s <= a and b <= e for s, e in answer_spans) else IGNORE
                  for tok, (a, b) in zip(ours, marks)]
        image_of = [next((k for k, (s, e) in enumerate(new_spans) if a < e and s < b), None) for a, b in marks]
        if ours != expanded:
            import difflib

            mapped_labels, mapped_image = [IGNORE] * len(expanded), [None] * len(expanded)
            matcher = difflib.SequenceMatcher(None, ours, expanded, autojunk=False)
            for i, j, size in matcher.get_matching_blocks():
                mapped_labels[j:j + size] = labels[i:i + size]
                mapped_image[j:j + size] = image_of[i:i + size]
            labels, image_of = mapped_labels, mapped_image
        blocks = []
        for k in range(len(new_spans)):
            where = [i for i, m in enumerate(image_of) if m == k]
            if not where:
                raise BadSample(sample.where, sample.id, "the processor produced no image tokens for an image")
            blocks.append((where[0], where[-1] + 1))
        return labels, blocks

    def _expand_labels(self, ids: list[int], labels: list[int], expanded: list[int], sample: Sample) -> list[int]:
        """Carry labels over to the processor's ids, where each image token became a run of them (of one
        for mllama, whose features enter by cross-attention). Adjacent image tokens (images side by side)
        become one run, at least one token per image."""
        out, j = [], 0
        for i, (tok, lab) in enumerate(zip(ids, labels)):
            if j < len(expanded) and expanded[j] == tok and tok != self.image_token_id:
                out.append(lab)
                j += 1
            elif tok == self.image_token_id:
                if i and ids[i - 1] == tok:
                    continue  # consumed with the first image token of this run
                placeholders = next((k for k, t in enumerate(ids[i:]) if t != tok), len(ids) - i)
                start = j
                while j < len(expanded) and expanded[j] == self.image_token_id:
                    out.append(IGNORE)
                    j += 1
                if j - start < placeholders:
                    raise BadSample(sample.where, sample.id, "the processor produced no image tokens for an image")
            else:
                raise MmloraError(f"{sample.where}: the processor tokenized the conversation differently from its tokenizer")
        if j != len(expanded):
            raise MmloraError(f"{sample.where}: the processor added {len(expanded) - j} unexpected tokens")
        return out

    def _truncate(self, out: dict[str, Any], labels: torch.Tensor, sample: Sample,
                  blocks: list[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        ids = out["input_ids"]
        n = len(ids)
        per_token = [k for k, v in out.items() if k not in ("input_ids", "attention_mask")
                     and torch.is_tensor(v) and v.dim() == 1 and len(v) == n and not k.startswith("pixel")]
        per_row = [k for k, v in out.items() if sequence_major(k, v, n)]
        if n > self.max_length:
            if blocks is not None:
                image_end = max((e for _, e in blocks), default=0)
            else:
                hits = torch.isin(ids, torch.tensor(sorted(self.image_token_ids) or [-1])).nonzero()
                image_end = int(hits[-1]) + 1 if len(hits) else 0
            if image_end > self.max_length:
                raise BadSample(
                    sample.where, sample.id,
                    f"needs {image_end} tokens to reach the end of its image tokens, over "
                    f"max_length {self.max_length}; image tokens are never cut",
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if not (labels != IGNORE).any():
            raise BadSample(sample.where, sample.id, f"no answer token left within max_length {self.max_length}")
        result = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        for k in per_token:
            result[k] = out[k][: len(ids)]
        for k in per_row:
            result[k] = out[k][:, : len(ids)]
        result["input_ids"] = ids
        result["attention_mask"] = torch.ones_like(ids)
        result["labels"] = labels
        return result


def sequence_major(key: str, value: Any, length: int) -> bool:
    """Whether ``value`` is a per-sample tensor with one row per token, ``[1, L, ...]`` (mllama's
    ``cross_attention_mask [1, L, images, tiles]``): cut and padded along ``L`` like the text."""
    return (torch.is_tensor(value) and value.dim() >= 3 and value.shape[0] == 1 and value.shape[1] == length > 1
            and not key.startswith("pixel"))


#: Processors whose ``token_type_ids`` mark the suffix (1: causal attention, the answer) against the
#: prefix (0: bidirectional). Left at the processor's all-zero default, the prompt would attend to the
#: answers during training; here every token from the first answer token on is suffix.
SUFFIX_TOKEN_TYPES = ("PaliGemmaProcessor",)


def _suffix_types(labels: torch.Tensor) -> torch.Tensor:
    types = torch.zeros_like(labels)
    supervised = (labels != IGNORE).nonzero()
    if len(supervised):
        types[int(supervised[0]):] = 1
    return types


def image_token_ids(processor: Any) -> set[int]:
    """Token ids that stand for image content in ``processor``'s expanded text: its image token and
    the ids it declares for images (Gemma 3's soft tokens, InternVL's ``<img>``/``</img>``, ...)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = {getattr(processor, "image_token_id", None)}
    declared = getattr(type(processor), "image_token_ids", None)
    if declared is not None:
        try:
            ids |= set(processor.image_token_ids)
        except (AttributeError, TypeError):
            pass
    token = getattr(processor, "image_token", None)
    if token:
        ids.add(tokenizer.convert_tokens_to_ids(token))
    for name in ("image_token", "boi_token", "eoi_token", "fake_image_token", "start_image_token", "end_image_token"):
        token = getattr(tokenizer, name, None) or getattr(processor, name, None)
        if isinstance(token, str):
            ids.add(tokenizer.convert_tokens_to_ids(token))
    unk = getattr(tokenizer, "unk_token_id", None)
    return {i for i in ids if isinstance(i, int) and i != unk}
