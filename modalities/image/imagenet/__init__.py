"""The full ImageNet VAR pipeline: data (:mod:`.data`), the published training recipes
(:mod:`.recipes`, :mod:`.train`), 50k-sample generation (:mod:`.generate`) and FID / IS /
precision / recall with an Inception network loaded from a path (:mod:`.inception`,
:mod:`.evaluate`).  See ``docs/imagenet.md``."""
from .recipes import RECIPES, Recipe, get_recipe

__all__ = ["RECIPES", "Recipe", "get_recipe"]
