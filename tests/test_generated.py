"""The committed generated/ tree matches the shipped recipes, and generation is deterministic."""

from __future__ import annotations

import os
import subprocess
import sys

from xqagen.recipes import load_recipe, render_recipe, shipped_recipes, sync_generated


def test_generated_is_up_to_date(repo_root):
    recipes = [load_recipe(path) for path in shipped_recipes()]
    changes = sync_generated(repo_root / "generated", recipes, check=True)
    assert not changes, "generated/ is out of date; run `xqagen generate --all`:\n" + "\n".join(
        f"  {change.kind:<7}  {change.path}" for change in changes)
    # `generate` never deletes a recipe's folder, so one left by a renamed recipe shows up here.
    assert sorted(path.name for path in (repo_root / "generated").iterdir()) == sorted(
        recipe.name for recipe in recipes)


def test_rendering_twice_gives_identical_bytes():
    for path in shipped_recipes():
        assert render_recipe(load_recipe(path)) == render_recipe(load_recipe(path))


def test_generation_does_not_depend_on_hash_seed(read_tree, tmp_path):
    """String hashes, and so set iteration order, change with PYTHONHASHSEED; the output must not."""
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-m", "xqagen.cli", "generate", "--all", "--out", str(tmp_path / seed)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed})
    assert read_tree(tmp_path / "1") == read_tree(tmp_path / "2")
