"""Continual LoRA and a mixture of LoRA experts on the shapes worlds, forgetting measured.

The shipped ``shapes-llava-base`` knows world A; it is adapted to world B (a new shape, a new colour,
a new caption style: a language-side shift), then to world C (world A drawn as outlines on dark ground:
a pixel-side shift), and every model is scored on the test images of all three worlds with the
captioning protocol (CIDEr, slot accuracy; for world B the recall of its novel shape and colour).
Methods, each a recipe option (``recipes/continual/``), run for every seed:

* ``sequential`` — world B's LoRA run trained further on C (the forgetting baseline);
* ``olora`` — new adapters for C beside B's frozen ones, kept orthogonal to them (O-LoRA);
* ``router`` — one adapter per world (the base for A) and a learned router weighing them per sample
  (MoLoRA), trained on a replay set of 64 captioned images per world seen so far; ``oracle`` gives each
  test image its own world's adapter, ``uniform`` weighs the adapters alike: the router's bounds;
* ``merge-linear`` / ``merge-ties`` / ``merge-dare`` — B's and C's adapters merged 0.5 / 0.5 with PEFT's
  ``add_weighted_adapter`` (no training);
* ``distill-rN`` — the stage-2 router distilled into one rank-N LoRA adapter by matching its output
  distributions (KL, temperature 2) on its own captions of unlabelled training images of all worlds.

Stage 1 is after B, stage 2 after C. Reported per method and world (mean ± std over seeds): the scores
after each stage, the average final accuracy over the worlds, and backward transfer (forgetting) per
world — a world's final score less its score when it was learnt (A: the base's; B: after stage 1).

Writes ``OUT/results.json`` (every score of every seed), ``OUT/table.md`` and ``OUT/continual.png``;
runs live under ``OUT/runs/seed<k>/`` and evaluations under ``OUT/evals/``, and both are reused, so an
interrupted study continues where it stopped.

Run:  python scripts/continual.py --out evals/continual                      # the README's tables (3 seeds)
      python scripts/continual.py --out /tmp/cl --seeds 0 --steps 5 --router-steps 3 --test 8 --replay 8 \\
          --distill-images 8 --ranks 4 --base tiny-llava --vision-layers 0 --scale 0.05   # a quick look (the tests' run)
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
RECIPES = {"b": REPO / "recipes/shapes/llava-lora-b.yaml", "c": REPO / "recipes/shapes/llava-lora-c.yaml",
           "seq_c": REPO / "recipes/continual/llava-seq-c.yaml", "olora_c": REPO / "recipes/continual/llava-olora-c.yaml",
           "router": REPO / "recipes/continual/llava-router-bc.yaml", "distill": REPO / "recipes/continual/llava-distill.yaml"}
WORLDS = ("A", "B", "C")
#: merge method → PEFT's add_weighted_adapter combination of B's and C's adapters (weights, TIES/DARE density 0.5)
MERGES = {"merge-linear": "linear:0.5,0.5", "merge-ties": "ties:0.5,0.5", "merge-dare": "dare_ties:0.5,0.5"}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(key: str, run: Path, args: argparse.Namespace, seed: int, data_dir: Path, *, steps: int,
          continual: dict[str, Any] | None = None, train_data: list[dict] | None = None,
          placement_rank: int | None = None) -> Path:
    """Train ``RECIPES[key]`` (retargeted to ``data_dir``, ``run``, ``seed``, ``steps``; its ``continual``
    runs, data and ranks replaced as given) unless ``run`` is finished already; returns ``run``."""
    from mmlora.config.loading import load_recipe
    from mmlora.runs.layout import find_weights
    from mmlora.showcase.demo import retarget_recipe
    from mmlora.train.loop import Trainer

    if find_weights(run) is not None:
        return run
    recipe = load_recipe(RECIPES[key])
    update: dict[str, Any] = {"model": recipe.model.model_copy(update={"name": args.base})}
    if continual is not None:
        from mmlora.config.schema import ContinualSpec

        update["continual"] = ContinualSpec.model_validate(recipe.continual.model_dump() | continual)
    changes: dict[str, dict[str, Any]] = {}
    for n, spec in recipe.placement.items():
        if spec.mode == "lora" and placement_rank is not None:
            changes.setdefault(n, {})["rank"] = placement_rank
        if n == "vision" and spec.mode == "lora" and args.vision_layers is not None:
            changes.setdefault(n, {})["layers"] = args.vision_layers
    if changes:
        from mmlora.config.schema import PlacementSpec

        placement = recipe.placement.model_dump(exclude_none=True)
        update["placement"] = PlacementSpec.model_validate(placement | {n: placement[n] | c for n, c in changes.items()})
    recipe = recipe.model_copy(update=update)
    if train_data is not None:
        from mmlora.config.schema import DatasetSpec

        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(
            update={"train": [DatasetSpec.model_validate(d) for d in train_data]})})
    overrides = {"seed": seed, "max_steps": steps, "save_every": steps, "eval_every": None}
    _log(f"train {run} ({key}, {steps} steps)")
    trainer = Trainer(retarget_recipe(recipe, data_dir, run, overrides), recipe_name=run.name)
    trainer.setup()
    trainer.train()
    return run


def replay(data_dir: Path, worlds: str, n: int) -> list[dict]:
    """The router's replay set: the first ``n`` captioned training images of each world in ``worlds``."""
    return [{"format": "llava", "path": str(data_dir / f"world_{w}/llava_train.json"), "limit": n} for w in worlds]


