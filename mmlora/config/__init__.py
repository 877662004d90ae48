"""Recipes: schema (``schema.py``) and loading with overrides (``loading.py``)."""

from mmlora.config.loading import load_recipe, recipe_json_schema
from mmlora.config.schema import ModalitySpec, PlacementSpec, Recipe

__all__ = ["ModalitySpec", "PlacementSpec", "Recipe", "load_recipe", "recipe_json_schema"]
