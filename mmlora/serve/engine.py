"""The model side of serving: one base, many adapters, batches that name an adapter per sample.

An :class:`Engine` holds one base (an image-text-to-text model for captions, or an unfused open_clip
CLIP for segmentation) and the runs it may serve, by name. Adapters load lazily on first use, and at
most ``max_loaded`` stay loaded (least recently used goes first). Three ways to run a batch whose
samples name different adapters (``mode``), the S-LoRA comparison in miniature:

* ``mixed``  — one PEFT model holding the loaded adapters; one forward with ``adapter_names`` per sample.
* ``switch`` — the same model, but a batch holds one adapter: ``set_adapter`` between batches.
* ``merged`` — one merged copy of the base per adapter (``merge_and_unload``), a batch per adapter.

Not thread-safe: one worker (``mmlora.serve.batcher``) calls it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmlora.runs.compose import BASE, adapters_per_sample
from mmlora.errors import MmloraError

MODES = ("mixed", "switch", "merged")


@dataclass
class Item:
    """One request's work: the adapter, an RGB PIL image, and a prompt (caption) or classes (segment)."""

    kind: str
    adapter: str
    image: Any
    prompt: str | None = None
    classes: list[str] | None = None


def _adapter_path(run: Path, base_ref: str) -> Path:
    """The PEFT folder of an adapter-only run, checked against the served base."""
    import json

    from mmlora.runs.compose import _check_run
    from mmlora.runs.export import run_folder
    from mmlora.models.loading import resolve_pretrained

    folder = run_folder(run)
    if not (folder / "manifest.json").is_file():
        raise MmloraError(f"{run}: not a run with adapters (no manifest.json)")
    manifest = _check_run(folder)
    if str(resolve_pretrained(manifest["base_model"])) != str(resolve_pretrained(base_ref)):
        raise MmloraError(f"{run} adapted {manifest['base_model']}, not the served base {base_ref}")
    path = folder / manifest["adapters"][0]["path"]
    cfg = json.loads((path / "adapter_config.json").read_text())
    if cfg.get("use_dora"):
        raise MmloraError(f"{run}: DoRA adapters cannot share a mixed batch (PEFT); serve LoRA runs")
    return path


