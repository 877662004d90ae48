"""Iteration-level batching (continuous batching): requests join and leave a running batch between
decoding steps, each with its own rows of the KV cache.

A :class:`RunningBatch` holds, for the sequences decoding together, one KV cache whose rows are left
padded to a common length, the 2-D attention mask that says which of its cells are real, and each
row's last position and token. :meth:`RunningBatch.join` prefills new requests (one left-padded batch
through the model's own ``prepare_inputs_for_generation``, as ``generate`` builds its first step),
takes each one's first token and appends their cache rows to the running ones, the shorter side padded
on the left; :meth:`RunningBatch.step` runs one decoding step for every row. A finished row leaves at
once, and the cache columns that no remaining row uses are cut off, so the cache never outgrows the
longest live sequence. Positions are explicit per row, so padding never shifts a sequence's positions.

Greedy decoding; every request's answer equals :func:`mmlora.generate.generate_answers` on that request
alone (tested). ``generate`` itself cannot do this: it runs a fixed batch from prefill until its
longest answer ends, so a request that arrives one step later waits for the whole batch, and a
finished row keeps its seat until then.

Supported where it can be exact: caches of plain full-attention layers over the text (``DynamicLayer``;
sliding-window, recurrent and cross-attention caches cannot be padded and concatenated this way), 1-D
positions, and a generation config that adds no logits processing to greedy decoding;
:func:`iteration_unsupported` says why not (Gemma 3 and 4: sliding windows; Qwen2/2.5/3-VL: mRoPE;
mllama: cross-attention).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmlora.generate import encode_requests

#: generation-config fields that change greedy decoding's choice of token, with their neutral values
_LOGITS_FIELDS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                  "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "min_length": 0,
                  "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                  "sequence_bias": None, "exponential_decay_length_penalty": None}


@dataclass
class Request:
    """One prompt about one image, answered with ``adapter`` (routed by the caller's ``route``)."""

    image: Any
    prompt: str
    adapter: str = "__base__"
    max_new_tokens: int = 32
    on_text: Callable[[str], None] | None = None  # called with each new piece of the answer (streaming)
    handle: Any = None  # the caller's own reference (e.g. its future)
    gone: Callable[[], bool] | None = None  # True once nobody waits for the answer: it leaves at the next step


@dataclass
class Decoding:
    """A request being answered: its generated token ids and why it finished (``stop`` | ``length`` |
    ``cancelled``: its client went away)."""

    request: Request
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    sent: str = ""  # the part of the answer already passed to ``on_text``

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _generation_config(model: Any) -> Any:
    config = getattr(model, "generation_config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "generation_config", None)
    return config


def iteration_unsupported(model: Any) -> str | None:
    """Why ``model`` cannot decode in a :class:`RunningBatch` (None: it can)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = {**(getattr(text, "rope_scaling", None) or {}), **(getattr(text, "rope_parameters", None) or {})}
    if "mrope_section" in rope:
        return "its positions are 3-D (mRoPE)"
    if getattr(text, "cross_attention_layers", None):
        return "its cross-attention layers cache the image's keys, not the text's"
    cache = DynamicCache(config=config)
    other = sorted({type(layer).__name__ for layer in getattr(cache, "layers", []) if type(layer) is not DynamicLayer})
    if other:
        return f"its KV cache has {', '.join(other)} layers (sliding-window or recurrent)"
    gen = _generation_config(model)
    changed = [k for k, neutral in _LOGITS_FIELDS.items() if gen is not None and getattr(gen, k, neutral) not in (neutral, None)]
    if changed:
        return f"its generation config changes greedy decoding ({', '.join(changed)})"
    return None


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the generation config's ``eos_token_id`` (one or several), else the tokenizer's."""
    gen = _generation_config(model)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


Route = Callable[[list[str]], contextlib.AbstractContextManager]


class RunningBatch:
    """Sequences decoding together (see the module docstring). ``route(adapters)`` returns the context
    a forward runs in, given the adapter of each row (None: no routing). Not thread-safe."""

    def __init__(self, model: Any, processor: Any, route: Route | None = None):
        self.model, self.processor, self.tokenizer = model, processor, processor.tokenizer
        self.route = route or (lambda adapters: contextlib.nullcontext())
        self.eos = eos_ids(model, self.tokenizer)
        self.rows: list[Decoding] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 where the cache holds a real token
        self.pos: torch.Tensor | None = None  # [B] position of each row's last token
        self.last: torch.Tensor | None = None  # [B] each row's last token
        self.steps = 0  # decoding steps run so far
        self.prefills = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _forward(self, adapters: list[str], **inputs: Any) -> Any:
        with self.route(adapters):
            return self.model(**inputs, return_dict=True)

    @torch.no_grad()
    def join(self, requests: Sequence[Request]) -> list[Decoding]:
        """Prefill ``requests`` and add them to the batch; returns their sequences (some may be done
        already: a one-token answer or an immediate end of turn) — done ones do not stay."""
        if not requests:
            return []
        from transformers import DynamicCache

        batch = encode_requests(self.processor, [r.image for r in requests], [r.prompt for r in requests]).to(self.device)
        mask = batch["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        extra = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        inputs = self.model.prepare_inputs_for_generation(
            batch["input_ids"], cache=DynamicCache(config=self._config()), attention_mask=mask, position_ids=pos,
            use_cache=True, is_first_iteration=True, **extra)
        out = self._forward([r.adapter for r in requests], **inputs)
        self.prefills += 1
        new = [Decoding(r, int(m.sum())) for r, m in zip(requests, mask)]
        token = out.logits[:, -1].argmax(-1)
        self._append(new, out.cache, mask, pos[:, -1], token)
        return new

    def _config(self) -> Any:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.config

    def _append(self, new: list[Decoding], cache: Any, mask: torch.Tensor, pos: torch.Tensor, token: torch.Tensor) -> None:
        """Add prefilled rows (their cache, mask, last positions and first tokens) to the batch."""
        if not self.rows:
            self.rows, self.cache, self.mask, self.pos, self.last = list(new), cache, mask, pos, token
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_left_pad(mine.keys, length, 2), _left_pad(theirs.keys, length, 2)])
                mine.values = torch.cat([_left_pad(mine.values, length, 2), _left_pad(theirs.values, length, 2)])
            self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
            self.pos, self.last = torch.cat([self.pos, pos]), torch.cat([self.last, token])
            self.rows += new
        self._take(token, range(len(self.rows) - len(new), len(self.rows)))

    def _take(self, token: torch.Tensor, rows: Sequence[int]) -> None:
        """Record each row's new token, stream its text, mark the finished, and let them leave."""
        for i, t in zip(rows, token.tolist()):
            seq = self.rows[i]
            if t in self.eos:
                seq.finish_reason = "stop"
            else:
                seq.tokens.append(t)
                if len(seq.tokens) >= seq.request.max_new_tokens:
                    seq.finish_reason = "length"
            self._stream(seq)
        keep = [i for i, s in enumerate(self.rows) if not s.done]
        if len(keep) < len(self.rows):
            self._leave(keep)

    def _stream(self, seq: Decoding) -> None:
        """Pass the answer's new text to ``on_text``: what decodes completely so far, trailing spaces
        held back (the final answer is stripped), everything once the sequence is done."""
        if seq.request.on_text is None:
            return
        text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True).strip()
        if not seq.done:
            text = text.rstrip()
            if text.endswith("\ufffd"):  # a character still incomplete in its bytes
                return
        if len(text) > len(seq.sent) and text.startswith(seq.sent):
            seq.request.on_text(text[len(seq.sent):])
            seq.sent = text

    def _leave(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.pos = self.last = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask, self.pos, self.last = self.mask[index], self.pos[index], self.last[index]
        start = int(self.mask.argmax(1).min())  # columns before every row's first real token go
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, start:], layer.values[index, :, start:]
        self.mask = self.mask[:, start:]

    def _drop_gone(self) -> list[Decoding]:
        """Let the sequences nobody waits for any more leave, finished as ``cancelled``."""
        gone = [s for s in self.rows if s.request.gone is not None and s.request.gone()]
        if gone:
            for seq in gone:
                seq.finish_reason = "cancelled"
            self._leave([i for i, s in enumerate(self.rows) if not s.done])
        return gone

    @torch.no_grad()
    def step(self) -> list[Decoding]:
        """One decoding step for every row; returns the sequences that finished (they have left),
        those whose client went away first (``cancelled``, without a step)."""
        gone = self._drop_gone()
        if not self.rows:
            return gone
        rows = list(self.rows)
        mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        pos = self.pos + 1
        inputs = self.model.prepare_inputs_for_generation(
            self.last[:, None], cache=self.cache, attention_mask=mask, position_ids=pos[:, None], use_cache=True,
            is_first_iteration=False)
        out = self._forward([s.request.adapter for s in rows], **inputs)
        self.steps += 1
        self.cache, self.mask, self.pos = out.cache, mask, pos
        token = out.logits[:, -1].argmax(-1)
        self.last = token
        self._take(token, range(len(rows)))
        return gone + [s for s in rows if s.done]
