"""The placement ablation on world B: which modality's adapters carry which part of the shift.

Adapts ``shapes-llava-base`` (world A) to world B from ``recipes/shapes/llava-lora-b.yaml`` with the
placement changed per row, each over several seeds (mean ± std), and scores every run on world-B test
images with the captioning protocol (``mmlora eval caption``):

* **placement**: vision only, projector only, language only, all three (LoRA);
* **variant**: DoRA on the same modules and ranks as "all" (equal rank; DoRA adds one magnitude
  per output row, the table lists the trainable parameters);
* **rank sweep**: "all" at 1/4x, 1x and 4x the recipe's ranks;
* **reference**: full fine-tuning of all three modalities.

Columns: CIDEr and BLEU-4 (the caption *style* of world B is a language-side shift), shape and
colour slot accuracy, and recall of world B's *novel* shape (star) and colour (purple) — visual
concepts the base never saw. The LoRA-vs-full line reports how much of full fine-tuning's CIDEr gain
over the base LoRA recovers.

Writes ``OUT/table.md``, ``OUT/results.json`` and ``OUT/ablation.png`` (a bar chart); runs are kept
under ``OUT/runs`` and reused, so an interrupted ablation continues where it stopped.

Run:  python scripts/ablation.py --out evals/ablation                 # the README's table (≈1 h on 2 cores)
      python scripts/ablation.py --out /tmp/abl --seeds 1 --steps 20 --limit 20 --rows all,language   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "shapes" / "llava-lora-b.yaml"

#: Row name → placement changes against the recipe (None: that modality frozen).
ROWS: dict[str, dict[str, Any]] = {
    "vision": {"projector": None, "language": None},
    "projector": {"vision": None, "language": None},
    "language": {"vision": None, "projector": None},
    "all": {},
    "all-dora": {"variant": "dora"},
    "all-r/4": {"rank_scale": 0.25},
    "all-r×4": {"rank_scale": 4.0},
    "full": {"full": True},
}
NOVEL = {"shape": "star", "colour": "purple"}


def placement_for(base: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """The recipe's ``placement`` section changed as ``row`` says."""
    out = {k: dict(v) for k, v in base.items()}
    for modality, change in row.items():
        if modality in out and change is None:
            out[modality] = {"mode": "frozen"}
    for spec in out.values():
        if spec.get("mode") in ("lora", "dora"):
            if row.get("variant"):
                spec["mode"] = row["variant"]
            if row.get("rank_scale"):
                spec["rank"] = max(1, round(spec.get("rank", 8) * row["rank_scale"]))
            if row.get("full"):  # every parameter of the same layers (a tower's unread layers stay out)
                layers = spec.get("layers")
                spec.clear()
                spec["mode"] = "full"
                if layers is not None:
                    spec["layers"] = layers
    return out


def novel_recall(captions: dict[int, str], objects: dict[int, list[dict]]) -> dict[str, float | None]:
    """Of the ground-truth objects with a novel shape (colour), the share a caption names right at
    their position."""
    from mmlora.showcase.slots import parse_objects

    hits = {k: [0, 0] for k in NOVEL}
    for image_id, caption in captions.items():
        by_pos = {p["position"]: p for p in parse_objects(caption) if p["position"]}
        for obj in objects.get(image_id, []):
            for slot, value in NOVEL.items():
                if obj[slot] == value:
                    hits[slot][1] += 1
                    hits[slot][0] += by_pos.get(obj["position"], {}).get(slot) == value
    return {f"novel_{k}": (h / n if n else None) for k, (h, n) in hits.items()}


def train_row(name: str, seed: int, steps: int, recipe: dict[str, Any], data_dir: Path, out: Path) -> Path:
    import yaml

    from mmlora.config.loading import load_recipe
    from mmlora.runs.layout import find_weights
    from mmlora.showcase.demo import retarget_recipe
    from mmlora.train.loop import Trainer

    run = out / "runs" / f"{name.replace('/', '_')}-s{seed}"
    if find_weights(run) is not None:
        return run
    data = dict(recipe, placement=placement_for(recipe["placement"], ROWS[name]))
    path = out / "recipes" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    overrides = {"seed": seed, "max_steps": steps, "save_every": steps, "eval_every": steps}
    if ROWS[name].get("full"):
        overrides["lr"] = 2.0e-4  # full fine-tuning needs a smaller rate than adapters
    trainer = Trainer(retarget_recipe(load_recipe(path), data_dir, run, overrides), recipe_name=run.name)
    trainer.setup()
    trainer.train()
    return run


