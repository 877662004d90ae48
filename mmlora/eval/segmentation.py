"""Open-vocabulary segmentation evaluation with CLIP: class texts → dense logits → mIoU.

Text side: each class name (with optional synonyms, ``"cat|kitten"``) is put into every prompt
template, embedded, normalised and averaged (the prompt ensemble). ``imagenet`` is CLIP's 80
ImageNet templates (the default for real models); ``shapes`` is a set in the shapes world's caption
language. Background: a class named ``background`` is embedded from background words; or, with
``bg_threshold``, pixels whose highest class probability is below it become background.

Image side (recorded in the output as the protocol): the image's short side is resized to
``short_side`` (default: the CLIP's input size), normalised with the CLIP's mean/std, run through a
dense mode (``mmlora.models.dense``) whole or in sliding windows (``crop``, ``stride``), and the logits
are upsampled to the label map's size. Metrics: ``mmlora.eval.seg_metrics`` (dataset-level mIoU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmlora.data.segmentation import SegmentationFolder
from mmlora.errors import MmloraError
from mmlora.eval.seg_metrics import SegMetrics
from mmlora.models.clip import image_settings
from mmlora.models.dense import segment_logits
from mmlora.models.text import class_embeddings, preprocess, template_list
from mmlora.models.unfuse import unfuse_attention
from mmlora.runs.compose import adapters_per_sample
from mmlora.runs.reference import load_reference









def load_clip_for_eval(ref: str | Path):
    """``(model, tokenizer)`` for a CLIP reference: a preset or open_clip folder, or a run (its adapters
    merged into its base, its full modules loaded) — fp32, eval mode, attention unfused for the dense
    modes."""
    model, tokenizer, _ = load_clip_reference(ref)
    return model, tokenizer


def load_clip_reference(ref: str | Path):
    """``(model, tokenizer, loaded)``: any CLIP reference (``mmlora.runs.reference``: a preset or folder,
    a run, a composition of runs — a weighted merge, or mixed, one adapter per image, routed by the
    caller through ``loaded.route``). Single adapters are merged for speed; fp32, eval, attention unfused."""
    loaded = load_reference(ref)
    if not loaded.is_clip:
        raise MmloraError(f"{ref}: not a CLIP (open_clip) model or run; segmentation needs one")
    model = loaded.model
    if loaded.adapters is None and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.float().eval()
    unfuse_attention(model)
    return model, loaded.tokenizer, loaded


def evaluate_segmentation(models: str | dict[str, str], data_root: str | Path, split: str, modes: list[str],
                          out_dir: str | Path, templates: str = "shapes", crop: int | None = None,
                          stride: int | None = None, short_side: int | None = None, bg_threshold: float | None = None,
                          limit: int | None = None, unseen: list[str] | None = None) -> dict[str, Any]:
    """Score every model x mode on a segmentation folder; rows are named ``mode`` for one unnamed model
    (a plain reference) or ``name/mode``. Writes ``metrics.json`` and ``table.md`` into ``out_dir``."""

    named = {"": models} if isinstance(models, (str, Path)) else dict(models)
    folder = SegmentationFolder(data_root, split)
    classes = folder.classes
    prompts = template_list(templates)
    n_images = min(len(folder), limit) if limit else len(folder)
    loaded = {}
    for name, ref in named.items():
        model, tokenizer, reference = load_clip_reference(ref)
        route = reference.route(n_images)
        texts = {}
        for adapter in dict.fromkeys(route or [None]):
            if adapter is not None:
                model.set_adapter(adapter)  # the text side switches; images are routed per sample below
            texts[adapter] = class_embeddings(model, tokenizer, classes, prompts)
        loaded[name] = (model, texts, route, *image_settings(model))
    short_side = short_side or max(v[3] for v in loaded.values())
    protocol = {"models": {n: str(r) for n, r in named.items()}, "data": str(data_root), "split": split,
                "classes": classes, "templates": templates, "short_side": short_side, "crop": crop, "stride": stride,
                "bg_threshold": bg_threshold, "upsampling": "bilinear to the label size", "num_images": 0}
    rows = {(n, m): SegMetrics(len(classes)) for n in named for m in modes}
    from tqdm.auto import tqdm

    for i in tqdm(range(n_images), desc="eval seg", disable=n_images < 20):
        image, label = folder.load(i)
        inputs: dict[tuple, torch.Tensor] = {}  # models sharing a normalisation share the input
        for name, (model, texts, route, _, mean, std) in loaded.items():
            if (mean, std) not in inputs:
                inputs[(mean, std)] = preprocess(image, short_side, mean, std)
            x = inputs[(mean, std)]
            adapter = route[i] if route else None
            for mode in modes:
                with adapters_per_sample(model, [adapter] if adapter else None):
                    logits = segment_logits(model, x, texts[adapter], mode, crop, stride, out_size=label.shape)
                pred = logits.argmax(0)
                if bg_threshold is not None and "background" in classes:
                    probs = (logits * 100).softmax(0)
                    pred[probs.max(0).values < bg_threshold] = classes.index("background")
                rows[(name, mode)].update(pred, label)
    protocol["num_images"] = n_images
    routed = {n: ", ".join(v[1]) for n, v in loaded.items() if v[2]}
    if routed:
        rr = {n: f"round robin over {a}" for n, a in routed.items()}
        protocol["adapters"] = rr[""] if list(rr) == [""] else rr
    report: dict[str, Any] = {"protocol": protocol, "modes": {}}
    unseen = unseen or []
    for (name, mode), m in rows.items():
        scores = m.compute()
        per_class = dict(zip(classes, scores["IoU"]))
        seen_iou = [v for c, v in per_class.items() if c not in unseen and v is not None]
        unseen_iou = [v for c, v in per_class.items() if c in unseen and v is not None]
        scores["IoU"] = per_class
        scores["mIoU_seen"] = sum(seen_iou) / len(seen_iou) if seen_iou else None
        scores["mIoU_unseen"] = sum(unseen_iou) / len(unseen_iou) if unseen_iou else None
        del scores["Acc"]
        report["modes"][f"{name}/{mode}" if name else mode] = scores
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(seg_table(report))
    return report


def seg_table(report: dict[str, Any]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"  # noqa: E731
    lines = ["| model / mode | mIoU | mIoU seen | mIoU unseen | aAcc | fwIoU |", "|---|---|---|---|---|---|"]
    for mode, s in report["modes"].items():
        lines.append(f"| {mode} | {fmt(s['mIoU'])} | {fmt(s['mIoU_seen'])} | {fmt(s['mIoU_unseen'])} | "
                     f"{fmt(s['aAcc'])} | {fmt(s['fwIoU'])} |")
    p = report["protocol"]
    lines.append(f"\nProtocol: {p['split']} split, {p['num_images']} images, templates {p['templates']}, short side "
                 f"{p['short_side']}, crop {p['crop'] or 'whole image'}, stride {p['stride'] or '-'}; dataset-level mIoU.")
    return "\n".join(lines) + "\n"
