"""Recipes: the kernel variants a model needs, and the generated sources they render to.

A recipe is a YAML file named ``<recipe name>.yaml``::

    description: Llama 3 8B decode, 16-bit KV cache
    model:                          # geometry; fixes each variant's head_dim and GQA group
      name: meta-llama/Meta-Llama-3-8B
      num_q_heads: 32
      num_kv_heads: 8
      head_dim: 128
    tiles:                          # optional: this recipe's own tiles (fields of the path's tile type)
      deep8: {kv_tile: 128, stages: 4, warps: 8, max_rows: 128}
    defaults:                       # optional: fields shared by every variant entry
      page_size: [16, 64]
    variants:                       # KernelSpec fields other than head_dim and group
      - {q_dtype: bf16, kv_dtype: bf16}
      - {q_dtype: bf16, kv_dtype: e4m3, features: [[sinks], [sinks, sliding_window]], tile: deep8}

A variant without a ``tile`` ships every tile the runtime may dispatch it to (its path's
``launch_specs``: for the generic path, its default tile and the split tile for small batches).
A ``tile`` names one of the recipe's own ``tiles:`` or one of the path's shipped tiles; a recipe's
tiles belong to that recipe alone (a ``path:`` key says whose tile type they are; default
generic), so recipes never change what another recipe or a launch gets.
A list value expands as a cartesian product.  ``features`` takes a list of feature names (one
feature set); a list of such lists expands over several feature sets.  Identical specs produced
by different entries are kept once, in order of first appearance.

Shipped recipes are package data (:data:`SHIPPED_RECIPES_PACKAGE`, the repository's ``recipes/``
folder), so they come with every kind of install.

Generated sources live in ``<out>/<recipe name>/``: one ``<spec name>.cu`` per variant plus a
``manifest.json`` describing them; :func:`sync_generated` writes or checks that tree.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from xqagen.emitters import PATHS, EmittedKernel, emit, path_of
from xqagen.spec import KernelSpec, SpecError

SHIPPED_RECIPES_PACKAGE = "xqagen.recipe_files"
RECIPE_SUFFIX = ".yaml"
MANIFEST_NAME = "manifest.json"
SOURCE_SUFFIX = ".cu"

TOP_LEVEL_KEYS = ("description", "model", "tiles", "defaults", "variants")
MODEL_KEYS = ("name", "num_q_heads", "num_kv_heads", "head_dim")
# KernelSpec fields a variant may set, in the order variants expand; head_dim and group come
# from the model so that every variant of a recipe fits the model.
VARIANT_KEYS = ("path", "q_dtype", "kv_dtype", "out_dtype", "page_size", "q_seq_len", "features", "tile")
MODEL_FIELDS = ("head_dim", "group")


class RecipeError(ValueError):
    """An invalid recipe; the message names the file and the offending entry and field."""


@dataclass(frozen=True)
class ModelGeometry:
    """The attention shape of a model: what every kernel variant of its recipe must match."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelGeometry
    description: str
    variants: tuple[KernelSpec, ...]
    source_path: Path


def shipped_recipes_dir() -> Path:
    """The folder of the shipped recipes: ``recipes/`` in a source tree, installed as package data."""
    # pip installs wheels unpacked, so the package is a folder on disk, not a zip.
    return Path(str(importlib.resources.files(SHIPPED_RECIPES_PACKAGE)))


def shipped_recipes() -> list[Path]:
    """The shipped recipe files, sorted; RecipeError when there are none (a broken installation)."""
    found = sorted(shipped_recipes_dir().glob(f"*{RECIPE_SUFFIX}"))
    if not found:
        raise RecipeError(f"no shipped recipes in {shipped_recipes_dir()}: the xqagen installation is incomplete")
    return found