def teacher_captions(teacher: Path, data_dir: Path, n: int, out: Path) -> Path:
    """The distillation data: ``teacher``'s own captions of ``n`` unlabelled training images per world
    (LLaVA JSON, image paths relative to ``data_dir``; the worlds' reference captions are not used)."""
    if out.is_file():
        return out
    from mmlora.data.samples import CAPTION_PROMPT
    from mmlora.eval.caption import load_captioner
    from mmlora.generate import generate_answers
    from mmlora.data.samples import load_image

    model, processor, _ = load_captioner(str(teacher))
    records = []
    for w in WORLDS:
        items = json.loads((data_dir / f"world_{w}/llava_train.json").read_text())[:n]
        paths = [data_dir / f"world_{w}" / it["image"] for it in items]
        images = [load_image(p, str(p), str(k)) for k, p in enumerate(paths)]
        answers = generate_answers(model, processor, images, CAPTION_PROMPT, batch_size=16, max_new_tokens=64)
        for k, (p, a) in enumerate(zip(paths, answers)):
            records.append({"id": f"{w}_{k}", "image": str(p.relative_to(data_dir)), "conversations": [
                {"from": "human", "value": "<image>\n" + CAPTION_PROMPT}, {"from": "gpt", "value": a}]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records))
    _log(f"wrote {len(records)} teacher captions to {out}")
    return out


def caption(ref: str, name: str, world: str, data_dir: Path, limit: int, out: Path) -> dict[str, str]:
    """``ref``'s captions of ``world``'s first ``limit`` test images (the captioning protocol), cached in
    ``out/<name>/<world>.json``."""
    path = out / name / f"{world}.json"
    if path.is_file():
        return json.loads(path.read_text())
    import torch

    from mmlora.data.samples import load_image
    from mmlora.data.samples import CAPTION_PROMPT
    from mmlora.eval.caption import CaptionSet, load_captioner
    from mmlora.generate import generate_answers

    _log(f"caption world {world} with {name}")
    data = CaptionSet.from_coco(data_dir / f"world_{world}/annotations/captions_test.json", limit=limit)
    torch.manual_seed(0)  # DARE's random drop
    model, processor, route = load_captioner(ref)
    images = [load_image(data.files[i], str(data.files[i]), str(i)) for i in data.image_ids]
    answers = generate_answers(model, processor, images, CAPTION_PROMPT, 16, 64, adapter_names=route(len(images)))
    result = {str(i): a for i, a in zip(data.image_ids, answers)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=0) + "\n")
    return result


