"""Recipe loading: shipped recipes, variant expansion, recipe tiles and error messages."""

from __future__ import annotations

import re

import pytest

from xqagen.recipes import RecipeError, find_recipe, load_recipe, shipped_recipes, shipped_recipes_dir
from xqagen.emitters.generic import TILES
from xqagen.spec import KernelSpec

# Each recipe variant ships its default tile and the split tile small batches dispatch to.
SHIPPED = {"llama3-8b": 16, "llama3-70b-fp8": 24, "llama3.2-1b": 12, "llama3-70b-specdec": 21, "gpt-oss": 21}


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda path: path.stem)
def test_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.description
    assert recipe.variants
    assert len({spec.name for spec in recipe.variants}) == len(recipe.variants)
    for spec in recipe.variants:
        assert spec.head_dim == recipe.model.head_dim
        assert spec.group * recipe.model.num_kv_heads == recipe.model.num_q_heads


def test_shipped_recipes_and_variant_counts():
    counts = {path.stem: len(load_recipe(path).variants) for path in shipped_recipes()}
    assert counts == SHIPPED
    assert sum(counts.values()) <= 100, "every shipped variant is compiled in CI"


def test_shipped_recipe_contents():
    fp8 = load_recipe(find_recipe("llama3-70b-fp8"))
    assert {(s.kv_dtype, s.out_dtype) for s in fp8.variants} == {("e4m3", "bf16"), ("e4m3", "e4m3")}
    # what sm_90 dispatches fp8 decode to, beside the generic kernels (six stages for grids that
    # leave an SM one CTA; for fuller ones four, or two stages of one consumer warpgroup on short KV,
    # by cp.async beyond 2048 tokens)
    assert {(s.path, s.tile.name) for s in fp8.variants if s.path == "hopper"} == {
        ("hopper", "tma6x2"), ("hopper", "cpa4x2"), ("hopper", "tma2x1"), ("hopper", "cpa2x1")}
    assert sum(s.path == "hopper" for s in fp8.variants) == 16
    specdec = load_recipe(find_recipe("llama3-70b-specdec"))
    assert {(s.kv_dtype, s.q_seq_len) for s in specdec.variants} == {
        (kv, n) for kv in ("bf16", "e4m3") for n in (4, 8)}
    assert {(s.kv_dtype, s.q_seq_len, s.tile.name) for s in specdec.variants if s.path == "hopper"} == {
        ("e4m3", 4, "tma6x2"), ("e4m3", 4, "tma4x2"), ("e4m3", 4, "tma2x1"),  # what sm_90 dispatches fp8 with 32 rows to
        ("e4m3", 8, "tma6x2"), ("e4m3", 8, "tma6x2r"),  # and 64 rows (always the register split)
        ("bf16", 4, "tma4x2"), ("bf16", 4, "cpa4x2"), ("bf16", 8, "tma4x2"), ("bf16", 8, "tma4x2r")}
    # the opt-in fp8 MMA mode where it measured faster, on the tiles dispatch picks for it
    assert {(s.q_seq_len, s.tile.name) for s in specdec.variants if "fp8_mma" in s.features} == {
        (4, "tma6x2"), (4, "tma4x2"), (8, "tma6x2"), (8, "tma6x2r")}
    gpt_oss = load_recipe(find_recipe("gpt-oss"))
    assert all(s.sinks and s.head_dim == 64 for s in gpt_oss.variants)
    assert {s.sliding_window for s in gpt_oss.variants} == {True, False}
    # sm_90 runs windowed speculative decoding on the Hopper path only for full grids, on two stages
    assert {(s.q_seq_len, s.sliding_window) for s in gpt_oss.variants if s.path == "hopper"} == {
        (1, False), (1, True), (4, False), (4, True)}
    assert {s.tile.name for s in gpt_oss.variants if s.path == "hopper" and s.q_seq_len == 4 and s.sliding_window} == {
        "tma2x1"}


def test_variants_without_a_tile_ship_every_dispatched_tile(write_recipe):
    model = {"name": "test/d256", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 256}
    path = write_recipe("variants:\n"
                        "  - {q_dtype: bf16, kv_dtype: [e4m3, bf16], page_size: 64}\n"
                        "  - {q_dtype: fp16, kv_dtype: e4m3, page_size: 64, tile: deep}\n", model=model)
    tiles = [(s.kv_dtype, s.tile.name) for s in load_recipe(path).variants]
    # A 16-bit head_dim 256 has no split tile (its stages exceed shared memory); a named tile ships alone.
    assert tiles == [("e4m3", "decode_fp8"), ("e4m3", "split"), ("bf16", "wide_head"), ("e4m3", "deep")]


