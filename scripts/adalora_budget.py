"""Where does AdaLoRA put the budget? World B (language-side shift) against world C (pixel-side shift).

Trains the placement ablation's "all" recipe of each shift (``recipes/shapes/llava-lora-b.yaml``,
``-c.yaml``: vision q/v on the layers the projector reads, the projector, every linear layer of the
language model) as AdaLoRA with one budget for the whole model, the same on both shifts
(``BUDGET``: every module starts at rank 16 and the budget ends at 8 per module on average), for several
seeds; scores each run with the captioning protocol on its world's test images, and reads its
``rank_allocation.json``. Reports per shift: the scores beside the LoRA "all" row of the placement
ablation (``evals/ablation/results.json``, when it is there), and per modality the share of the final
budget, the fraction of its initial rank it kept, and that fraction per layer (mean ± std over seeds).

Writes ``OUT/table.md``, ``OUT/results.json``, ``OUT/budget.png`` (retained rank per modality and the
modality shares over the steps, a panel per shift) and ``OUT/<shift>/rank_heatmap.png`` (seed 0's
final ranks); runs are kept under ``OUT/<shift>/runs`` and reused, so an interrupted report continues.

Run:  python scripts/adalora_budget.py --out evals/adalora            # the README's tables (≈15 min on 2 cores)
      python scripts/adalora_budget.py --out /tmp/ada --seeds 1 --steps 20 --limit 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import RECIPES, score, shifts_and_recipes, write_report  # noqa: E402, F401  (the ablation's recipes and helpers)

#: One budget for both shifts: ranks start at 16 per module and end at 8 per module on average; the
#: budget is held for 10 steps, pruned every 5 steps on a cubic schedule, and fixed for the last 30.
BUDGET = {"init_r": 16, "target_r": 8, "tinit": 10, "tfinal": 30, "delta_t": 5}


def train_run(seed: int, steps: int, recipe: dict[str, Any], budget: dict[str, int], data_dir: Path, out: Path) -> Path:
    import yaml

    from mmlora.config.loading import load_recipe
    from mmlora.runs.layout import find_weights
    from mmlora.showcase.demo import retarget_recipe
    from mmlora.train.loop import Trainer

    run = out / "runs" / f"adalora-s{seed}"
    if find_weights(run) is not None:
        return run
    # One budget for the whole model: the modalities' own ranks give way to init_r / target_r.
    placement = {name: {k: v for k, v in spec.items() if k != "rank"} for name, spec in recipe["placement"].items()}
    data = dict(recipe, placement={**placement, "adalora": dict(budget)})
    path = out / "recipes" / f"{run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    overrides = {"seed": seed, "max_steps": steps, "save_every": steps, "eval_every": steps}
    trainer = Trainer(retarget_recipe(load_recipe(path), data_dir, run, overrides), recipe_name=run.name)
    trainer.setup()
    trainer.train()
    return run


def budget_of(run: Path) -> dict[str, Any]:
    """Per modality: modules, initial and final rank, share of the final total, retained fraction, and
    the retained fraction per layer; and each modality's share after every allocation step."""
    from mmlora.runs.allocation import ALLOCATION_FILE, RankAllocation

    alloc = RankAllocation.read(run / ALLOCATION_FILE)
    final, start = alloc.totals(), alloc.totals(0)
    kept = sum(final.values())
    out: dict[str, Any] = {"steps": alloc.steps, "modalities": {}}
    for name in final:
        mods = [m for m in alloc.modules if m.modality == name]
        layers: dict[str, list[int]] = {}
        for m in mods:
            layers.setdefault("-" if m.layer is None else str(m.layer), []).append(m.ranks[-1])
        out["modalities"][name] = {
            "modules": len(mods), "initial": start[name], "final": final[name],
            "share": final[name] / kept if kept else 0.0, "retained": final[name] / start[name] if start[name] else 0.0,
            "retained_per_layer": {k: sum(v) / (alloc.init_r * len(v)) for k, v in layers.items()},
            "share_over_steps": [alloc.totals(i)[name] / max(sum(alloc.totals(i).values()), 1)
                                 for i in range(len(alloc.steps))],
        }
    return out


def _cell(values: list[float], pct: bool = False) -> str:
    """Mean ± std over seeds (a percentage when ``pct``)."""
    if not values:
        return "-"
    mean, std = statistics.mean(values), statistics.pstdev(values)
    if pct:
        return f"{100 * mean:.0f}%" + (f" ± {100 * std:.0f}" if len(values) > 1 else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if len(values) > 1 else "")


