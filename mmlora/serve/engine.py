"""The model side of serving: one base, many adapters, batches that name an adapter per sample.

An :class:`Engine` holds one base (an image-text-to-text model for captions, or an unfused open_clip
CLIP for segmentation) and the runs it may serve, by name (``mmlora.serve.pool``: registered from their
manifests, loaded on first use, at most ``--max-loaded`` adapters or MiB of them, least recently used
first out). Four ways to run a batch whose samples name different adapters (``mode``), the S-LoRA
comparison in miniature:

* ``gathered`` — the adapters paged from their folders into per-layer stacks on the base and gathered
  per sample (``mmlora.serve.gathered``): one base matmul plus two batched matmuls per layer, whatever
  the adapters in the batch; LoRA and DoRA, several adapters per run, and modules trained in place as
  per-adapter copies (``mmlora.serve.full``); page-in runs on a thread of its own.
* ``mixed``  — one PEFT model holding the loaded adapters; one forward with ``adapter_names`` per sample.
* ``switch`` — the same model, but a batch holds one adapter: ``set_adapter`` between batches.
* ``merged`` — one merged copy of the base per run (its adapters merged, its full modules loaded).

Captions in ``gathered`` and ``mixed`` mode decode with continuous batching (``join`` / ``step``:
``mmlora.generate.iteration``): requests join and leave the running batch between decoding steps. The
other modes, and segmentation, run fixed batches (``run``).

Not thread-safe: one worker (``mmlora.serve.batcher``) calls it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmlora.errors import MmloraError
from mmlora.generate import generate_answers, pixel_rows_per_image
from mmlora.generate.iteration import Decoding, Request, RunningBatch, iteration_unsupported
from mmlora.models.clip import image_settings
from mmlora.models.dense import dense_features
from mmlora.models.text import class_embeddings, template_list
from mmlora.models.unfuse import unfuse_attention
from mmlora.runs.compose import BASE, adapters_per_sample
from mmlora.runs.reference import load_reference
from mmlora.runs.save import load_placement
from mmlora.serve.full import FullCopies, make_copies, read_full
from mmlora.adapters.parts import combine, read_adapter
from mmlora.serve.gathered import LoraPool
from mmlora.serve.pool import Budget, Pager, ServedRun, parse_max_loaded, register
from mmlora.serve.routing import ServedRouter

MODES = ("mixed", "switch", "merged", "gathered")


@dataclass
class Item:
    """One request's work: the adapter, an RGB PIL image, and a prompt (caption) or classes (segment);
    a caption's ``max_new_tokens`` (None: the engine's) and ``on_text`` (called with each new piece of
    the answer as it is decoded)."""

    kind: str
    adapter: str
    image: Any
    prompt: str | None = None
    classes: list[str] | None = None
    max_new_tokens: int | None = None
    on_text: Callable[[str], None] | None = None
    routed_from: str | None = None  # the router's name, once the router gave this item its expert
    cancelled: bool = False  # set when its client went away (a streamed answer's connection closed)

    def gone(self) -> bool:
        """Whether nobody waits for this item's answer any more (generation's ``gone`` callables)."""
        return self.cancelled


class RequestError(MmloraError):
    """A request that cannot run as sent (the HTTP layer answers 400 with the message)."""


def reserved_strings(processor: Any) -> list[str]:
    """The strings a caption prompt must not contain: the tokenizer's special tokens and the
    processor's placeholder tokens (``<image>``, ``<|image_pad|>``, ``<start_of_image>``, ...). A prompt
    holding one would change how many images the processor thinks the request has, and fail the
    whole batch it joins."""
    tok = getattr(processor, "tokenizer", processor)
    found = set(tok.all_special_tokens)
    found |= {t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if t.special}
    for name in dir(processor):
        if name.endswith("_token") and not name.startswith("_"):
            value = getattr(processor, name, None)
            if isinstance(value, str):
                found.add(value)
    return sorted(t for t in found if t and t.strip())


class Engine:
    """See the module docstring. ``adapters``: ``{name: run folder}``; ``max_loaded``: a number of
    adapters or a size (``"512MiB"``); ``continuous``: decode captions with continuous batching where
    the mode and the model allow it (``continuous_off`` says why not, otherwise)."""

    def __init__(self, base: str, adapters: dict[str, str | Path], mode: str = "mixed", max_loaded: int | str = 8,
                 max_new_tokens: int = 32, seg_mode: str = "maskclip", templates: str = "shapes",
                 continuous: bool = True, router: tuple[str, str | Path] | None = None):
        if mode not in MODES:
            raise MmloraError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        self.max_count, self.max_bytes = parse_max_loaded(max_loaded)
        bad = [n for n in adapters if n == BASE or not n.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise MmloraError(f"adapter names {bad}: use letters, digits, - and _ ({BASE} means the base itself)")
        self.base_ref, self.mode, self.max_loaded = base, mode, str(max_loaded)
        self.max_new_tokens, self.seg_mode = max_new_tokens, seg_mode
        self.templates = template_list(templates)  # class prompts for segmentation (mmlora.models.text)
        loaded = load_reference(base)
        if loaded.recipe is not None:
            raise MmloraError(f"--base {base} is a run: serve the base model it adapted and name the run with --adapter")
        self.base = loaded.model.float().eval()
        base_params = sum(p.numel() for p in self.base.parameters())
        self.runs: dict[str, ServedRun] = {name: register(name, run, base, mode, base_params)
                                           for name, run in adapters.items()}
        self.kind = "segment" if loaded.is_clip else "caption"
        if self.kind == "caption":
            self.processor = loaded.processor
            self.reserved = reserved_strings(self.processor)
            if mode in ("mixed", "gathered") and adapters and (rows := pixel_rows_per_image(self.processor)) != 1:
                raise MmloraError(f"--mode {mode} needs one pixel row per image, but {base}'s processor gives {rows} "
                                  "(patches flattened, as Qwen2-VL does, or images cut into tiles, as LLaVA-NeXT "
                                  "and mllama do): use --mode switch or --mode merged")
        else:
            self.tokenizer = loaded.tokenizer
            unfuse_attention(self.base)
            self.image_size, self.mean, self.std = image_settings(self.base)
            self._texts: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.budget = Budget(self.max_count, self.max_bytes)
        self.peft: nn.Module | None = None  # mixed / switch: the base wrapped with the loaded adapters
        self.merged: dict[str, nn.Module] = {}  # merged mode: name → merged copy
        self.loads = 0  # adapter loads so far (evictions make adapters load again)
        self.pool = LoraPool(self.base) if mode == "gathered" else None
        self.full = FullCopies(self.base) if mode == "gathered" else None
        self.pager = Pager(self._read) if mode == "gathered" else None  # the batcher sets pager.notify
        self.continuous_off = self._continuous_off(continuous)
        self.running: RunningBatch | None = None
        self.router = ServedRouter(*router, self.runs, mode, self.kind) if router is not None else None

    @property
    def router_name(self) -> str | None:
        return self.router.name if self.router is not None else None

    def route_requests(self, items: list[Item]) -> None:
        """Give each item naming the router the expert its router picks (``mmlora.serve.routing``)."""
        if self.router is not None:
            self.router.route(items, self.processor, self.base)

    def _continuous_off(self, wanted: bool) -> str | None:
        """Why captions do not decode with continuous batching here (None: they do)."""
        if not wanted:
            return "turned off"
        if self.kind != "caption":
            return "segmentation has no decoding steps"
        if self.mode not in ("gathered", "mixed"):
            return f"--mode {self.mode} runs one adapter per batch"
        reason = iteration_unsupported(self.base)
        return f"{self.base_ref}: {reason}" if reason else None

    @property
    def continuous(self) -> bool:
        return self.continuous_off is None

    # ------------------------------------------------------------------ adapters

    @property
    def adapter_names(self) -> list[str]:
        return list(self.runs)

    @property
    def loaded(self) -> list[str]:
        return list(self.budget.loaded)

    def loaded_mib(self) -> float:
        """Memory of the loaded adapters (their own tensors and full copies), MiB."""
        return self.budget.nbytes / 2**20

    def ready(self, name: str) -> bool:
        """Whether ``name``'s requests may start now: loaded, or (gathered) read from disk already; else
        its read is started in the background (the pager) and the answer is False for now. (A request
        naming the router is routed when it starts, its expert loaded then.)"""
        if name in (BASE, self.router_name) or name in self.budget or self.pager is None:
            return True
        if self.pager.ready(name):
            return True
        self.pager.request(name)
        return False

    def fits(self, names: set[str]) -> bool:
        """Whether the adapters ``names`` could be loaded together (``--max-loaded``)."""
        return self.budget.fits({n: self.runs[n].nbytes for n in names if n not in (BASE, self.router_name)})

    def ensure(self, names: set[str], keep: set[str] = frozenset()) -> None:
        """Load ``names`` (not ``__base__``), evicting the least recently used others, never one of ``keep``."""
        names = {n for n in names if n != BASE}
        add = {n: self.runs[n].nbytes for n in names if n not in self.budget}
        if not self.fits(names):
            limit = f"{self.max_count} adapters" if self.max_count is not None else f"{self.max_bytes / 2**20:.1f} MiB"
            raise MmloraError(f"a batch needs {len(names)} adapters but at most {limit} may be loaded")
        victims = self.budget.victims(add, keep | names)
        if self.peft is None:  # room first, then the new adapters
            for victim in victims:
                self._evict(victim)
        for name in names:
            if name in self.budget:
                self.budget.touch(name)
            else:
                self._load(name)
                self.budget.loaded[name] = add[name]
        if self.peft is not None:  # PEFT cannot delete its last (active) adapter: the new ones first
            for victim in victims:
                self._evict(victim)

    def _read(self, name: str) -> tuple[dict, dict]:
        """Gathered page-in, the part that may run beside decoding: LoRA parts and full tensors from disk."""
        run = self.runs[name]
        parts = combine([read_adapter(path, self.base) for path in run.adapters], str(run.folder))
        return parts, (read_full(run.full) if run.full is not None else {})

    def _load(self, name: str) -> None:
        from peft import PeftModel

        self.loads += 1
        run = self.runs[name]
        if self.pool is not None:
            parts, state = self.pager.take(name) if self.pager.ready(name) else self._read(name)
            self.pool.add(name, parts)
            self.full.add(name, make_copies(self.base, state) if state else {})
        elif self.mode == "merged":
            model = load_placement(copy.deepcopy(self.base), run.folder)
            self.merged[name] = (model.merge_and_unload() if hasattr(model, "merge_and_unload") else model).eval()
        elif self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, run.adapters[0], adapter_name=name).eval()
        else:
            self.peft.load_adapter(run.adapters[0], adapter_name=name)
            self.peft.eval()

    def _evict(self, name: str) -> None:
        del self.budget.loaded[name]
        if self.pool is not None:
            self.pool.remove(name)
            self.full.remove(name)
        elif self.mode == "merged":
            del self.merged[name]
        else:
            with warnings.catch_warnings():  # expected here: each batch sets the adapters it needs
                warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
                self.peft.delete_adapter(name)
        if self.kind == "segment":
            for key in [k for k in self._texts if k[0] == name]:
                del self._texts[key]

    def route(self, names: list[str] | None = None, every_row: str | None = None) -> contextlib.AbstractContextManager:
        """The context a forward of the base runs in, row ``b`` with adapter ``names[b]`` (or every row
        with ``every_row``): gathered stacks and full copies, or PEFT's mixed-batch routing."""
        if self.pool is not None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.pool.route(names, every_row))
            stack.enter_context(self.full.route(names, every_row))
            return stack
        if self.mode == "mixed" and self.peft is not None and names is not None:
            return adapters_per_sample(self.peft, names)
        return contextlib.nullcontext()

    def _model_for(self, names: list[str]) -> tuple[nn.Module, contextlib.AbstractContextManager, list[str] | None]:
        """The model to run a fixed batch with, the routing context, and per-sample adapter names for
        ``generate`` (PEFT's mixed batches route through ``generate``'s own ``adapter_names``)."""
        self.ensure(set(names))
        if self.mode == "merged":
            (name,) = set(names)
            return (self.base if name == BASE else self.merged[name]), contextlib.nullcontext(), None
        if self.pool is not None:
            return self.base, self.route(list(names)), None
        if self.peft is None:  # only __base__ requests so far
            return self.base, contextlib.nullcontext(), None
        if self.mode == "mixed":
            return self.peft, contextlib.nullcontext(), list(names)
        (name,) = set(names)
        if name == BASE:
            return self.peft, contextlib.nullcontext(), [BASE] * len(names)
        self.peft.set_adapter(name)
        return self.peft, contextlib.nullcontext(), None

    def batch_key(self, item: Item) -> tuple:
        """Items with different keys never share a fixed batch (mixed batches mix adapters, the others do
        not; one token budget per batch)."""
        budget = item.max_new_tokens or self.max_new_tokens
        return (item.kind, budget) if self.mode in ("mixed", "gathered") else (item.kind, budget, item.adapter)

    # ------------------------------------------------------------------ continuous batching

    @property
    def in_use(self) -> set[str]:
        """Adapters of the sequences decoding now (never evicted)."""
        return {s.request.adapter for s in self.running.rows} if self.running is not None else set()

    @property
    def active(self) -> int:
        return len(self.running) if self.running is not None else 0

    def join(self, items: list[Item]) -> list[Decoding]:
        """Prefill caption ``items`` into the running batch (routed, their adapters loaded first, none of those
        in use evicted); returns their sequences, some done already."""
        self.route_requests(items)
        self.ensure({i.adapter for i in items}, keep=self.in_use)
        if self.running is None:
            self.running = RunningBatch(self.base, self.processor, self.route)
        requests = [Request(i.image, i.prompt, i.adapter, i.max_new_tokens or self.max_new_tokens, i.on_text,
                            handle=i, gone=i.gone) for i in items]
        return self.running.join(requests)

    def step(self) -> list[Decoding]:
        """One decoding step of every running sequence; the ones that finished."""
        return self.running.step() if self.running is not None else []

    def abort(self) -> list[Decoding]:
        """Drop every running sequence (after a step failed); returns them."""
        rows = list(self.running.rows) if self.running is not None else []
        self.running = None
        return rows

    def answer(self, seq: Decoding) -> dict:
        """The result of a finished sequence: its caption, why it ended (``stop`` | ``length`` | ``cancelled``),
        token counts."""
        text = self.processor.tokenizer.decode(seq.tokens, skip_special_tokens=True).strip()
        out = {"caption": text, "finish_reason": seq.finish_reason,
               "prompt_tokens": seq.prompt_tokens, "completion_tokens": len(seq.tokens) + (seq.finish_reason == "stop")}
        return out | self._routed(seq.request.handle)

    @staticmethod
    def _routed(item: Item | None) -> dict:
        return {"routed_to": item.adapter} if item is not None and item.routed_from is not None else {}

    # ------------------------------------------------------------------ fixed batches

    def check(self, item: Item) -> None:
        """Refuse (:class:`RequestError`) a prompt holding a special or placeholder token, which would
        fail the batch it joined. Called before an item joins a batch (the task is checked by the caller)."""
        if item.prompt is not None:
            bad = [t for t in self.reserved if t in item.prompt]
            if bad:
                raise RequestError(f"the prompt contains {', '.join(map(repr, bad))}: special and image placeholder "
                                   "tokens are added by the server; send the text only")

    def run(self, items: list[Item]) -> list[dict]:
        kinds = {i.kind for i in items}
        if kinds != {self.kind}:
            raise MmloraError(f"this server's base does {self.kind}, not {', '.join(sorted(kinds - {self.kind}))}")
        if self.kind == "segment":
            return self._segment(items)
        self.route_requests(items)
        return [r | self._routed(i) for r, i in zip(self._caption(items), items)]

    @torch.no_grad()
    def _caption(self, items: list[Item]) -> list[dict]:
        model, routed, names = self._model_for([i.adapter for i in items])
        (budget,) = {i.max_new_tokens or self.max_new_tokens for i in items}  # one per batch (batch_key)
        with routed:
            out = generate_answers(model, self.processor, [i.image for i in items], [i.prompt for i in items],
                                   batch_size=len(items), max_new_tokens=budget, adapter_names=names,
                                   gone=[i.gone for i in items])
        results = [{"caption": c} for c in out]
        for item, r in zip(items, results):
            if item.on_text is not None and r["caption"] and not item.cancelled:
                item.on_text(r["caption"])  # fixed batches stream the whole answer at once
        return results

    def _text(self, adapter: str, classes: list[str]) -> torch.Tensor:
        """``[C, E]`` class embeddings through ``adapter``'s text tower (cached per adapter and classes)."""
        key = (adapter, tuple(classes))
        if key in self._texts:
            self._texts.move_to_end(key)
            return self._texts[key]
        model = self.merged.get(adapter) if self.mode == "merged" else None
        if model is None and self.peft is not None and adapter != BASE:
            self.peft.set_adapter(adapter)
            model = self.peft
        if self.pool is not None:
            with self.route(every_row=adapter):
                emb = class_embeddings(self.base, self.tokenizer, classes, self.templates)
        elif model is None and self.peft is not None:
            with self.peft.disable_adapter():
                emb = class_embeddings(self.peft, self.tokenizer, classes, self.templates)
        else:
            emb = class_embeddings(model or self.base, self.tokenizer, classes, self.templates)
        self._texts[key] = emb
        while len(self._texts) > 256:
            self._texts.popitem(last=False)
        return emb

    @torch.no_grad()
    def _segment(self, items: list[Item]) -> list[dict]:
        s = self.image_size
        pixels = []
        for i in items:  # every image to the CLIP's square input: one batch, whatever the upload's shape
            x = torch.from_numpy(np.asarray(i.image.resize((s, s), resample=3), dtype=np.float32) / 255.0)
            pixels.append((x.permute(2, 0, 1) - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None])
        adapters = [i.adapter for i in items]
        self.ensure(set(adapters))
        texts = [self._text(i.adapter, i.classes) for i in items]
        model, routed, names = self._model_for(adapters)
        with routed, adapters_per_sample(model, names):
            feats = dense_features(model, torch.stack(pixels), self.seg_mode)  # [B, gh, gw, E]
        out = []
        for item, f, text in zip(items, feats, texts):
            logits = (f @ F.normalize(text, dim=-1).T).permute(2, 0, 1)[None]  # [1, C, gh, gw]
            w, h = item.image.size
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
            out.append({"mask": logits.argmax(0).to(torch.uint8), "classes": item.classes})
        return out
