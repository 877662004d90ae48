"""The model side of serving: one base, many adapters, batches that name an adapter per sample.

An :class:`Engine` holds one base (an image-text-to-text model for captions, or an unfused open_clip
CLIP for segmentation) and the runs it may serve, by name. Adapters load lazily on first use, and at
most ``max_loaded`` stay loaded (least recently used goes first). Three ways to run a batch whose
samples name different adapters (``mode``), the S-LoRA comparison in miniature:

* ``mixed``  — one PEFT model holding the loaded adapters; one forward with ``adapter_names`` per sample.
* ``switch`` — the same model, but a batch holds one adapter: ``set_adapter`` between batches.
* ``merged`` — one merged copy of the base per adapter (``merge_and_unload``), a batch per adapter.
* ``gathered`` — the adapters paged straight from their folders into per-layer stacks on the base
  and gathered per sample (``mmlora.serve.gathered``): one base matmul plus two batched matmuls per
  layer, whatever the number of adapters in the batch; LoRA and DoRA runs.

Not thread-safe: one worker (``mmlora.serve.batcher``) calls it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmlora.errors import MmloraError
from mmlora.generate import generate_answers, pixel_rows_per_image
from mmlora.models.clip import image_settings
from mmlora.models.dense import dense_features
from mmlora.models.loading import resolve_pretrained
from mmlora.models.text import class_embeddings, template_list
from mmlora.models.unfuse import unfuse_attention
from mmlora.runs.compose import BASE, adapter_only, adapter_path, adapters_per_sample
from mmlora.runs.layout import require_weights
from mmlora.runs.reference import load_reference
from mmlora.serve.gathered import LoraPool, read_adapter

MODES = ("mixed", "switch", "merged", "gathered")


@dataclass
class Item:
    """One request's work: the adapter, an RGB PIL image, and a prompt (caption) or classes (segment)."""

    kind: str
    adapter: str
    image: Any
    prompt: str | None = None
    classes: list[str] | None = None


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


def _adapter_path(run: Path, base_ref: str, mode: str) -> Path:
    """The PEFT folder of an adapter-only run, checked against the served base."""
    weights = require_weights(run)
    manifest = adapter_only(weights)
    if str(resolve_pretrained(manifest["base_model"])) != str(resolve_pretrained(base_ref)):
        raise MmloraError(f"{run} adapted {manifest['base_model']}, not the served base {base_ref}")
    path = adapter_path(weights)
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("use_dora") and mode == "mixed":
        raise MmloraError(f"{run}: DoRA adapters cannot share a mixed batch (PEFT); serve it with --mode gathered")
    return path


