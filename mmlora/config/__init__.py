"""Recipes: the schema (``schema.py``) and loading with ``key=value`` overrides (``loading.py``).

Layer: config. Imports the foundation only.
"""

from mmlora.config.loading import load_recipe, recipe_json_schema
from mmlora.config.schema import ModalitySpec, PlacementSpec, Recipe

__all__ = ["ModalitySpec", "PlacementSpec", "Recipe", "load_recipe", "recipe_json_schema"]
