"""Captioning evaluation: generate with a fixed, recorded protocol and score with pycocoevalcap.

Protocol (recorded in every metrics file): the prompt (default: the common "Provide a one-sentence
caption for the provided image."), greedy decoding (beam search optional), ``max_new_tokens`` 64, the
split and number of images. Scores: COCO's PTB tokenization, BLEU-1..4, METEOR, ROUGE-L and CIDEr
from pycocoevalcap; SPICE when its Stanford models are installed, otherwise reported as
unavailable (never as zero); the mean caption length in PTB tokens; and for the shapes world, slot
accuracy — shape, colour and position parsed from each caption against the ground-truth objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmlora.data.samples import CAPTION_PROMPT
from mmlora.showcase.shapes import COLOURS, POSITIONS

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@dataclass
class CaptionSet:
    """Images with their reference captions (and ground-truth objects for the shapes world)."""

    image_ids: list[int]
    files: dict[int, Path]
    references: dict[int, list[str]]
    objects: dict[int, list[dict]] = field(default_factory=dict)

    @classmethod
    def from_coco(cls, path: str | Path, image_root: str | Path | None = None, limit: int | None = None) -> CaptionSet:
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        root = Path(image_root) if image_root else (path.parent.parent if path.parent.name == "annotations" else path.parent)
        images = sorted(data["images"], key=lambda im: im["id"])[:limit]
        ids = [im["id"] for im in images]
        refs: dict[int, list[str]] = {i: [] for i in ids}
        for ann in data["annotations"]:
            if ann["image_id"] in refs:
                refs[ann["image_id"]].append(ann["caption"])
        objects = {im["id"]: im["objects"] for im in images if "objects" in im}
        return cls(ids, {im["id"]: root / im["file_name"] for im in images}, refs, objects)


def spice_available() -> bool:
    """SPICE needs Stanford CoreNLP jars that pycocoevalcap downloads on first use (not possible offline)."""
    import pycocoevalcap.spice.spice as spice  # pycocoevalcap is a namespace package: locate a module

    lib = Path(spice.__file__).parent / "lib"
    return any(lib.glob("stanford-corenlp-*.jar"))


def score_captions(results: dict[int, str], references: dict[int, list[str]]) -> dict[str, Any]:
    """pycocoevalcap scores of ``results`` (one caption per image id) against ``references``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(results)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tok.tokenize({i: [{"caption": results[i]}] for i in ids})
    scores: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if spice_available():
        from pycocoevalcap.spice.spice import Spice

        scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    else:
        scores["SPICE"] = "unavailable (Stanford CoreNLP models not installed)"
    scores["mean_length"] = sum(len(res[i][0].split()) for i in ids) / max(len(ids), 1)
    return scores


# ----------------------------------------------------------------------------- slot accuracy









# ----------------------------------------------------------------------------- generation



# ----------------------------------------------------------------------------- models side by side

def load_captioner(ref: str | Path):
    """A base model (preset, folder, cached hub id), a run (its adapters on its base, in the run's
    precision), a merged export (INT4 included) or a composition of runs (``mmlora.runs.compose``) →
    ``(model, processor)``; see :func:`load_routed_captioner` for routing samples to adapters."""
    model, processor, _ = load_routed_captioner(ref)
    return model, processor


def load_routed_captioner(ref: str | Path):
    """``(model, processor, route)``: ``route(n)`` gives the adapter of each of ``n`` images for a
    mixed composition, else None."""
    from mmlora.runs.compose import load_reference
    from mmlora.runs.export import load_run
    from mmlora.adapters.int4 import INT4_MANIFEST

    composed = load_reference(str(ref))
    if composed is not None:
        return composed.model, composed.processor, composed.route
    path = Path(ref)
    if (path / INT4_MANIFEST).is_file():
        model, processor, _ = load_run(path)
        return model, processor, lambda n: None
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmlora.models.loading import resolve_pretrained

    resolved = resolve_pretrained(ref)
    return (AutoModelForImageTextToText.from_pretrained(resolved).eval(), AutoProcessor.from_pretrained(resolved),
            lambda n: None)


def evaluate_models(models: dict[str, str], data: CaptionSet, out_dir: str | Path, split: str = "test",
                    prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64, num_beams: int = 1,
                    batch_size: int = 16) -> dict[str, Any]:
    """Caption ``data`` with each model and write, under ``out_dir``: ``results_<name>.json`` (COCO
    results format), ``captions_<name>.jsonl`` (per image: generated and references), ``metrics.json``
    (protocol + scores) and ``table.md`` (the models side by side)."""
    from mmlora.data.samples import load_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [load_image(data.files[i], str(data.files[i]), str(i)) for i in data.image_ids]
    protocol = {"prompt": prompt, "decoding": "greedy" if num_beams == 1 else f"beam search ({num_beams} beams)",
                "max_new_tokens": max_new_tokens, "split": split, "num_images": len(images),
                "tokenization": "PTB (pycocoevalcap)"}
    report: dict[str, Any] = {"protocol": protocol, "models": {}}
    for name, ref in models.items():
        model, processor, route = load_routed_captioner(ref)
        routed = route(len(images))
        captions = generate_answers(model, processor, images, prompt, batch_size, max_new_tokens, num_beams, routed)
        results = dict(zip(data.image_ids, captions))
        scores = score_captions(results, data.references) | mean_slot_accuracy(results, data.objects)
        (out / f"results_{name}.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in results.items()], indent=1) + "\n")
        with open(out / f"captions_{name}.jsonl", "w") as f:
            for k, (i, c) in enumerate(results.items()):
                row = {"image_id": i, "file": str(data.files[i]), "caption": c, "references": data.references[i]}
                f.write(json.dumps(row | ({"adapter": routed[k]} if routed else {})) + "\n")
        report["models"][name] = {"source": str(ref), "scores": scores}
        if routed:
            report["models"][name]["routing"] = "round robin over " + ", ".join(dict.fromkeys(routed))
        del model
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(markdown_table(report))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    cols = list(METRICS) + ["mean_length"]
    slot_cols = sorted({k for m in report["models"].values() for k in m["scores"] if k.startswith("slot_")})
    cols += slot_cols
    head = "| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for name, m in report["models"].items():
        s = m["scores"]
        rows.append(f"| {name} | " + " | ".join(f"{s[c]:.3f}" if isinstance(s.get(c), float) else "-" for c in cols) + " |")
    p = report["protocol"]
    note = (f"\nProtocol: prompt \"{p['prompt']}\", {p['decoding']}, max {p['max_new_tokens']} new tokens, "
            f"split {p['split']}, {p['num_images']} images; BLEU/METEOR/ROUGE-L/CIDEr from pycocoevalcap.\n")
    return head + "\n".join(rows) + "\n" + note
