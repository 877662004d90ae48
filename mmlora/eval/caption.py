"""Captioning evaluation: generate with a fixed, recorded protocol and score with pycocoevalcap.

Protocol (recorded in every metrics file): the prompt (default: the common "Provide a one-sentence
caption for the provided image."), greedy decoding (beam search optional), ``max_new_tokens`` 64, the
split and number of images. Scores: COCO's PTB tokenization, BLEU-1..4, METEOR, ROUGE-L and CIDEr
from pycocoevalcap; SPICE when its Stanford models are installed, otherwise reported as
unavailable (never as zero); the mean caption length in PTB tokens; the number of empty captions;
and whatever an extra scorer adds (``extra``: the shapes world's slot accuracy is one, passed in by
the CLI and the demo from ``mmlora.showcase.slots``). Captions come from the one generation path
(``mmlora.generate``); models from any reference (``mmlora.runs.reference``).

Layer: eval.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any


from mmlora.config.schema import CaptionEvalSpec
from mmlora.data.samples import CAPTION_PROMPT, load_image
from mmlora.errors import MmloraError
from mmlora.optional import require
from mmlora.generate import generate_answers
from mmlora.runs.reference import load_reference

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
    require("pycocoevalcap", "eval", "caption scoring")
    import pycocoevalcap.spice.spice as spice  # pycocoevalcap is a namespace package: locate a module

    lib = Path(spice.__file__).parent / "lib"
    return any(lib.glob("stanford-corenlp-*.jar"))


def score_captions(results: dict[int, str], references: dict[int, list[str]]) -> dict[str, Any]:
    """pycocoevalcap scores of ``results`` (one caption per image id) against ``references``."""
    require("pycocoevalcap", "eval", "caption scoring")
    if shutil.which("java") is None:  # the PTB tokenizer and METEOR run Stanford/METEOR jars
        raise MmloraError("caption metrics need Java for pycocoevalcap's PTB tokenizer and METEOR: "
                          "install a Java runtime (e.g. apt-get install default-jre-headless)")
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
    """Any model reference (``mmlora.runs.reference``) → ``(model, processor, route)``: ``route(n)``
    gives the adapter of each of ``n`` images for a mixed composition, else None."""
    loaded = load_reference(ref)
    if loaded.processor is None or not hasattr(loaded.model, "generate"):
        raise MmloraError(f"{ref}: not an image-text-to-text model or run; captions need one")
    return loaded.model, loaded.processor, loaded.route


#: An extra scorer: ``(captions by image id, the CaptionSet) -> {metric: value}`` (e.g. the shapes
#: world's slot accuracy, ``mmlora.showcase.slots.slot_scores``).
ExtraScorer = Callable[[dict[int, str], "CaptionSet"], dict[str, float]]


def score_all(results: dict[int, str], data: CaptionSet, extra: ExtraScorer | None = None) -> dict[str, Any]:
    """pycocoevalcap scores against ``data``'s references, plus ``extra``'s."""
    return score_captions(results, data.references) | (extra(results, data) if extra else {})


def evaluate_models(models: dict[str, str], data: CaptionSet, out_dir: str | Path, split: str = "test",
                    prompt: str = CAPTION_PROMPT, max_new_tokens: int = 64, num_beams: int = 1,
                    batch_size: int = 16, extra: ExtraScorer | None = None) -> dict[str, Any]:
    """Caption ``data`` with each model and write, under ``out_dir``: ``results_<name>.json`` (COCO
    results format), ``captions_<name>.jsonl`` (per image: generated and references), ``metrics.json``
    (protocol + scores) and ``table.md`` (the models side by side)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = [load_image(data.files[i], str(data.files[i]), str(i)) for i in data.image_ids]
    protocol = {"prompt": prompt, "decoding": "greedy" if num_beams == 1 else f"beam search ({num_beams} beams)",
                "max_new_tokens": max_new_tokens, "split": split, "num_images": len(images),
                "tokenization": "PTB (pycocoevalcap)"}
    report: dict[str, Any] = {"protocol": protocol, "models": {}}
    for name, ref in models.items():
        model, processor, route = load_captioner(ref)
        routed = route(len(images))
        captions = generate_answers(model, processor, images, prompt, batch_size, max_new_tokens, num_beams, routed)
        results = dict(zip(data.image_ids, captions))
        scores = score_all(results, data, extra) | {"empty_captions": sum(not c for c in captions)}
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


def empty_caption_warnings(report: dict[str, Any]) -> list[str]:
    """One line per model of ``report`` that produced empty captions (scored as wrong, silently)."""
    n = report["protocol"]["num_images"]
    return [f"{name}: {m['scores']['empty_captions']} of {n} captions are empty (its scores count them as wrong); the "
            "model may not have learned to answer the prompt: try --max-new-tokens or another --prompt"
            for name, m in report["models"].items() if m["scores"].get("empty_captions")]


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


class CaptionMetrics:
    """The in-training caption evaluation (``train.caption_eval``, a ``mmlora.train.hooks.Evaluator``):
    caption a validation subset with the one generation path and score it."""

    def __init__(self, spec: CaptionEvalSpec, extra: ExtraScorer | None = None):
        self.every, self.spec, self.extra = spec.every, spec, extra
        self.data = CaptionSet.from_coco(spec.coco, limit=spec.limit)
        self.images = [load_image(self.data.files[i], str(self.data.files[i]), str(i)) for i in self.data.image_ids]

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        if processor is None:  # a CLIP run: nothing generates captions
            return {}
        captions = generate_answers(model, processor, self.images, self.spec.prompt or CAPTION_PROMPT,
                                    max_new_tokens=self.spec.max_new_tokens)
        scores = score_all(dict(zip(self.data.image_ids, captions)), self.data, self.extra)
        return {f"caption/{k}": v for k, v in scores.items() if isinstance(v, float)}