def test_find_recipe_by_name_or_path(write_recipe):
    assert find_recipe("llama3-8b") == shipped_recipes_dir() / "llama3-8b.yaml"
    path = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64}]")
    assert find_recipe(str(path)) == path
    with pytest.raises(RecipeError, match=r"no recipe 'llama9'.*llama3-8b"):
        find_recipe("llama9")


def test_list_values_expand_as_cartesian_product(write_recipe):
    recipe = load_recipe(write_recipe("""
        defaults: {tile: decode}
        variants:
          - q_dtype: bf16
            kv_dtype: [bf16, e4m3]
            page_size: [16, 32, 64]
            q_seq_len: [1, 2]
        """))
    assert len(recipe.variants) == 12
    assert {(s.kv_dtype, s.page_size, s.q_seq_len) for s in recipe.variants} == {
        (kv, page, n) for kv in ("bf16", "e4m3") for page in (16, 32, 64) for n in (1, 2)}
    assert all(s.group == 4 and s.head_dim == 128 for s in recipe.variants)
    assert recipe.variants[0] == KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=128, group=4, page_size=16)


def test_features_list_is_one_set_and_list_of_lists_expands(write_recipe):
    recipe = load_recipe(write_recipe("""
        defaults: {tile: decode}
        variants:
          - {q_dtype: bf16, kv_dtype: bf16, page_size: 64, features: [sinks, sliding_window]}
          - {q_dtype: bf16, kv_dtype: bf16, page_size: 64, features: [[], [sinks]]}
        """))
    assert [set(s.features) for s in recipe.variants] == [{"sinks", "sliding_window"}, set(), {"sinks"}]


def test_defaults_apply_to_every_entry_and_entries_override_them(write_recipe):
    recipe = load_recipe(write_recipe("""
        defaults: {page_size: [16, 64], q_seq_len: 2, tile: decode}
        variants:
          - {q_dtype: bf16, kv_dtype: bf16}
          - {q_dtype: fp16, kv_dtype: fp16, q_seq_len: 1}
        """))
    assert [(s.q_dtype, s.page_size, s.q_seq_len) for s in recipe.variants] == [
        ("bf16", 16, 2), ("bf16", 64, 2), ("fp16", 16, 1), ("fp16", 64, 1)]


def test_duplicate_specs_are_kept_once_in_first_order(write_recipe):
    recipe = load_recipe(write_recipe("""
        defaults: {tile: decode}
        variants:
          - {q_dtype: bf16, kv_dtype: bf16, page_size: [16, 64]}
          - {q_dtype: bf16, kv_dtype: bf16, page_size: [64, 32], out_dtype: bf16}
        """))
    assert [s.page_size for s in recipe.variants] == [16, 64, 32]


def test_recipe_tiles_are_the_recipes_own(write_recipe):
    recipe = load_recipe(write_recipe("""
        tiles:
          deep8: {kv_tile: 128, stages: 2, warps: 8, max_rows: 128}
        variants:
          - {q_dtype: bf16, kv_dtype: bf16, page_size: 64, tile: [decode, deep8]}
        """))
    tile = recipe.variants[1].tile
    assert (tile.name, tile.kv_tile, tile.stages, tile.warps, tile.max_rows) == ("deep8", 128, 2, 8, 128)
    assert recipe.variants[0].tile == TILES["decode"]
    assert "_deep8_" in recipe.variants[1].name
    # another recipe, or a launch, never sees it
    assert "deep8" not in TILES
    other = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64, tile: deep8}]", name="other")
    with pytest.raises(RecipeError, match="unknown tile configuration 'deep8'"):
        load_recipe(other)


def test_two_recipes_may_define_a_tile_of_the_same_name(write_recipe):
    first = load_recipe(write_recipe("""
        tiles: {mine: {stages: 4}}
        variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64, tile: mine}]
        """, name="first"))
    second = load_recipe(write_recipe("""
        tiles: {mine: {stages: 5}}
        variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64, tile: mine}]
        """, name="second"))
    assert (first.variants[0].tile.stages, second.variants[0].tile.stages) == (4, 5)
    assert first.variants[0].name != second.variants[0].name


def test_shadowing_a_shipped_tile_is_an_error(write_recipe):
    path = write_recipe("""
        tiles:
          decode: {kv_tile: 32}
        variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64}]
        """)
    with pytest.raises(RecipeError, match=rf"{re.escape(str(path))}: tiles\.decode: 'decode' is a shipped generic tile"):
        load_recipe(path)