def score_all(captions: dict[tuple[str, str], dict[str, str]], data_dir: Path, limit: int) -> dict[tuple[str, str], dict]:
    """CIDEr (pycocoevalcap: PTB tokens, one tokenizer call for everything), slot accuracy and, on world B,
    the recall of its novel shape and colour, for every ``(name, world) → captions``."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from mmlora.eval.caption import CaptionSet
    from mmlora.showcase.slots import mean_slot_accuracy, novel_recall

    data = {w: CaptionSet.from_coco(data_dir / f"world_{w}/annotations/captions_test.json", limit=limit) for w in WORLDS}
    everything = {f"ref|{w}|{i}": [{"caption": c} for c in data[w].references[i]] for w in WORLDS for i in data[w].image_ids}
    everything |= {f"{n}|{w}|{i}": [{"caption": c}] for (n, w), caps in captions.items() for i, c in caps.items()}
    tokens = PTBTokenizer().tokenize(everything)
    out = {}
    for (name, world), caps in captions.items():
        ids = [i for i in data[world].image_ids if str(i) in caps]
        gts = {i: tokens[f"ref|{world}|{i}"] for i in ids}
        res = {i: tokens[f"{name}|{world}|{i}"] for i in ids}
        cider = float(Cider().compute_score(gts, res)[0])
        by_id = {i: caps[str(i)] for i in ids}
        slot = mean_slot_accuracy(by_id, data[world].objects).get("slot_all")
        novel = [v for v in novel_recall(by_id, data[world].objects).values() if v is not None] if world == "B" else []
        out[name, world] = {"CIDEr": cider, "slot": slot, "novel": statistics.mean(novel) if novel else None}
    return out


def run_seed(seed: int, args: argparse.Namespace, data_dir: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """Every method's scores for one seed: ``{method: {world: {stage: scores}}}``."""
    from mmlora.train.continual import write_router_run

    work = args.out / "runs" / f"seed{seed}"
    runs = {"b": train("b", work / "b", args, seed, data_dir, steps=args.steps),
            "c": train("c", work / "c", args, seed, data_dir, steps=args.steps)}
    runs["seq_c"] = train("seq_c", work / "seq_c", args, seed, data_dir, steps=args.steps,
                          continual={"previous": [str(runs["b"])]})
    runs["olora_c"] = train("olora_c", work / "olora_c", args, seed, data_dir, steps=args.steps,
                            continual={"previous": [str(runs["b"])]})
    for stage, experts in (("b", {"B": str(runs["b"])}), ("bc", {"B": str(runs["b"]), "C": str(runs["c"])})):
        router = args.base_router_spec | {"experts": experts}
        runs[f"router_{stage}"] = train("router", work / f"router_{stage}", args, seed, data_dir, steps=args.router_steps,
                                        continual={"router": router}, train_data=replay(data_dir, "A" + stage.upper(), args.replay))
        uniform = work / f"uniform_{stage}"
        if not (uniform / "final/manifest.json").is_file():
            write_router_run(uniform, args.base, experts)
        runs[f"uniform_{stage}"] = uniform
    teacher = teacher_captions(runs["router_bc"], data_dir, args.distill_images, work / "teacher.json")
    for rank in args.ranks:
        runs[f"distill_r{rank}"] = train("distill", work / f"distill_r{rank}", args, seed, data_dir, steps=args.steps,
                                         continual={"teacher": str(runs["router_bc"])}, placement_rank=rank,
                                         train_data=[{"format": "llava", "path": str(teacher), "images": str(data_dir)}])
    refs = {key: str(run) for key, run in runs.items()} | {"base": args.base}
    refs |= {method: f"{runs['b']}+{runs['c']}:{how}" for method, how in MERGES.items()}  # B's and C's adapters merged
    every = lambda key: dict.fromkeys(WORLDS, key)  # noqa: E731
    plan: dict[str, dict[int, dict[str, str]]] = {  # method → stage → world → what captions that world's images
        "sequential": {1: every("b"), 2: every("seq_c")},
        "olora": {1: every("b"), 2: every("olora_c")},
        "router": {1: every("router_b"), 2: every("router_bc")},
        "oracle": {1: {"A": "base", "B": "b", "C": "base"}, 2: {"A": "base", "B": "b", "C": "c"}},
        "uniform": {1: every("uniform_b"), 2: every("uniform_bc")},
    }
    plan |= {method: {1: every("b"), 2: every(method)} for method in MERGES}
    plan |= {f"distill-r{rank}": {2: every(f"distill_r{rank}")} for rank in args.ranks}
    plan = {"base": {0: every("base")}} | plan
    captions = {}
    for stages in plan.values():
        for keys in stages.values():
            for world, key in keys.items():
                if (key, world) not in captions:
                    folder = args.out / "evals" / ("base" if key == "base" else f"seed{seed}")
                    captions[key, world] = caption(refs[key], key, world, data_dir, args.test, folder)
    scored = score_all(captions, data_dir, args.test)
    scores = {method: {w: {stage: scored[keys[w], w] for stage, keys in stages.items()} for w in WORLDS}
              for method, stages in plan.items() if method != "base"}
    for method in scores:  # stage 0 of every method: the base
        for w in WORLDS:
            scores[method][w][0] = scored["base", w]
    return scores


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per method: final scores per world, average final accuracy, backward transfer per world, and the
    stage-by-stage slot accuracy — each as a list over seeds."""
    seeds = results["seeds"]
    methods = list(next(iter(seeds.values())))
    out: dict[str, Any] = {}
    for method in methods:
        row: dict[str, Any] = {"final": {}, "bwt": {}, "stages": {}}
        for w in WORLDS:
            for metric in ("CIDEr", "slot", "novel"):
                vals = [s[method][w][2][metric] for s in seeds.values() if s[method][w][2][metric] is not None]
                row["final"][f"{w}/{metric}"] = vals
            learnt = {"A": 0, "B": 1, "C": 2}[w]
            row["bwt"][w] = [s[method][w][2]["slot"] - s[method][w][learnt]["slot"] for s in seeds.values()
                             if learnt in s[method][w] and w != "C"]
            for stage in (0, 1, 2):
                row["stages"][f"{w}/{stage}"] = [s[method][w][stage]["slot"] for s in seeds.values() if stage in s[method][w]]
        row["average"] = [statistics.mean(s[method][w][2]["slot"] for w in WORLDS) for s in seeds.values()]
        out[method] = row
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["Final scores (after stage 2: B, then C), mean ± std over seeds; slot = slot accuracy, novel = world B's "
             "star and purple recall:", "",
             "| method | A CIDEr | A slot | B CIDEr | B slot | B novel | C CIDEr | C slot | average slot | BWT A | BWT B |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in summary.items():
        f = row["final"]
        lines.append(f"| {method} | {_ms(f['A/CIDEr'])} | {_ms(f['A/slot'])} | {_ms(f['B/CIDEr'])} | {_ms(f['B/slot'])} | "
                     f"{_ms(f['B/novel'])} | {_ms(f['C/CIDEr'])} | {_ms(f['C/slot'])} | **{_ms(row['average'])}** | "
                     f"{_ms(row['bwt']['A'])} | {_ms(row['bwt']['B'])} |")
    lines += ["", "Slot accuracy after each stage (0: the base; 1: after B; 2: after C):", "",
              "| method | A: 0 → 1 → 2 | B: 0 → 1 → 2 | C: 0 → 1 → 2 |", "|---|---|---|---|"]
    for method, row in summary.items():
        cells = []
        for w in WORLDS:
            cells.append(" → ".join(_ms(row["stages"][f"{w}/{s}"]) for s in (0, 1, 2) if row["stages"][f"{w}/{s}"]))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, Any], path: Path) -> Path | None:
    """Final slot accuracy per world and method (bars, std as error bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    methods = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods)), 3.6))
    width = 0.8 / len(WORLDS)
    for k, w in enumerate(WORLDS):
        means = [statistics.mean(summary[m]["final"][f"{w}/slot"]) for m in methods]
        stds = [statistics.stdev(summary[m]["final"][f"{w}/slot"]) if len(summary[m]["final"][f"{w}/slot"]) > 1 else 0
                for m in methods]
        ax.bar([i + k * width for i in range(len(methods))], means, width, yerr=stds, label=f"world {w}", capsize=2)
    ax.set_xticks([i + width for i in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("slot accuracy after B, then C")
    ax.set_ylim(0, 1)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("evals/continual"))
    p.add_argument("--data", type=Path, default=Path("data/shapes"), help="the shapes worlds (generated if missing)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--base", default="shapes-llava-base")
    p.add_argument("--steps", type=int, default=150, help="steps of each adapter training (B, C, sequential, O-LoRA, distillation)")
    p.add_argument("--router-steps", type=int, default=150)
    p.add_argument("--replay", type=int, default=64, help="captioned training images per world in the router's replay set")
    p.add_argument("--distill-images", type=int, default=200, help="unlabelled training images per world for distillation")
    p.add_argument("--ranks", default="4,16", help="ranks of the distilled adapters")
    p.add_argument("--test", type=int, default=100, help="test images per world")
    p.add_argument("--scale", type=float, default=1.0, help="shapes-world size if it has to be generated")
    p.add_argument("--vision-layers", default=None,
                   help="the vision layers to adapt (e.g. 0,1) instead of the recipes' (for another --base)")
    args = p.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    if args.vision_layers is not None:
        args.vision_layers = [int(x) for x in args.vision_layers.split(",")]
    args.base_router_spec = {"include_base": True, "gate": "learned"}
    from mmlora.showcase.demo import ensure_worlds

    started = time.perf_counter()
    data_dir = ensure_worlds(args.data, scale=args.scale, own_dir=args.out / "data", log=_log)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"seeds": {}, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        results["seeds"][str(seed)] = run_seed(seed, args, data_dir)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    summary = summarise(results)
    results["summary"] = summary
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(summary)
    (args.out / "table.md").write_text(text)
    picture = chart(summary, args.out / "continual.png")
    print(text)
    _log(f"wrote {args.out / 'table.md'}, results.json{' and continual.png' if picture else ''} "
         f"in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