def find_recipe(name_or_path: str | Path) -> Path:
    """A path to a recipe file, or the bare name of a shipped recipe (``llama3-8b``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    is_bare_name = path.name == str(name_or_path) and path.suffix not in (".yaml", ".yml")
    if is_bare_name:
        shipped = shipped_recipes_dir() / f"{name_or_path}{RECIPE_SUFFIX}"
        if shipped.is_file():
            return shipped
    names = ", ".join(p.stem for p in sorted(shipped_recipes_dir().glob(f"*{RECIPE_SUFFIX}"))) or "none"
    raise RecipeError(f"no recipe {str(name_or_path)!r}: not a file, nor a shipped recipe ({names})")


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file and expand its variants."""
    path = Path(path)
    where = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise RecipeError(f"{where}: cannot read recipe: {err}") from err
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: a recipe is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    _check_keys(f"{where}: recipe", data, TOP_LEVEL_KEYS)

    description = data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{where}: 'description' must be a string")
    model = _load_model(where, data.get("model"))
    tiles = _load_tiles(where, data.get("tiles") or {})
    defaults = data.get("defaults") or {}
    _check_entry(f"{where}: defaults", defaults)
    entries = data.get("variants")
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: 'variants' must be a non-empty list of variant entries")

    variants: dict[KernelSpec, None] = {}  # ordered set: dedupes across entries
    for index, entry in enumerate(entries):
        context = f"{where}: variants[{index}]"
        _check_entry(context, entry)
        for fields in _expand({**defaults, **entry}, context):
            spec_fields = {**fields, "head_dim": model.head_dim, "group": model.group}
            if isinstance(fields.get("tile"), str) and fields["tile"] in tiles:
                spec_fields["tile"] = tiles[fields["tile"]]
            try:
                spec = KernelSpec.from_dict(spec_fields)
            except SpecError as err:
                combination = ", ".join(f"{k}={v}" for k, v in fields.items())
                raise RecipeError(f"{context} ({combination}): {err}") from err
            # Without a tile, ship every tile the runtime's dispatch may choose for the variant.
            for shipped in ([spec] if "tile" in fields else path_of(spec).launch_specs(spec)):
                variants[shipped] = None
    return Recipe(name=path.stem, model=model, description=description.strip(), variants=tuple(variants),
                  source_path=path)


def _check_keys(context: str, mapping: Mapping, allowed: Sequence[str]) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            suggestion = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{context}: unknown key {key!r}{suggestion}; allowed: {', '.join(allowed)}")