def score(ref: str, name: str, data, out: Path) -> dict[str, float]:
    from mmlora.eval.caption import evaluate_models
    from mmlora.showcase.slots import slot_scores

    folder = out / "evals" / name
    if (folder / "metrics.json").is_file():
        report = json.loads((folder / "metrics.json").read_text())
    else:
        report = evaluate_models({name: ref}, data, folder, extra=slot_scores)
    captions = {json.loads(x)["image_id"]: json.loads(x)["caption"]
                for x in (folder / f"captions_{name}.jsonl").read_text().splitlines()}
    return report["models"][name]["scores"] | novel_recall(captions, data.objects)


def trainable_parameters(run: Path) -> int:
    info = json.loads((run / "run_info.json").read_text())
    return sum(g["n_params"] for g in info["groups"])


COLUMNS = [("CIDEr", "CIDEr"), ("BLEU-4", "BLEU-4"), ("slot_shape", "shape acc."), ("slot_colour", "colour acc."),
           ("novel_shape", "star recall"), ("novel_colour", "purple recall")]


def summarise(results: dict[str, Any]) -> str:
    def cell(values: list[float | None]) -> str:
        vals = [v for v in values if v is not None]
        if not vals:
            return "-"
        return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    lines = ["| row | trainable | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    base = results["base"]
    lines.append("| base (no training) | 0 | " + " | ".join(cell([base[k]]) for k, _ in COLUMNS) + " |")
    for name, row in results["rows"].items():
        params = row["trainable"]
        lines.append(f"| {name} | {params:,} | " + " | ".join(cell([s[k] for s in row["seeds"]]) for k, _ in COLUMNS) + " |")
    rows = results["rows"]
    if "all" in rows and "full" in rows:
        mean = lambda r: statistics.mean(s["CIDEr"] for s in rows[r]["seeds"])  # noqa: E731
        gain_full, gain_lora = mean("full") - base["CIDEr"], mean("all") - base["CIDEr"]
        if gain_full > 0:
            lines.append(f"\nLoRA (all) recovers {gain_lora / gain_full:.0%} of full fine-tuning's CIDEr gain "
                         f"({gain_lora:+.3f} vs {gain_full:+.3f} over the base).")
    p = results["protocol"]
    lines.append(f"\n{p['steps']} steps of {p['batch_size']} per run, seeds {p['seeds']}, world-B test "
                 f"({p['num_images']} images, greedy, the caption protocol); mean ± std over seeds.")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = ["base", *results["rows"]]
    shown = [("CIDEr", "CIDEr"), ("novel_shape", "star recall"), ("novel_colour", "purple recall")]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6))
    for ax, (key, label) in zip(axes, shown):
        means, stds = [], []
        for n in names:
            vals = [results["base"][key]] if n == "base" else [s[key] for s in results["rows"][n]["seeds"]]
            vals = [v for v in vals if v is not None] or [0.0]
            means.append(statistics.mean(vals))
            stds.append(statistics.pstdev(vals) if len(vals) > 1 else 0.0)
        x = np.arange(len(names))
        ax.bar(x, means, yerr=stds, capsize=3, color=["#999999"] + ["#1f77b4"] * (len(names) - 1))
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_title(label)
    fig.suptitle("world-A base adapted to world B: placement ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("evals/ablation"))
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the 'all' row's recipe")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's max_steps")
    parser.add_argument("--limit", type=int, default=100, help="world-B test images scored per run")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the worlds read from --data (default 1: the "
                        "generator's; other worlds there are left alone and the ablation generates its own in OUT/data)")
    args = parser.parse_args(argv)

    from mmlora.showcase.demo import ensure_worlds
    from mmlora.eval.caption import CaptionSet

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    recipe = yaml.safe_load(args.recipe.read_text())
    steps = args.steps or recipe["train"]["max_steps"]
    args.data = ensure_worlds(args.data, args.scale, own_dir=args.out / "data")
    data = CaptionSet.from_coco(args.data / "world_B" / "annotations" / "captions_test.json", limit=args.limit)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results: dict[str, Any] = {"protocol": {"recipe": str(args.recipe), "steps": steps,
                                            "batch_size": recipe["train"]["batch_size"], "seeds": list(range(args.seeds)),
                                            "num_images": len(data.image_ids)},
                               "base": score(recipe["model"]["name"], "base", data, args.out), "rows": {}}
    for name in rows:
        seeds = []
        for seed in range(args.seeds):
            run = train_row(name, seed, steps, recipe, args.data, args.out)
            seeds.append(score(str(run), f"{name.replace('/', '_')}-s{seed}", data, args.out))
            print(f"{name} seed {seed}: CIDEr {seeds[-1]['CIDEr']:.3f} ({(time.time() - start) / 60:.1f} min)", flush=True)
        results["rows"][name] = {"trainable": trainable_parameters(run), "seeds": seeds}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = summarise(results)
    (args.out / "table.md").write_text(table)
    bar_chart(results, args.out / "ablation.png")
    print(table)
    print(f"table.md, results.json and ablation.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
