"""The embedded default: adapt the shipped world-A bases to world B, and show before/after.

``make demo`` (= ``mmlora demo``) runs the whole pipeline on CPU, with nothing downloaded:

1. **data** — the shapes worlds A and B, generated into ``data/shapes`` (reused when present);
2. **plan + train, captioning** — ``recipes/shapes/llava-lora-b-wide.yaml``: LoRA on every linear
   layer of the three modalities of ``shapes-llava-base`` over world-B conversations (world B: a new
   shape, a new colour, a new caption style);
3. **plan + train, segmentation** — ``recipes/shapes/clip-seg-lora-b.yaml``: dense LoRA on the image
   tower's attention of ``shapes-clip-base`` over world-B masks (text tower frozen), the class
   ``triangle`` held out as unseen;
4. **caption evaluation** (pycocoevalcap CIDEr, BLEU-4; slot accuracy) and **segmentation evaluation**
   (dataset-level mIoU on seen and unseen classes) of base and adapted models on world-B test images,
   both CLIPs with the recipe's dense mode and class prompts (``clearclip``, training-free, is scored
   too and kept in the metrics file);
5. **an overlay picture** — a world-B test image showing the held-out class, its ground truth, and the
   base's and the adapted CLIP's segmentations — and the before/after table.

A finished run in the output folder is reused when it was trained by the same recipe, and retrained
when the recipe changed (delete ``runs/demo`` to retrain anyway). Each step's
outputs stay in the output folder: runs (adapters, loss curves, model cards), evaluation folders
(metrics.json, table.md, per-image captions) and ``overlay.png``.

Run: ``make demo`` or ``mmlora demo [--out runs/demo]``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmlora.config.loading import load_recipe, recipe_to_yaml
from mmlora.data.segmentation import IGNORE_INDEX, SegmentationFolder
from mmlora.errors import MmloraError
from mmlora.eval.caption import CaptionSet, evaluate_models
from mmlora.eval.overlay import render_overlay
from mmlora.eval.segmentation import evaluate_segmentation
from mmlora.runs.layout import find_weights
from mmlora.showcase.seg_demo import ClipSegmenter
from mmlora.showcase.shapes import generate, world_differs
from mmlora.showcase.slots import NOVEL, novel_recall, slot_scores
from mmlora.train.loop import Trainer

#: The demo's recipes ship inside the package (``recipes/shapes/`` links to them in a checkout).
RECIPES = Path(__file__).resolve().parent / "recipes"
#: The worlds the demo reads (and generates when they are missing or differ).
DEMO_WORLDS = ("A", "B", "C")
LLAVA_RECIPE = RECIPES / "llava-lora-b-wide.yaml"
CLIP_RECIPE = RECIPES / "clip-seg-lora-b.yaml"
#: A training-free dense mode scored beside the recipe's (in the metrics file; the table compares like
#: with like: both CLIPs in the recipe's mode, with its prompts).
ALSO_SCORED_MODE = "clearclip"


@dataclass
class DemoReport:
    out_dir: Path
    data_dir: Path
    runs: dict[str, Path]
    before: dict[str, float | None]
    after: dict[str, float | None]
    outputs: dict[str, Path] = field(default_factory=dict)
    sample_captions: list[tuple[str, str, str]] = field(default_factory=list)  # (reference, base, adapted)
    unseen: list[str] = field(default_factory=list)


def retarget_recipe(recipe, data_dir: Path, output_dir: Path, overrides: dict[str, Any]):
    """The recipe with its ``data/shapes`` paths under ``data_dir`` and its output in ``output_dir``."""
    def move(spec):
        p = Path(spec.path)
        parts = p.parts
        if parts[:2] == ("data", "shapes"):
            p = data_dir.joinpath(*parts[2:])
        return spec.model_copy(update={"path": str(p)})

    data = recipe.data.model_copy(update={"train": [move(d) for d in recipe.data.train],
                                          "val": [move(d) for d in recipe.data.val]})
    train = recipe.train.model_copy(update={"output_dir": str(output_dir), **overrides})
    return recipe.model_copy(update={"data": data, "train": train})


def _train(recipe_path: Path, data_dir: Path, run_dir: Path, overrides: dict[str, Any], log) -> Path:
    if not recipe_path.is_file():
        raise MmloraError(f"{recipe_path}: the demo recipe is missing; reinstall mmlora")
    recipe = retarget_recipe(load_recipe(recipe_path), data_dir, run_dir, overrides)
    if find_weights(run_dir) is not None:
        saved = run_dir / "recipe.yaml"
        if saved.is_file() and saved.read_text() == recipe_to_yaml(recipe):
            log(f"  reusing {run_dir} (delete it to retrain)")
            return run_dir
        log(f"  {run_dir} was trained by another recipe: retraining it")
        shutil.rmtree(run_dir)
    trainer = Trainer(recipe, recipe_name=recipe_path.stem)
    trainer.setup()
    trainer.train()
    return run_dir


def ensure_worlds(data_dir: Path, scale: float = 1.0, own_dir: Path | None = None, log=print) -> Path:
    """The folder holding the demo's worlds: ``data_dir`` when its worlds are the ones the demo
    generates (seed, image size, split sizes and generator version, from each ``world.json``), or
    generated there when it holds none. Worlds made with other settings (e.g. ``--scale 0.2``) are left
    alone and the demo uses its own in ``own_dir`` (regenerated when they differ), so its numbers never
    depend on what else was generated."""

    def difference(folder: Path) -> str | None:
        return next((r for w in DEMO_WORLDS if (r := world_differs(folder / f"world_{w}", w, scale=scale))), None)

    reason = difference(data_dir)
    if reason is None:
        return data_dir
    if not any(data_dir.glob("world_*")):
        data_dir.mkdir(parents=True, exist_ok=True)
        generate(data_dir, worlds=DEMO_WORLDS, scale=scale)
        return data_dir
    if own_dir is None:
        raise MmloraError(f"{reason}: the demo needs the worlds it generates; pass an empty --data folder")
    log(f"      {reason}: the demo uses its own worlds in {own_dir}")
    if difference(own_dir) is not None:
        shutil.rmtree(own_dir, ignore_errors=True)
        own_dir.mkdir(parents=True)
        generate(own_dir, worlds=DEMO_WORLDS, scale=scale)
    return own_dir


def overlay_figure(image_path: Path, truth, masks: list, classes: list[str], out: Path,
                   labels: tuple[str, ...] = ("input", "ground truth", "base", "adapted")) -> Path:
    """One row: the input, the ground truth and each segmentation as an overlay, upscaled 3x, titled."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.open(image_path).convert("RGB")
    truth = np.where(truth == IGNORE_INDEX, 0, truth).astype(np.uint8)
    panels = [image] + [render_overlay(image, m, classes) for m in (truth, *masks)]
    scale, title = 3, 22
    w, h = image.width * scale, image.height * scale
    sheet = Image.new("RGB", (w * len(panels), h + title), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=16)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        sheet.paste(panel.resize((w, h), Image.NEAREST), (i * w, title))
        draw.text((i * w + 6, 2), label, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def run_demo(out_dir: str | Path = "runs/demo", data_dir: str | Path = "data/shapes",
             llava_recipe: Path = LLAVA_RECIPE, clip_recipe: Path = CLIP_RECIPE,
             llava_overrides: dict[str, Any] | None = None, clip_overrides: dict[str, Any] | None = None,
             caption_limit: int | None = None, seg_limit: int | None = None, scale: float = 1.0,
             log=print) -> DemoReport:
    out, data_dir = Path(out_dir), Path(data_dir)
    data_dir = ensure_worlds(data_dir, scale, own_dir=out / "data", log=log)
    log(f"[1/5] data: shapes worlds {', '.join(DEMO_WORLDS)} in {data_dir}")
    world_b = data_dir / "world_B"
    spec = json.loads((world_b / "world.json").read_text())["spec"]
    unseen = list(spec.get("unseen_dense_classes", []))

    log(f"[2/5] captioning: {llava_recipe.name} on world B")
    llava_run = _train(llava_recipe, data_dir, out / "llava-lora-b-wide", llava_overrides or {}, log)
    log(f"[3/5] segmentation: {clip_recipe.name} on world-B masks ({', '.join(unseen) or 'no class'} held out)")
    clip_run = _train(clip_recipe, data_dir, out / "clip-seg-lora-b", clip_overrides or {}, log)

    log("[4/5] evaluation on world-B test images")
    llava_base = load_recipe(llava_recipe).model.name
    clip_base = load_recipe(clip_recipe).model.name
    dense = load_recipe(clip_recipe).train.dense
    captions = CaptionSet.from_coco(world_b / "annotations" / "captions_test.json", limit=caption_limit)
    cap = evaluate_models({"base": llava_base, "adapted": str(llava_run)}, captions, out / "eval_caption",
                          extra=slot_scores)
    modes = sorted({ALSO_SCORED_MODE, dense.mode})
    seg = evaluate_segmentation({"base": clip_base, "adapted": str(clip_run)}, world_b, "test", modes,
                                out / "eval_seg", templates=dense.templates, limit=seg_limit, unseen=unseen)

    def row(name: str, mode: str) -> dict[str, float | None]:
        c = cap["models"][name]["scores"]
        s = seg["modes"][f"{name}/{mode}"]
        written = [json.loads(x) for x in (out / "eval_caption" / f"captions_{name}.jsonl").read_text().splitlines()]
        novel = novel_recall({x["image_id"]: x["caption"] for x in written}, captions.objects)
        return {"CIDEr": c["CIDEr"], "BLEU-4": c["BLEU-4"], "slot accuracy": c.get("slot_all"),
                f"{NOVEL['shape']} recall": novel["novel_shape"], f"{NOVEL['colour']} recall": novel["novel_colour"],
                "mIoU seen": s["mIoU_seen"], "mIoU unseen": s["mIoU_unseen"]}

    log("[5/5] overlay picture")
    overlay = _demo_overlay(world_b, clip_base, clip_run, dense.mode, dense.templates, out / "overlay.png",
                            unseen[0] if unseen else None)
    samples = []
    lines = {n: [json.loads(x) for x in (out / "eval_caption" / f"captions_{n}.jsonl").read_text().splitlines()[:2]]
             for n in ("base", "adapted")}
    for b, a in zip(lines["base"], lines["adapted"]):
        samples.append((b["references"][0], b["caption"], a["caption"]))
    return DemoReport(out, data_dir, {"captioning": llava_run, "segmentation": clip_run},
                      row("base", dense.mode), row("adapted", dense.mode),
                      {"caption metrics": out / "eval_caption" / "metrics.json",
                       "segmentation metrics": out / "eval_seg" / "metrics.json", "overlay": overlay},
                      samples, unseen)


def _demo_overlay(world: Path, clip_base: str, clip_run: Path, dense_mode: str, templates: str, out: Path,
                  focus: str | None) -> Path:
    """The world-B test image (of the first 50) where class ``focus`` (the held-out class) covers most
    pixels (else the first)."""
    folder = SegmentationFolder(world, "test")
    classes = folder.classes
    wanted = classes.index(focus) if focus in classes else None
    pick, most = 0, 0
    for i in range(min(len(folder), 50) if wanted is not None else 0):
        _, mask = folder.load(i)
        if (area := int((np.asarray(mask) == wanted).sum())) > most:
            pick, most = i, area
    image, truth = folder.load(pick)
    base = ClipSegmenter(classes, clip_base, dense_mode, templates)(image)
    adapted = ClipSegmenter(classes, str(clip_run), dense_mode, templates)(image)
    return overlay_figure(folder.samples[pick].image, np.asarray(truth), [base, adapted], classes, out,
                          ("input", "ground truth", f"base ({dense_mode})", f"adapted (LoRA, {dense_mode})"))


def format_report(r: DemoReport, seconds: float) -> str:
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    unseen = f" ({', '.join(r.unseen)})" if r.unseen else ""
    lines = ["", "mmlora demo: world-A bases adapted to world B (new shape, colour and caption style), world-B test",
             "", f"  {'metric':<24}{'base':>10}{'adapted':>10}{'change':>10}"]
    for k in r.before:
        b, a = r.before[k], r.after[k]
        change = "-" if b is None or a is None else f"{a - b:+.3f}"
        label = k + (unseen if k == "mIoU unseen" else "")
        lines.append(f"  {label:<24}{fmt(b):>10}{fmt(a):>10}{change:>10}")
    lines += ["", "  captions (reference / base / adapted):"]
    for ref, base, adapted in r.sample_captions:
        lines += [f"    ref:     {ref}", f"    base:    {base}", f"    adapted: {adapted}", ""]
    lines.append("  outputs:")
    for name, path in {**{f"{k} run": v for k, v in r.runs.items()}, **r.outputs}.items():
        lines.append(f"    {name:<22}{path}")
    lines.append(f"\n  done in {seconds / 60:.1f} min.")
    return "\n".join(lines)


def main(out_dir: str = "runs/demo", data_dir: str = "data/shapes") -> int:
    start = time.time()
    report = run_demo(out_dir, data_dir)
    print(format_report(report, time.time() - start))
    return 0