def test_invalid_tile_field_names_the_tile(write_recipe):
    path = write_recipe("""
        tiles:
          recipe_test_bad: {kv_tile: 128, warps: 6}
        variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64}]
        """)
    with pytest.raises(RecipeError, match=r"tiles\.recipe_test_bad: GenericTile\('recipe_test_bad'\)\.warps = 6"):
        load_recipe(path)


def test_kv_layout_is_not_a_kernel_field(write_recipe):
    path = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64, kv_layout: HND}]")
    with pytest.raises(RecipeError, match=r"variants\[0\]: 'kv_layout' is not a kernel field"):
        load_recipe(path)


def test_invalid_field_names_file_variant_field_and_allowed_values(write_recipe):
    path = write_recipe("""
        variants:
          - {q_dtype: bf16, kv_dtype: bf16, page_size: 64}
          - {q_dtype: bf16, kv_dtype: bf16, page_size: [64, 24]}
        """)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: variants[1] ")
    assert "page_size=24" in message
    assert "KernelSpec.page_size = 24 is invalid; allowed values: 16, 32, 64, 128" in message


def test_invalid_combination_names_the_combination(write_recipe):
    path = write_recipe("variants: [{q_dtype: [fp16, bf16], kv_dtype: bf16, page_size: 64}]")
    with pytest.raises(RecipeError, match=r"variants\[0\] \(q_dtype=fp16, kv_dtype=bf16, page_size=64\): "
                                          r"KernelSpec\.kv_dtype = 'bf16' is invalid with q_dtype = 'fp16'"):
        load_recipe(path)


def test_heads_must_divide(write_recipe):
    model = {"name": "bad", "num_q_heads": 30, "num_kv_heads": 8, "head_dim": 128}
    path = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64}]", model=model)
    expected = rf"{re.escape(str(path))}: model: num_q_heads = 30 is not a multiple of num_kv_heads = 8"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


@pytest.mark.parametrize("model, expected", [
    (None, r"model: required mapping"),
    ({"name": "m", "num_q_heads": 32, "num_kv_heads": 8}, r"model: missing head_dim"),
    ({"name": "m", "num_q_heads": 32, "num_kv_heads": 0, "head_dim": 128}, r"model\.num_kv_heads = 0 is invalid"),
    ({"name": "m", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 100},
     r"variants\[0\] .*KernelSpec\.head_dim = 100 is invalid; expected a multiple of 16 in \[32, 256\]"),
    ({"name": "m", "num_q_heads": 64, "num_kv_heads": 1, "head_dim": 128},
     r"KernelSpec\.group = 64 is invalid; expected an integer in \[1, 32\]"),
])
def test_model_errors(write_recipe, model, expected):
    path = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64}]", model=model)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


@pytest.mark.parametrize("text, expected", [
    ("variants: [{q_dtype: bf16, kv_dtype: bf16, pagesize: 64}]",
     r"variants\[0\]: unknown key 'pagesize' \(did you mean 'page_size'\?\); allowed: path, q_dtype"),
    ("variant: [{q_dtype: bf16}]", r"recipe: unknown key 'variant' \(did you mean 'variants'\?\)"),
    ("defaults: {layout: NHD}\nvariants: [{q_dtype: bf16}]", r"defaults: unknown key 'layout'"),
    ("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64, head_dim: 64}]",
     r"variants\[0\]: 'head_dim' is set by the recipe's model section"),
])
def test_unknown_keys(write_recipe, text, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(write_recipe(text))


@pytest.mark.parametrize("text, expected", [
    ("variants: []", r"'variants' must be a non-empty list"),
    ("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: []}]", r"variants\[0\]\.page_size: an empty list"),
    ("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64, features: [[sinks], 3]}]",
     r"variants\[0\]\.features = \[\['sinks'\], 3\] is invalid"),
    ("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 64, tile: nope}]",
     r"unknown tile configuration 'nope'"),
    ("variants: [q_dtype]", r"variants\[0\]: expected a mapping"),
    ("variants: [{q_dtype: bf16, kv_dtype: bf16}]", r"variants\[0\] \(.*\): KernelSpec needs field\(s\) page_size"),
    ("variants: [{q_dtype: bf16", r"cannot read recipe"),
])
def test_malformed_recipes(write_recipe, text, expected):
    path = write_recipe(text)
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: .*{expected}"):
        load_recipe(path)
