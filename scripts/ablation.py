"""The placement ablation on both shifts: which modality's adapters carry which part of each shift.

Adapts ``shapes-llava-base`` (world A) to world B (``recipes/shapes/llava-lora-b.yaml``: a new shape,
a new colour and a new caption style — mostly a language-side shift) and to world C
(``recipes/shapes/llava-lora-c.yaml``: world A drawn as outlines on dark ground — a shift only in
pixels) with the placement changed per row, each over several seeds (mean ± std), and scores every
run on its world's test images with the captioning protocol (``mmlora eval caption``):

* **placement** (both shifts): vision only, projector only, language only, all three (LoRA);
* **reference** (both shifts): full fine-tuning of all three modalities;
* **variant** (world B): DoRA on the same modules and ranks as "all" (equal rank; DoRA adds one
  magnitude per output row, the table lists the trainable parameters);
* **rank sweep** (world B): "all" at 1/4x, 1x and 4x the recipe's ranks.

Columns: CIDEr and BLEU-4, slot accuracy per slot (shape, colour, position), for world B the recall of
its *novel* shape (star) and colour (purple) — visual concepts the base never saw — and each row's
share of full fine-tuning's gain over the base (in CIDEr and in slot accuracy).

Writes ``OUT/table.md``, ``OUT/results.json`` and ``OUT/ablation.png`` (bar charts, one row per shift);
runs are kept under ``OUT/<shift>/runs`` and reused, so an interrupted ablation continues where it
stopped.

Run:  python scripts/ablation.py --out evals/ablation                 # the README's tables (≈75 min on 2 cores)
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

from mmlora.showcase.slots import novel_recall  # noqa: F401  (re-exported: the table's novel-concept recall)

REPO = Path(__file__).resolve().parents[1]
#: Shift → the "all" row's recipe.
RECIPES = {"B": REPO / "recipes" / "shapes" / "llava-lora-b.yaml", "C": REPO / "recipes" / "shapes" / "llava-lora-c.yaml"}
RECIPE = RECIPES["B"]

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
#: The rows each shift runs: the variant and rank rows only where the shift is language-side.
SHIFT_ROWS = {"B": tuple(ROWS), "C": ("vision", "projector", "language", "all", "full")}


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
           ("slot_position", "position acc."), ("novel_shape", "star recall"), ("novel_colour", "purple recall")]


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def summarise(results: dict[str, Any], shift: str = "B") -> str:
    """One shift's table: a row per placement (mean ± std over seeds) and its share of the gain
    full fine-tuning makes over the base."""
    def cell(values: list[float | None]) -> str:
        vals = [v for v in values if v is not None]
        if not vals:
            return "-"
        return f"{statistics.mean(vals):.3f} ± {statistics.pstdev(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    base, rows = results["base"], results["rows"]
    columns = [(k, c) for k, c in COLUMNS
               if base.get(k) is not None or any(s.get(k) is not None for r in rows.values() for s in r["seeds"])]
    full = {k: _mean([s.get(k) for s in rows["full"]["seeds"]]) for k in ("CIDEr", "slot_all")} if "full" in rows else {}

    def share(name: str, key: str) -> str:
        gain_full = (full.get(key) or 0.0) - (base.get(key) or 0.0)
        value = _mean([s.get(key) for s in rows[name]["seeds"]])
        if not full or value is None or gain_full <= 0:
            return "-"
        return f"{(value - base[key]) / gain_full:.0%}"

    lines = ["| row | trainable | " + " | ".join(c for _, c in columns) + " | share of full's gain (CIDEr / slots) |",
             "|---|---|" + "---|" * len(columns) + "---|"]
    lines.append("| base (no training) | 0 | " + " | ".join(cell([base.get(k)]) for k, _ in columns) + " | 0% / 0% |")
    for name, row in rows.items():
        params = row["trainable"]
        lines.append(f"| {name} | {params:,} | " + " | ".join(cell([s.get(k) for s in row["seeds"]]) for k, _ in columns)
                     + f" | {share(name, 'CIDEr')} / {share(name, 'slot_all')} |")
    if "all" in rows and "full" in rows:
        gain_full, gain_lora = full["CIDEr"] - base["CIDEr"], _mean([s["CIDEr"] for s in rows["all"]["seeds"]]) - base["CIDEr"]
        if gain_full > 0:
            lines.append(f"\nLoRA (all) recovers {gain_lora / gain_full:.0%} of full fine-tuning's CIDEr gain "
                         f"({gain_lora:+.3f} vs {gain_full:+.3f} over the base).")
    p = results["protocol"]
    lines.append(f"\n{p['steps']} steps of {p['batch_size']} per run, seeds {p['seeds']}, world-{shift} test "
                 f"({p['num_images']} images, greedy, the caption protocol); mean ± std over seeds.")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict[str, Any]], path: Path) -> Path:
    """Bar charts of CIDEr, slot accuracy and (world B) the novel concepts' recall, one row per shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [("CIDEr", "CIDEr"), ("slot_all", "slot accuracy"), ("novel_shape", "star recall"), ("novel_colour", "purple recall")]
    fig, axes = plt.subplots(len(results), len(shown), figsize=(3.8 * len(shown), 3.4 * len(results)), squeeze=False)
    for axrow, (shift, res) in zip(axes, results.items()):
        names = ["base", *res["rows"]]
        for ax, (key, label) in zip(axrow, shown):
            if res["base"].get(key) is None and not any(s.get(key) is not None for r in res["rows"].values() for s in r["seeds"]):
                ax.axis("off")  # e.g. the novel concepts: world B's only
                continue
            means, stds = [], []
            for n in names:
                vals = [res["base"].get(key)] if n == "base" else [s.get(key) for s in res["rows"][n]["seeds"]]
                vals = [v for v in vals if v is not None] or [0.0]
                means.append(statistics.mean(vals))
                stds.append(statistics.pstdev(vals) if len(vals) > 1 else 0.0)
            x = np.arange(len(names))
            ax.bar(x, means, yerr=stds, capsize=3, color=["#999999"] + ["#1f77b4"] * (len(names) - 1))
            ax.set_xticks(x, names, rotation=45, ha="right")
            ax.set_title(f"world {shift}: {label}")
    fig.suptitle("world-A base adapted to world B (language-side shift) and world C (pixel-side shift)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_shift(shift: str, recipe_path: Path, rows: list[str], args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from mmlora.eval.caption import CaptionSet

    recipe = yaml.safe_load(recipe_path.read_text())
    steps = args.steps or recipe["train"]["max_steps"]
    out = args.out / shift
    out.mkdir(parents=True, exist_ok=True)
    data = CaptionSet.from_coco(args.data / f"world_{shift}" / "annotations" / "captions_test.json", limit=args.limit)
    results: dict[str, Any] = {"protocol": {"recipe": str(recipe_path), "steps": steps,
                                            "batch_size": recipe["train"]["batch_size"], "seeds": list(range(args.seeds)),
                                            "num_images": len(data.image_ids)},
                               "base": score(recipe["model"]["name"], "base", data, out), "rows": {}}
    if shift != "B":  # only world B has novel concepts
        results["base"] = {k: v for k, v in results["base"].items() if not k.startswith("novel_")}
    start = time.time()
    for name in rows:
        seeds = []
        for seed in range(args.seeds):
            run = train_row(name, seed, steps, recipe, args.data, out)
            scores = score(str(run), f"{name.replace('/', '_')}-s{seed}", data, out)
            seeds.append(scores if shift == "B" else {k: v for k, v in scores.items() if not k.startswith("novel_")})
            print(f"world {shift}, {name} seed {seed}: CIDEr {seeds[-1]['CIDEr']:.3f}, slots {seeds[-1]['slot_all']:.3f} "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)
        results["rows"][name] = {"trainable": trainable_parameters(run), "seeds": seeds}
    return results


def write_report(out: Path, results: dict[str, Any], table: str, draw, picture: str) -> None:
    """``results.json``, ``table.md`` and the picture ``draw(path)`` makes, in ``out``; the table printed."""
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(table)
    draw(out / picture)
    print(table)
    print(f"table.md, results.json and {picture} in {out}")


def shifts_and_recipes(parser: argparse.ArgumentParser, shifts: str, items: list[str]) -> tuple[list[str], dict[str, Path]]:
    """``--shifts B,C`` and ``--recipe SHIFT=PATH`` → the shifts to run and each shift's recipe (a parser
    error names a bad one)."""
    names = [s.strip() for s in shifts.split(",") if s.strip()]
    if bad := [s for s in names if s not in RECIPES]:
        parser.error(f"unknown shifts {bad}; known: {', '.join(RECIPES)}")
    recipes = dict(RECIPES)
    for item in items:
        shift, sep, path = item.partition("=")
        if not sep or shift not in RECIPES:
            parser.error(f"--recipe {item!r}: give SHIFT=PATH with SHIFT one of {', '.join(RECIPES)}")
        recipes[shift] = Path(path)
    return names, recipes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("evals/ablation"))
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--shifts", default="B,C", help="comma-separated, of: B (language-side), C (pixel-side)")
    parser.add_argument("--recipe", action="append", default=[], metavar="SHIFT=PATH",
                        help="the 'all' row's recipe for a shift (default: recipes/shapes/llava-lora-b.yaml, -c.yaml)")
    parser.add_argument("--rows", default=None, help=f"comma-separated, of: {', '.join(ROWS)} (default: each shift's rows)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's max_steps")
    parser.add_argument("--limit", type=int, default=200, help="test images scored per run (default: all 200)")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the worlds read from --data (default 1: the "
                        "generator's; other worlds there are left alone and the ablation generates its own in OUT/data)")
    args = parser.parse_args(argv)

    from mmlora.showcase.demo import ensure_worlds

    shifts, recipes = shifts_and_recipes(parser, args.shifts, args.recipe)
    wanted = None if args.rows is None else [r.strip() for r in args.rows.split(",") if r.strip()]
    if wanted is not None and (unknown := [r for r in wanted if r not in ROWS]):
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    args.data = ensure_worlds(args.data, args.scale, own_dir=args.out / "data")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for shift in shifts:
        rows = [r for r in SHIFT_ROWS[shift] if wanted is None or r in wanted]
        results[shift] = run_shift(shift, recipes[shift], rows, args)
    table = "".join(f"### World {shift}\n\n{summarise(res, shift)}\n" for shift, res in results.items())
    write_report(args.out, results, table, lambda path: bar_chart(results, path), "ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
