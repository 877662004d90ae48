"""Few-shot image classification with CLIP: zero-shot prompts against k-shot class prototypes.

The benchmark CLIP adaptation papers (CoOp, Tip-Adapter, CLIP-LoRA) report: images of N classes, k
labelled shots per class drawn from the train split (several seeds), accuracy on the test split.
Methods here need no training at evaluation time, so they compare *models* (a base against its LoRA
runs) on equal terms:

* ``zero-shot`` — cosine between the image embedding and each class's prompt-ensemble text embedding.
* ``prototype`` — nearest class mean of the k shots' normalised image embeddings (cosine).
* ``blend`` — the sum of both cosines' softmax probabilities (text prior + visual evidence).

Data: a folder of class sub-folders (``root/<split>/<class>/*.png``, torchvision's ImageFolder) or a
segmentation folder (``classes.txt``, ``masks/``): each image's label is the class covering most of
its labelled non-background pixels.

Run: ``mmlora eval fewshot --data data/shapes/world_B --model base=shapes-clip-base --shots 1,4,16``.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmlora.data.samples import load_image
from mmlora.data.segmentation import IGNORE_INDEX, SegmentationFolder
from mmlora.errors import MmloraError
from mmlora.eval.segmentation import load_clip_for_eval
from mmlora.models.clip import image_settings
from mmlora.models.text import class_embeddings, template_list
from mmlora.optional import require

METHODS = ("zero-shot", "prototype", "blend")


def labelled_images(root: str | Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(classes, [(image path, class index)])`` from an ImageFolder split or a segmentation folder."""
    root = Path(root)
    if (root / "classes.txt").is_file():
        from PIL import Image

        folder = SegmentationFolder(root, split)
        classes = folder.classes
        bg = classes.index("background") if "background" in classes else None
        items = []
        for s in folder.samples:
            with Image.open(s.mask) as m:
                counts = np.bincount(np.asarray(m).ravel(), minlength=256)
            counts[IGNORE_INDEX] = 0
            if bg is not None:
                counts[bg] = 0
            if counts.sum():
                items.append((s.image, int(counts.argmax())))
        keep = sorted({c for _, c in items})  # classes no image shows cannot be classified
        return [classes[c] for c in keep], [(p, keep.index(c)) for p, c in items]
    folder = root / split
    if not folder.is_dir():
        raise MmloraError(f"{root}: neither a segmentation folder (classes.txt) nor an image folder with {split}/<class>/")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    items = [(p, i) for i, c in enumerate(classes) for p in sorted((folder / c).iterdir())
             if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    if not items:
        raise MmloraError(f"{folder}: no images in class sub-folders")
    return classes, items


@torch.no_grad()
def image_embeddings(model, preprocess, paths: list[Path], batch_size: int = 64) -> torch.Tensor:
    """``[N, E]`` normalised image embeddings."""

    out = []
    for i in range(0, len(paths), batch_size):
        images = torch.stack([preprocess(load_image(p, str(p), p.stem)) for p in paths[i:i + batch_size]])
        out.append(F.normalize(model.encode_image(images).float(), dim=-1))
    return torch.cat(out)


def support_indices(labels: list[int], shots: int, seed: int) -> list[int]:
    """``shots`` indices per class, drawn with ``seed`` (all of a class's images when it has fewer)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    return [i for c in sorted(by_class) for i in rng.sample(by_class[c], min(shots, len(by_class[c])))]


def classify(method: str, query: torch.Tensor, text: torch.Tensor | None, support: torch.Tensor | None,
             support_labels: torch.Tensor | None, num_classes: int, scale: float = 100.0) -> torch.Tensor:
    """Predicted class per query row (``query [Q, E]``, ``text [C, E]``, ``support [S, E]``)."""
    zs = query @ text.T if text is not None else None
    if method == "zero-shot":
        return zs.argmax(1)
    protos = torch.zeros(num_classes, support.shape[1])
    protos.index_add_(0, support_labels, support)
    protos = F.normalize(protos, dim=-1)
    proto_logits = query @ protos.T
    if method == "prototype":
        return proto_logits.argmax(1)
    return ((zs * scale).softmax(1) + (proto_logits * scale).softmax(1)).argmax(1)


def evaluate_fewshot(models: dict[str, str], data_root: str | Path, out_dir: str | Path, shots: list[int],
                     seeds: int = 3, templates: str = "shapes", train_split: str = "train",
                     test_split: str = "test", limit: int | None = None) -> dict[str, Any]:

    classes, train = labelled_images(data_root, train_split)
    test_classes, test = labelled_images(data_root, test_split)
    index = {c: i for i, c in enumerate(classes)}
    test = [(p, index[test_classes[c]]) for p, c in test if test_classes[c] in index]
    test = test[:limit] if limit else test
    if not test:
        raise MmloraError(f"{data_root}: no {test_split} image of a class that {train_split} has")
    prompts = template_list(templates)
    y = torch.tensor([c for _, c in test])
    train_labels = [c for _, c in train]
    rows: dict[str, dict[str, Any]] = {}
    for name, ref in models.items():
        model, tokenizer = load_clip_for_eval(ref)
        preprocess = _preprocess(model)
        text = class_embeddings(model, tokenizer, classes, prompts)
        q = image_embeddings(model, preprocess, [p for p, _ in test])
        rows[f"{name}/zero-shot"] = {"accuracy": float((classify("zero-shot", q, text, None, None, len(classes)) == y).float().mean())}
        needed = sorted({i for k in shots for s in range(seeds) for i in support_indices(train_labels, k, s)})
        feats = dict(zip(needed, image_embeddings(model, preprocess, [train[i][0] for i in needed])))
        for method in ("prototype", "blend"):
            for k in shots:
                accs = []
                for seed in range(seeds):
                    idx = support_indices(train_labels, k, seed)
                    sup = torch.stack([feats[i] for i in idx])
                    pred = classify(method, q, text, sup, torch.tensor([train_labels[i] for i in idx]), len(classes))
                    accs.append(float((pred == y).float().mean()))
                rows[f"{name}/{method}/{k}-shot"] = {"accuracy": statistics.mean(accs),
                                                    "std": statistics.pstdev(accs), "per_seed": accs}
    report = {"protocol": {"data": str(data_root), "classes": classes, "train_split": train_split,
                           "test_split": test_split, "num_test": len(test), "shots": shots, "seeds": seeds,
                           "templates": templates, "label": "dominant non-background class" if (Path(data_root) / "classes.txt").is_file() else "folder"},
              "models": {n: str(r) for n, r in models.items()}, "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(fewshot_table(report))
    return report


def _preprocess(model):
    """The CLIP's own evaluation transform (resize, centre crop, normalise)."""
    open_clip = require("open_clip", "clip", "few-shot CLIP evaluation")

    size, mean, std = image_settings(model)
    return open_clip.image_transform(size, is_train=False, mean=mean, std=std)


def fewshot_table(report: dict[str, Any]) -> str:
    lines = ["| model / method | accuracy |", "|---|---|"]
    for row, r in report["rows"].items():
        acc = f"{r['accuracy']:.3f}" + (f" ± {r['std']:.3f}" if "std" in r else "")
        lines.append(f"| {row} | {acc} |")
    p = report["protocol"]
    lines.append(f"\n{len(p['classes'])} classes, {p['num_test']} {p['test_split']} images, shots from {p['train_split']} "
                 f"({p['seeds']} seeds, mean ± std); labels: {p['label']}; chance {1 / len(p['classes']):.3f}.")
    return "\n".join(lines) + "\n"
