"""Recipes: the YAML schema of an experiment and the runner that carries it out."""

from kdistill.recipes.runner import Experiment, RunRecord, RunSummary, method_terms
from kdistill.recipes.schema import Recipe, load_recipe

__all__ = ["Experiment", "Recipe", "RunRecord", "RunSummary", "load_recipe", "method_terms"]