class Engine:
    """See the module docstring. ``adapters``: ``{name: run folder}``."""

    def __init__(self, base: str, adapters: dict[str, str | Path], mode: str = "mixed", max_loaded: int = 8,
                 max_new_tokens: int = 32, seg_mode: str = "maskclip"):
        from mmlora.models.loading import resolve_pretrained

        if mode not in MODES:
            raise MmloraError(f"mode {mode!r}: use one of {', '.join(MODES)}")
        if max_loaded < 1:
            raise MmloraError("max_loaded must be at least 1")
        bad = [n for n in adapters if n == BASE or not n.replace("-", "").replace("_", "").isalnum()]
        if bad:
            raise MmloraError(f"adapter names {bad}: use letters, digits, - and _ ({BASE} means the base itself)")
        self.base_ref, self.mode, self.max_loaded = base, mode, max_loaded
        self.max_new_tokens, self.seg_mode = max_new_tokens, seg_mode
        self.paths = {name: _adapter_path(Path(run), base) for name, run in adapters.items()}
        path = resolve_pretrained(base)
        self.kind = "segment" if (Path(path) / "open_clip_config.json").is_file() else "caption"
        if self.kind == "caption":
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.base = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
            self.processor = AutoProcessor.from_pretrained(path)
        else:
            import open_clip

            from mmlora.models.loading import load_clip
            from mmlora.models.unfuse import unfuse_attention

            self.base, _, self.tokenizer = load_clip(path)
            self.base = self.base.float().eval()
            unfuse_attention(self.base)
            size = self.base.visual.image_size
            self.image_size = size[0] if isinstance(size, (tuple, list)) else size
            self.mean = self.base.visual.image_mean or open_clip.OPENAI_DATASET_MEAN
            self.std = self.base.visual.image_std or open_clip.OPENAI_DATASET_STD
            self._texts: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.peft: nn.Module | None = None  # mixed / switch: the base wrapped with the loaded adapters
        self.loaded: OrderedDict[str, nn.Module | None] = OrderedDict()  # name → merged model (merged mode)
        self.loads = 0  # adapter loads so far (evictions make adapters load again)

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
        if self.mode == "merged":
            model = PeftModel.from_pretrained(copy.deepcopy(self.base), path).merge_and_unload().eval()
            self.loaded[name] = model
        elif self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.peft.load_adapter(path, adapter_name=name)
            self.peft.eval()

    def _evict(self, name: str) -> None:
        model = self.loaded.pop(name)
        if self.mode != "merged":
            import warnings

            with warnings.catch_warnings():  # expected here: each batch sets the adapters it needs
                warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted")
                self.peft.delete_adapter(name)
            if self.kind == "segment":
                for key in [k for k in self._texts if k[0] == name]:
                    del self._texts[key]
        del model

    def _model_for(self, names: list[str]) -> tuple[nn.Module, list[str] | None]:
        """The model to run a batch with, and the per-sample adapter names to route (mixed)."""
        self.ensure(set(names))
        if self.mode == "merged":
            (name,) = set(names)
            return (self.base if name == BASE else self.loaded[name]), None
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
        return (item.kind,) if self.mode == "mixed" else (item.kind, item.adapter)

    # ------------------------------------------------------------------ work

    def run(self, items: list[Item]) -> list[dict]:
        kinds = {i.kind for i in items}
        if kinds != {self.kind}:
            raise MmloraError(f"this server's base does {self.kind}, not {', '.join(sorted(kinds - {self.kind}))}")
        return self._caption(items) if self.kind == "caption" else self._segment(items)

    @torch.no_grad()
    def _caption(self, items: list[Item]) -> list[dict]:
        model, names = self._model_for([i.adapter for i in items])
        tok = self.processor.tokenizer
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": i.prompt}]}],
            add_generation_prompt=True) for i in items]
        side, tok.padding_side = tok.padding_side, "left"
        try:
            batch = self.processor(images=[i.image for i in items], text=texts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
        routed = {"adapter_names": names} if names else {}
        gen = model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id, **routed)
        out = self.processor.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [{"caption": c.strip()} for c in out]

    def _text(self, adapter: str, classes: list[str]) -> torch.Tensor:
        """``[C, E]`` class embeddings through ``adapter``'s text tower (cached per adapter and classes)."""
        from mmlora.models.text import SHAPES_TEMPLATES, class_embeddings

        key = (adapter, tuple(classes))
        if key in self._texts:
            self._texts.move_to_end(key)
            return self._texts[key]
        model = self.loaded.get(adapter) if self.mode == "merged" and adapter != BASE else None
        if model is None and self.peft is not None and adapter != BASE:
            self.peft.set_adapter(adapter)
            model = self.peft
        if model is None and self.peft is not None:
            with self.peft.disable_adapter():
                emb = class_embeddings(self.peft, self.tokenizer, classes, SHAPES_TEMPLATES)
        else:
            emb = class_embeddings(model or self.base, self.tokenizer, classes, SHAPES_TEMPLATES)
        self._texts[key] = emb
        while len(self._texts) > 256:
            self._texts.popitem(last=False)
        return emb

    @torch.no_grad()
    def _segment(self, items: list[Item]) -> list[dict]:
        import numpy as np

        from mmlora.models.dense import dense_features

        s = self.image_size
        pixels = []
        for i in items:  # every image to the CLIP's square input: one batch, whatever the upload's shape
            x = torch.from_numpy(np.asarray(i.image.resize((s, s), resample=3), dtype=np.float32) / 255.0)
            pixels.append((x.permute(2, 0, 1) - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None])
        adapters = [i.adapter for i in items]
        self.ensure(set(adapters))
        texts = [self._text(i.adapter, i.classes) for i in items]
        model, names = self._model_for(adapters)
        with adapters_per_sample(model, names):
            feats = dense_features(model, torch.stack(pixels), self.seg_mode)  # [B, gh, gw, E]
        out = []
        for item, f, text in zip(items, feats, texts):
            logits = (f @ F.normalize(text, dim=-1).T).permute(2, 0, 1)[None]  # [1, C, gh, gw]
            w, h = item.image.size
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]
            out.append({"mask": logits.argmax(0).to(torch.uint8), "classes": item.classes})
        return out
