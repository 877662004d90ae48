"""``mmlora plan RECIPE [key=value ...]``: show where adapters go, before anything trains.

    mmlora plan recipes/tiny/llava-lora.yaml
    mmlora plan recipes/llava/llava15-7b-qlora.yaml --json
    mmlora plan recipes/tiny/llava-lora.yaml placement.language.rank=16

Plans from the model's config on the meta device (no weights read); ``--weights`` loads them.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. placement.language.rank=16")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (every matched module)")
    parser.add_argument("--weights", action="store_true", help="load the weights instead of planning on meta")
    parser.add_argument("--schema", action="store_true", help="print the recipe JSON schema and exit")


def run(args: argparse.Namespace) -> int:
    from mmlora.config.loading import load_recipe, recipe_json_schema
    from mmlora.errors import MmloraError

    if args.schema:
        sys.stdout.write(recipe_json_schema())
        return 0
    if not args.recipe:
        raise MmloraError("give a recipe: mmlora plan RECIPE [key=value ...]")
    recipe = load_recipe(args.recipe, args.overrides)
    from mmlora.models.build import load_model
    from mmlora.models.modality import discover_modalities
    from mmlora.placement.plan import plan_placement
    from mmlora.placement.report import format_plan

    model = load_model(recipe.model, meta=not args.weights)
    mmap = discover_modalities(model, recipe.model.modalities)
    plan = plan_placement(model, mmap, recipe.placement, allow_frozen=recipe.trains_router)
    if args.json:
        data = plan.to_dict() | {"model": recipe.model.name, "modality_map": mmap.summary()}
        if recipe.continual is not None:
            from mmlora.train.continual import router_params

            data["continual"] = recipe.continual.model_dump(mode="json")
            if recipe.trains_router:
                data["continual"]["router_params"] = router_params(recipe.continual, model)
        print(json.dumps(data, indent=2))
        for w in plan.warnings:  # the table shows them; JSON output keeps stdout pure
            print(f"mmlora: warning: {w}", file=sys.stderr)
    else:
        print(format_plan(plan, f"placement plan for {recipe.model.name} ({type(model).__name__})"))
        if recipe.continual is not None:
            from mmlora.train.continual import describe

            print(describe(recipe.continual, model))
    return 0