def _load_model(where: str, model: Any) -> ModelGeometry:
    context = f"{where}: model"
    if not isinstance(model, Mapping):
        raise RecipeError(f"{context}: required mapping with keys {', '.join(MODEL_KEYS)}")
    _check_keys(context, model, MODEL_KEYS)
    missing = [key for key in MODEL_KEYS if key not in model]
    if missing:
        raise RecipeError(f"{context}: missing {', '.join(missing)}")
    if not isinstance(model["name"], str):
        raise RecipeError(f"{context}.name = {model['name']!r} is invalid; expected a string")
    for key in MODEL_KEYS[1:]:
        value = model[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RecipeError(f"{context}.{key} = {value!r} is invalid; expected a positive integer")
    if model["num_q_heads"] % model["num_kv_heads"]:
        raise RecipeError(f"{context}: num_q_heads = {model['num_q_heads']} is not a multiple of "
                          f"num_kv_heads = {model['num_kv_heads']}; GQA needs a whole number of q heads per kv head")
    return ModelGeometry(**{key: model[key] for key in MODEL_KEYS})


def _load_tiles(where: str, tiles: Any) -> dict[str, Any]:
    """The recipe's own tiles by name, each of its path's tile type."""
    if not isinstance(tiles, Mapping):
        raise RecipeError(f"{where}: 'tiles' must map tile names to tile fields")
    loaded = {}
    for name, fields in tiles.items():
        context = f"{where}: tiles.{name}"
        fields = dict(fields) if isinstance(fields, Mapping) else fields
        path_name = fields.pop("path", "generic") if isinstance(fields, dict) else "generic"
        path = PATHS.get(path_name)
        if path is None:
            raise RecipeError(f"{context}.path = {path_name!r} is invalid; allowed values: {', '.join(PATHS)}")
        tile_keys = tuple(f.name for f in dataclasses.fields(path.tile_type) if f.name != "name")
        if not isinstance(fields, dict):
            raise RecipeError(f"{context}: expected a mapping of {', '.join(tile_keys)}")
        _check_keys(context, fields, tile_keys)
        if name in path.tiles:
            raise RecipeError(f"{context}: {name!r} is a shipped {path.name} tile; give the recipe's tile its own name")
        try:
            loaded[name] = path.tile_type(name=name, **fields)
        except SpecError as err:
            raise RecipeError(f"{context}: {err}") from err
    return loaded


def _check_entry(context: str, entry: Any) -> None:
    if not isinstance(entry, Mapping):
        raise RecipeError(f"{context}: expected a mapping of KernelSpec fields ({', '.join(VARIANT_KEYS)})")
    if "kv_layout" in entry:
        raise RecipeError(f"{context}: 'kv_layout' is not a kernel field: every kernel reads NHD and HND page "
                          f"pools alike (a launch argument); remove it")
    for key in MODEL_FIELDS:
        if key in entry:
            raise RecipeError(f"{context}: {key!r} is set by the recipe's model section, not per variant")
    _check_keys(context, entry, VARIANT_KEYS)


def _expand(entry: Mapping[str, Any], context: str) -> Iterator[dict[str, Any]]:
    """Every combination of the entry's list values, as KernelSpec field dicts."""
    axes = []
    for key in VARIANT_KEYS:
        if key not in entry:
            continue
        choices = _feature_sets(entry[key], context) if key == "features" else entry[key]
        if not isinstance(choices, list):
            choices = [choices]
        if not choices:
            raise RecipeError(f"{context}.{key}: an empty list expands to no variants")
        axes.append([(key, choice) for choice in choices])
    for combination in itertools.product(*axes):
        yield dict(combination)


def _feature_sets(value: Any, context: str) -> list[list[str]]:
    """``[a, b]`` is one feature set; ``[[a], [a, b]]`` is two."""
    sets = value if isinstance(value, list) and value and all(isinstance(v, list) for v in value) else [value]
    for features in sets:
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise RecipeError(f"{context}.features = {value!r} is invalid; expected a list of feature names "
                              f"or a list of such lists")
    return sets


# ---- generated sources ----

def render_recipe(recipe: Recipe) -> dict[str, bytes]:
    """The files of ``<out>/<recipe.name>/`` by file name: each variant's source and the manifest."""
    files: dict[str, bytes] = {}
    manifest_variants = []
    for spec in recipe.variants:
        kernel = emit(spec)
        source = kernel.source.encode()
        file_name = f"{spec.name}{SOURCE_SUFFIX}"
        files[file_name] = source
        manifest_variants.append(_manifest_entry(kernel, file_name, source))
    manifest = {"recipe": recipe.name, "description": recipe.description, "model": recipe.model.to_dict(),
                "variants": manifest_variants}
    files[MANIFEST_NAME] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    return files


def _manifest_entry(kernel: EmittedKernel, file_name: str, source: bytes) -> dict[str, Any]:
    spec = kernel.spec
    return {"name": spec.name, "content_hash": spec.content_hash, "spec": spec.to_dict(), "file": file_name,
            "source_sha256": hashlib.sha256(source).hexdigest(), "kernel_name": kernel.kernel_name,
            "threads": kernel.threads, "smem_bytes": kernel.smem_bytes, "arches": list(kernel.arches)}


@dataclass(frozen=True)
class FileChange:
    """A generated file that differs from what the recipes produce."""

    kind: Literal["missing", "stale", "extra"]
    path: Path


def sync_generated(out_dir: str | Path, recipes: Sequence[Recipe], *, check: bool = False) -> list[FileChange]:
    """Bring ``out_dir`` in line with ``recipes`` (or, with ``check``, only report what differs).

    Files whose bytes already match are left untouched.  The only files deleted are sources that a
    recipe folder's manifest names and the recipe no longer produces: files put there by anyone
    else, and the folders of other recipes, are never touched.  Returns the changes made, or that
    would be made.
    """
    out_dir = Path(out_dir)
    expected: dict[Path, bytes] = {}
    recipe_dirs: set[Path] = set()
    for recipe in recipes:
        recipe_dir = out_dir / recipe.name
        if recipe_dir in recipe_dirs:
            raise RecipeError(f"two recipes named {recipe.name!r} would both write {recipe_dir}")
        recipe_dirs.add(recipe_dir)
        expected.update({recipe_dir / name: data for name, data in render_recipe(recipe).items()})

    changes = [FileChange("missing" if not path.exists() else "stale", path)
               for path, data in expected.items() if not path.is_file() or path.read_bytes() != data]
    for recipe_dir in sorted(recipe_dirs):
        changes.extend(FileChange("extra", path) for path in _manifest_sources(recipe_dir) if path not in expected)

    if not check:
        for change in changes:
            if change.kind == "extra":
                change.path.unlink()
            else:
                change.path.parent.mkdir(parents=True, exist_ok=True)
                change.path.write_bytes(expected[change.path])
    return changes


def _manifest_sources(recipe_dir: Path) -> list[Path]:
    """The existing source files that ``recipe_dir``'s manifest (as it is on disk) says it wrote."""
    try:
        variants = json.loads((recipe_dir / MANIFEST_NAME).read_bytes())["variants"]
        names = {name for name in (variant["file"] for variant in variants) if isinstance(name, str)}
    except (OSError, ValueError, TypeError, KeyError):
        return []  # no readable manifest: nothing here is known to be generated
    # Plain file names only: a hand-edited manifest must not reach outside its folder.
    return sorted(recipe_dir / name for name in names
                  if name.endswith(SOURCE_SUFFIX) and Path(name).name == name and (recipe_dir / name).is_file())
