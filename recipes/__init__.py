"""The shipped recipes, installed as the package data of ``xqagen.recipe_files``."""
