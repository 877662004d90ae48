"""QA-LoRA against QLoRA on world B, the analogue of the QA-LoRA paper's table: which INT4 model do you
get, and how good is it?

Run: python scripts/qalora_table.py [--data data/shapes] [--steps 150] [--limit N] [--out evals/qalora]

Trains ``recipes/shapes/llava-qalora-b.yaml`` (language model INT4 g16 + QA-LoRA) and
``recipes/shapes/llava-qlora-b.yaml`` (language model NF4 + LoRA) unless their runs already exist
(``--retrain`` forces it), exports QA-LoRA merged (still INT4: adapters folded into the zero points) and
QLoRA merged then re-quantized to INT4 with the same group size, quantizes the base the same way as a
reference, and scores all of them with ``mmlora eval caption`` on the world-B test split. Writes
``qalora_table.md`` beside the caption evaluation's files under ``--out``. About 10 minutes on 2 CPU cores (mostly training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"qalora": ROOT / "recipes/shapes/llava-qalora-b.yaml", "qlora": ROOT / "recipes/shapes/llava-qlora-b.yaml"}
GROUP_SIZE = 16  # the QA-LoRA recipe's group size (688, the MLP width, is 43 x 16)


def _recipe(name: str, data: Path, runs: Path, steps: int) -> Path:
    """The shipped recipe with its data under ``data`` and its run under ``runs``."""
    import yaml

    spec = yaml.safe_load(RECIPES[name].read_text())
    for split in ("train", "val"):
        for d in spec["data"][split]:
            d["path"] = str(data / Path(d["path"]).relative_to("data/shapes"))
    spec["train"].update({"output_dir": str(runs / f"shapes-llava-{name}-b"), "max_steps": steps,
                          "save_every": steps, "eval_every": steps})
    path = runs / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _base_int4(out: Path) -> Path:
    """shapes-llava-base with its language model's linear layers quantized like QA-LoRA's base."""
    if (out / "mmlora_int4.json").is_file():
        return out
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmlora.models.loading import resolve_pretrained
    from mmlora.models.modality import discover_modalities
    from mmlora.adapters.int4 import quantize_linears, save_int4_model

    path = resolve_pretrained("shapes-llava-base")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="float32")
    mmap = discover_modalities(model)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Linear" and mmap.modality_of(n) == "language"
             and n not in mmap.heads]
    quantize_linears(model, names, GROUP_SIZE)
    save_int4_model(model, out, {"how": f"round-to-nearest INT4 (group size {GROUP_SIZE}), no adaptation"})
    AutoProcessor.from_pretrained(path).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from mmlora.cli import main as mmlora
    from mmlora.runs.layout import find_weights

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/shapes", help="shapes worlds (mmlora data shapes --out DIR)")
    p.add_argument("--runs", default="runs", help="where the two runs go (reused when present)")
    p.add_argument("--exports", default="runs/exports", help="merged INT4 models (reused when present)")
    p.add_argument("--out", default="evals/qalora")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--limit", type=int, default=None, help="first N test images (default: all 200)")
    p.add_argument("--retrain", action="store_true")
    args = p.parse_args(argv)
    data, runs, exports, out = (Path(x) for x in (args.data, args.runs, args.exports, args.out))
    if not (data / "world_B").is_dir():
        print(f"{data}: no world_B; run: mmlora data shapes --out {args.data}", file=sys.stderr)
        return 2

    for name in RECIPES:
        run = runs / f"shapes-llava-{name}-b"
        if args.retrain or find_weights(run) is None:
            if mmlora(["train", str(_recipe(name, data, runs, args.steps)), "train.resume=never"]) != 0:
                return 1
    models = {
        "base (fp32)": "shapes-llava-base",
        f"base, INT4 g{GROUP_SIZE} (round to nearest)": str(_base_int4(exports / "base-int4")),
        "QLoRA (NF4 + LoRA, unmerged)": str(runs / "shapes-llava-qlora-b"),
        f"QLoRA merged, re-quantized INT4 g{GROUP_SIZE}": str(exports / "qlora-merged-int4"),
        f"QA-LoRA (INT4 g{GROUP_SIZE} + adapters, unmerged)": str(runs / "shapes-llava-qalora-b"),
        f"QA-LoRA merged (INT4 g{GROUP_SIZE})": str(exports / "qalora-merged-int4"),
    }
    for source, target, extra in (("qalora", "qalora-merged-int4", []), ("qlora", "qlora-merged-int4", ["--int4", str(GROUP_SIZE)])):
        if args.retrain or not (exports / target / "mmlora_int4.json").is_file():
            import shutil

            shutil.rmtree(exports / target, ignore_errors=True)
            if mmlora(["export", str(runs / f"shapes-llava-{source}-b"), "--out", str(exports / target), "--merge", *extra]) != 0:
                return 1
    keys = {f"m{i}": ref for i, ref in enumerate(models.values())}
    cmd = ["eval", "caption", "--coco", str(data / "world_B/annotations/captions_test.json"), "--out", str(out)]
    cmd += [f"--model={k}={ref}" for k, ref in keys.items()]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if mmlora(cmd) != 0:
        return 1
    report = json.loads((out / "metrics.json").read_text())
    rows = ["| model | language-model weights after merge | CIDEr | BLEU-4 | slot acc. | max abs logit change vs unmerged |",
            "|---|---|---|---|---|---|"]
    for (key, ref), label in zip(keys.items(), models):
        s = report["models"][key]["scores"]
        export = Path(ref) / "mmlora_export.json"
        change = "-"
        if export.is_file():
            info = json.loads(export.read_text())
            change = f"{info['max_abs_diff']:.1e}"
        weights = ("INT4 g%d" % GROUP_SIZE) if "INT4" in label else ("NF4 + LoRA in fp32" if "NF4" in label else "fp32")
        if "QA-LoRA (" in label:
            weights = f"INT4 g{GROUP_SIZE} + QA-LoRA in fp32"
        rows.append(f"| {label} | {weights} | {s['CIDEr']:.3f} | {s['BLEU-4']:.3f} | {s.get('slot_all', float('nan')):.3f} | {change} |")
    p_ = report["protocol"]
    table = "\n".join(rows) + (f"\n\n(world-B {p_['split']} split, {p_['num_images']} images, {p_['decoding']}, "
                               f"{args.steps} training steps per run; vision and projector LoRA merged into fp32 in every row.)\n")
    (out / "qalora_table.md").write_text(table)
    (out / "qalora_models.json").write_text(json.dumps(keys | {"labels": list(models)}, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
