"""``mmlora train RECIPE [key=value ...]``: train with the Accelerate loop (``mmlora.train.loop``).

    mmlora train recipes/tiny/llava-train.yaml
    mmlora train recipes/tiny/llava-train.yaml train.max_steps=20 train.output_dir=runs/try
    torchrun --nproc_per_node 2 -m mmlora train recipes/tiny/llava-train.yaml    # DDP
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m mmlora train RECIPE
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")


def run(args: argparse.Namespace) -> int:
    from mmlora.config.loading import load_recipe
    from mmlora.eval.hooks import training_evaluators
    from mmlora.placement.report import format_plan
    from mmlora.showcase.slots import slot_scores
    from mmlora.train.loop import Trainer
    from mmlora.train.record import batching_line

    recipe = load_recipe(args.recipe, args.overrides)
    path = Path(args.recipe)
    trainer = Trainer(recipe, recipe_name=path.stem, base_dir=None,
                      evaluators=training_evaluators(recipe, extra=slot_scores))
    trainer.setup()
    if trainer.is_main:
        print(format_plan(trainer.plan, f"placement plan for {recipe.model.name}"))
        print(batching_line(recipe.train, trainer.accelerator.num_processes, trainer.total_steps,
                            trainer.speedups.get("packing")))
    result = trainer.train()
    if trainer.is_main:
        if result.get("allocation"):
            print(result["allocation"])
        print(f"trained {result['steps']} steps; final adapters: {result['final']}"
              + (f"; validation loss {result['val_loss']:.4f}" if result["val_loss"] is not None else "")
              + (f"; {result['skipped']} bad sample(s) skipped, listed in {result['bad_samples']}"
                 if result.get("skipped") else ""))
    return 0