def summarise(shift: str, res: dict[str, Any], ablation: dict[str, Any] | None) -> str:
    seeds, budgets = res["seeds"], res["budgets"]
    keys = [("CIDEr", "CIDEr"), ("slot_all", "slot acc."), ("slot_shape", "shape"), ("slot_colour", "colour"),
            ("slot_position", "position")]
    lines = ["| run | " + " | ".join(c for _, c in keys) + " |", "|---|" + "---|" * len(keys)]
    lines.append("| AdaLoRA (one budget) | " + " | ".join(_cell([s[k] for s in seeds]) for k, _ in keys) + " |")
    rows = (ablation or {}).get(shift, {}).get("rows", {})
    for name in ("all", "vision", "language"):
        if name in rows:
            lines.append(f"| LoRA {name} (ablation) | " + " | ".join(_cell([s[k] for s in rows[name]["seeds"] if s.get(k) is not None])
                                                            for k, _ in keys) + " |")
    lines += ["", "| modality | modules | initial share | final share | rank kept | kept per layer |", "|---|---|---|---|---|---|"]
    names = list(budgets[0]["modalities"])
    total_initial = sum(budgets[0]["modalities"][n]["initial"] for n in names)
    for name in names:
        per = [b["modalities"][name] for b in budgets]
        layers = list(per[0]["retained_per_layer"])
        by_layer = " · ".join((f"L{k} " if k != "-" else "") + f"{statistics.mean(p['retained_per_layer'][k] for p in per):.0%}"
                              for k in layers)
        lines.append(f"| {name} | {per[0]['modules']} | {per[0]['initial'] / total_initial:.0%} | "
                     f"{_cell([p['share'] for p in per], pct=True)} | {_cell([p['retained'] for p in per], pct=True)} | {by_layer} |")
    p = res["protocol"]
    lines.append(f"\n{p['steps']} steps of {p['batch_size']} per run, seeds {p['seeds']}, budget {p['budget']}; world-{shift} "
                 f"test ({p['num_images']} images, greedy, the caption protocol); mean ± std over seeds.")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    shifts = list(results)
    names = list(results[shifts[0]]["budgets"][0]["modalities"])
    width = 0.8 / len(shifts)
    for k, shift in enumerate(shifts):
        budgets = results[shift]["budgets"]
        kept = [[b["modalities"][n]["retained"] for b in budgets] for n in names]
        x = np.arange(len(names)) + (k - (len(shifts) - 1) / 2) * width
        axes[0].bar(x, [100 * statistics.mean(v) for v in kept], width,
                    yerr=[100 * statistics.pstdev(v) if len(v) > 1 else 0 for v in kept], capsize=3, label=f"world {shift}")
        steps = budgets[0]["steps"]
        for n, style in zip(names, ("-", "--", ":", "-.")):
            share = np.mean([b["modalities"][n]["share_over_steps"] for b in budgets], axis=0)
            axes[1].plot(steps, 100 * share, style, color=f"C{k}", label=f"{shift}: {n}")
    axes[0].set_xticks(np.arange(len(names)), names)
    axes[0].set_ylabel("rank kept of the initial (%)")
    axes[0].set_title("what AdaLoRA kept, per modality")
    axes[0].legend()
    axes[1].set_xlabel("optimizer step")
    axes[1].set_ylabel("share of the kept rank (%)")
    axes[1].set_title("each modality's share over the steps")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("evals/adalora"))
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--ablation", type=Path, default=Path("evals/ablation/results.json"),
                        help="the placement ablation's results to set beside (skipped when absent)")
    parser.add_argument("--shifts", default="B,C")
    parser.add_argument("--recipe", action="append", default=[], metavar="SHIFT=PATH",
                        help="a shift's recipe (default: the ablation's 'all' recipes)")
    parser.add_argument("--budget", default="", metavar="KEY=N,...",
                        help=f"change the budget (default {','.join(f'{k}={v}' for k, v in BUDGET.items())})")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's max_steps")
    parser.add_argument("--limit", type=int, default=200, help="test images scored per run (default: all 200)")
    parser.add_argument("--scale", type=float, default=1.0, help="size of the worlds read from --data (as the ablation's)")
    args = parser.parse_args(argv)

    import yaml

    from mmlora.eval.caption import CaptionSet
    from mmlora.showcase.demo import ensure_worlds

    shifts, recipes = shifts_and_recipes(parser, args.shifts, args.recipe)
    budget = dict(BUDGET)
    for item in filter(None, args.budget.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in BUDGET or not value.isdigit():
            parser.error(f"--budget {item!r}: give KEY=N with KEY one of {', '.join(BUDGET)}")
        budget[key] = int(value)
    args.data = ensure_worlds(args.data, args.scale, own_dir=args.out / "data")
    ablation = json.loads(args.ablation.read_text()) if args.ablation.is_file() else None
    results: dict[str, Any] = {}
    start = time.time()
    for shift in shifts:
        recipe = yaml.safe_load(recipes[shift].read_text())
        steps = args.steps or recipe["train"]["max_steps"]
        if budget["tinit"] + budget["tfinal"] >= steps:
            parser.error(f"--steps {steps}: AdaLoRA's schedule needs more than tinit + tfinal = "
                         f"{budget['tinit'] + budget['tfinal']} steps")
        out = args.out / shift
        out.mkdir(parents=True, exist_ok=True)
        data = CaptionSet.from_coco(args.data / f"world_{shift}" / "annotations" / "captions_test.json", limit=args.limit)
        seeds, budgets = [], []
        for seed in range(args.seeds):
            run = train_run(seed, steps, recipe, budget, args.data, out)
            scores = score(str(run), f"adalora-s{seed}", data, out)
            seeds.append({k: v for k, v in scores.items() if shift == "B" or not k.startswith("novel_")})
            budgets.append(budget_of(run))
            kept = {n: f"{m['retained']:.0%}" for n, m in budgets[-1]["modalities"].items()}
            print(f"world {shift}, AdaLoRA seed {seed}: CIDEr {seeds[-1]['CIDEr']:.3f}, slots {seeds[-1]['slot_all']:.3f}, "
                  f"rank kept {kept} ({(time.time() - start) / 60:.1f} min)", flush=True)
            if seed == 0 and (run / "rank_heatmap.png").is_file():
                shutil.copy(run / "rank_heatmap.png", out / "rank_heatmap.png")
        results[shift] = {"protocol": {"recipe": str(recipes[shift]), "steps": steps, "budget": budget,
                                       "batch_size": recipe["train"]["batch_size"], "seeds": list(range(args.seeds)),
                                       "num_images": len(data.image_ids)},
                          "seeds": seeds, "budgets": budgets}
    table = "".join(f"### World {shift}\n\n{summarise(shift, res, ablation)}\n" for shift, res in results.items())
    write_report(args.out, results, table, lambda path: chart(results, path), "budget.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
