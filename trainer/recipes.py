"""The named model sizes, defined in the core (midfill.recipes) so that validation can size a run
without torch; re-exported here for the trainer's modules."""

from midfill.recipes import RECIPES, Recipe, get_recipe

__all__ = ["RECIPES", "Recipe", "get_recipe"]