class Engine:
    """See the module docstring. ``adapters``: ``{name: run folder}``."""

    def __init__(self, base: str, adapters: dict[str, str | Path], mode: str = "mixed", max_loaded: int = 8,
                 max_new_tokens: int = 32, seg_mode: str = "maskclip", templates: str = "shapes"):
        if mode not in MODES:
            raise MmloraError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if max_loaded < 1:
            raise MmloraError("max_loaded must be at least 1")
        bad = [n for n in adapters if n == BASE or not n.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise MmloraError(f"adapter names {bad}: use letters, digits, - and _ ({BASE} means the base itself)")
        self.base_ref, self.mode, self.max_loaded = base, mode, max_loaded
        self.max_new_tokens, self.seg_mode = max_new_tokens, seg_mode
        self.templates = template_list(templates)  # class prompts for segmentation (mmlora.models.text)
        self.paths = {name: _adapter_path(Path(run), base, mode) for name, run in adapters.items()}
        loaded = load_reference(base)
        if loaded.recipe is not None:
            raise MmloraError(f"--base {base} is a run: serve the base model it adapted and name the run with --adapter")
        self.base = loaded.model.float().eval()
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
        self.peft: nn.Module | None = None  # mixed / switch: the base wrapped with the loaded adapters
        self.loaded: OrderedDict[str, nn.Module | None] = OrderedDict()  # name → merged model (merged mode)
        self.loads = 0  # adapter loads so far (evictions make adapters load again)
        self.pool = LoraPool(self.base) if mode == "gathered" else None

    # ------------------------------------------------------------------ adapters

    @property
    def adapter_names(self) -> list[str]:
        return list(self.paths)

    def ensure(self, names: set[str]) -> None:
        """Load ``names`` (not ``__base__``), evicting the least recently used others beyond ``max_loaded``."""
        names = {n for n in names if n != BASE}
        if len(names) > self.max_loaded:
            raise MmloraError(f"a batch needs {len(names)} adapters but at most {self.max_loaded} may be loaded")
        for name in names:
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            self._load(name)
            self.loaded[name] = None if self.mode != "merged" else self.loaded.get(name)
            while len(self.loaded) > self.max_loaded:
                victim = next(n for n in self.loaded if n not in names)
                self._evict(victim)

    def _load(self, name: str) -> None:
        from peft import PeftModel

        self.loads += 1
        path = self.paths[name]
        if self.pool is not None:
            self.pool.add(name, read_adapter(path, self.base))
        elif self.mode == "merged":
            model = PeftModel.from_pretrained(copy.deepcopy(self.base), path).merge_and_unload().eval()
            self.loaded[name] = model
        elif self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.peft.load_adapter(path, adapter_name=name)
            self.peft.eval()

    def _evict(self, name: str) -> None:
        model = self.loaded.pop(name)
        if self.pool is not None:
            self.pool.remove(name)
        elif self.mode != "merged":
            with warnings.catch_warnings():  # expected here: each batch sets the adapters it needs
                warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
                self.peft.delete_adapter(name)
        if self.kind == "segment" and self.mode != "merged":
            for key in [k for k in self._texts if k[0] == name]:
                del self._texts[key]
        del model

    def _model_for(self, names: list[str]) -> tuple[nn.Module, list[str] | None]:
        """The model to run a batch with, and the per-sample adapter names to route (mixed)."""
        self.ensure(set(names))
        if self.mode == "merged":
            (name,) = set(names)
            return (self.base if name == BASE else self.loaded[name]), None
        if self.pool is not None:
            return self.base, list(names)  # routed by the pool
        if self.peft is None:  # only __base__ requests so far
            return self.base, None
        if self.mode == "mixed":
            return self.peft, list(names)
        (name,) = set(names)
        if name == BASE:
            return self.peft, [BASE] * len(names)
        self.peft.set_adapter(name)
        return self.peft, None

    def batch_key(self, item: Item) -> tuple:
        """Items with different keys never share a batch (mixed batches mix adapters, the others do not)."""
        return (item.kind,) if self.mode in ("mixed", "gathered") else (item.kind, item.adapter)

    # ------------------------------------------------------------------ work

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
        return self._caption(items) if self.kind == "caption" else self._segment(items)

    @torch.no_grad()
    def _caption(self, items: list[Item]) -> list[dict]:
        model, names = self._model_for([i.adapter for i in items])
        routed = self.pool.route(names) if self.pool is not None else contextlib.nullcontext()
        with routed:
            out = generate_answers(model, self.processor, [i.image for i in items], [i.prompt for i in items],
                                   batch_size=len(items), max_new_tokens=self.max_new_tokens,
                                   adapter_names=None if self.pool is not None else names)
        return [{"caption": c} for c in out]

    def _text(self, adapter: str, classes: list[str]) -> torch.Tensor:
        """``[C, E]`` class embeddings through ``adapter``'s text tower (cached per adapter and classes)."""
        key = (adapter, tuple(classes))
        if key in self._texts:
            self._texts.move_to_end(key)
            return self._texts[key]
        model = self.loaded.get(adapter) if self.mode == "merged" and adapter != BASE else None
        if model is None and self.peft is not None and adapter != BASE:
            self.peft.set_adapter(adapter)
            model = self.peft
        if self.pool is not None:
            with self.pool.route(every_row=adapter):
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
        model, names = self._model_for(adapters)
        routed = self.pool.route(names) if self.pool is not None else None
        with routed or adapters_per_sample(model, names):
            feats = dense_features(model, torch.stack(pixels), self.seg_mode)  # [B, gh, gw, E]
        out = []
        for item, f, text in zip(items, feats, texts):
            logits = (f @ F.normalize(text, dim=-1).T).permute(2, 0, 1)[None]  # [1, C, gh, gw]
            w, h = item.image.size
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
            out.append({"mask": logits.argmax(0).to(torch.uint8), "classes": item.classes})
        return out
