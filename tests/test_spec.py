"""KernelSpec and tile validation, naming and hashing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xqagen.emitters import PATHS
from xqagen.emitters.generic import TILES, GenericTile, plan_of
from xqagen.spec import KernelSpec, SpecError

BASE = dict(q_dtype="bf16", kv_dtype="bf16", head_dim=128, group=8, page_size=64)


@pytest.mark.parametrize("field, value, allowed", [
    ("q_dtype", "fp32", "'fp16', 'bf16'"),
    ("kv_dtype", "int8", "'fp16', 'bf16', 'e4m3'"),
    ("head_dim", 40, "a multiple of 16 in [32, 256]"),
    ("page_size", 48, "16, 32, 64, 128"),
    ("path", "sm100", "'generic'"),
    ("features", {"alibi"}, "'sinks', 'sliding_window'"),
])
def test_invalid_choice_names_field_and_allowed_values(field, value, allowed):
    with pytest.raises(SpecError) as err:
        KernelSpec(**{**BASE, field: value})
    assert f"KernelSpec.{field}" in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("field, value", [("group", 0), ("group", 33), ("q_seq_len", 0), ("q_seq_len", 33),
                                          ("group", 2.0), ("q_seq_len", True)])
def test_invalid_ranges(field, value):
    with pytest.raises(SpecError, match=f"KernelSpec.{field} = .* expected an integer in"):
        KernelSpec(**{**BASE, field: value})


@pytest.mark.parametrize("changes, message", [
    (dict(kv_dtype="fp16"), "16-bit KV cache must have the query's dtype"),
    (dict(out_dtype="e4m3"), "fp8 output needs kv_dtype = 'e4m3'"),
    (dict(kv_dtype="e4m3", out_dtype="fp16"), "allowed: 'bf16' or 'e4m3'"),
    (dict(tile="nonexistent"), "unknown tile configuration 'nonexistent' for the generic path"),
    (dict(tile=3), "expected a GenericTile"),
    # the path's plan refuses it: three stages of 128 tokens of 512-byte rows exceed shared memory
    (dict(head_dim=256, tile="split"), "generic path cannot implement this variant: tile 'split' needs"),
    # the fp8 MMA mode: 8-bit wgmmas (the Hopper path), on an e4m3 cache
    (dict(kv_dtype="e4m3", features=frozenset({"fp8_mma"})), "the generic path has no fp8_mma mode"),
    (dict(path="hopper", features=frozenset({"fp8_mma"})), "the fp8_mma feature needs kv_dtype = 'e4m3'"),
])
def test_inconsistent_combinations(changes, message):
    with pytest.raises(SpecError, match=message):
        KernelSpec(**{**BASE, **changes})


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="bad name"), "expected an identifier"),
    (dict(name="t", warps=6), "GenericTile\\('t'\\).warps"),
    (dict(name="t", kv_tile=48), "kv_tile"),
    (dict(name="t", stages=1), "stages"),
    (dict(name="t", max_rows=128, warps=4), "needs 8 warps"),
])
def test_invalid_tiles(kwargs, message):
    with pytest.raises(SpecError, match=message):
        GenericTile(**kwargs)


def test_defaults_and_derived_fields():
    spec = KernelSpec(**BASE)
    assert spec.out_dtype == "bf16" and spec.tile == TILES["decode"] and spec.rows == 8
    assert not spec.has_mask and KernelSpec(**BASE, q_seq_len=3).has_mask
    tile = lambda **changes: KernelSpec(**{**BASE, **changes}).tile.name  # noqa: E731
    assert tile(head_dim=256) == "wide_head" and tile(head_dim=256, kv_dtype="e4m3") == "decode_fp8"
    assert [tile(group=group) for group in (8, 32)] == ["decode"] * 2
    assert [tile(q_seq_len=n) for n in (5, 8)] == ["many_rows"] * 2  # 40 and 64 rows


def test_warp_rows_give_way_to_registers():
    fp8 = dict(BASE, kv_dtype="e4m3", group=32)
    assert plan_of(KernelSpec(**fp8)).warp_blocks == 2  # 32 rows per warp: (warps_m, warps_n) = (1, 4)
    assert plan_of(KernelSpec(**fp8, q_seq_len=2)).warps_m == 2
    # head_dim 256: two blocks of fp32 accumulators alone would take 256 registers per thread
    assert plan_of(KernelSpec(**dict(fp8, head_dim=256))).warp_blocks == 1
    assert plan_of(KernelSpec(**dict(BASE, kv_dtype="e4m3"))).warp_blocks == 1  # 8 rows: one block


def test_name_and_hash_distinguish_every_field():
    variants = [KernelSpec(**BASE)] + [KernelSpec(**{**BASE, **c}) for c in (
        dict(q_dtype="fp16", kv_dtype="fp16"), dict(kv_dtype="e4m3"), dict(kv_dtype="e4m3", out_dtype="e4m3"),
        dict(head_dim=64), dict(group=4), dict(page_size=16), dict(q_seq_len=2),
        dict(features={"sinks"}), dict(features={"sliding_window"}), dict(tile="deep"))]
    assert len({v.name for v in variants}) == len(variants)
    assert len({v.content_hash for v in variants}) == len(variants)
    assert all(v.name.isidentifier() for v in variants)


def test_round_trip_and_equality():
    spec = KernelSpec(**BASE, features={"sinks", "sliding_window"}, q_seq_len=4)
    again = KernelSpec.from_dict(spec.to_dict())
    assert again == spec and hash(again) == hash(spec) and again.name == spec.name
    with pytest.raises(SpecError, match="no field"):
        KernelSpec.from_dict({**spec.to_dict(), "colour": "blue"})


def test_hash_is_stable_across_processes():
    code = ("from xqagen.spec import KernelSpec; print(KernelSpec(q_dtype='bf16', kv_dtype='e4m3', head_dim=128, "
            "group=8, page_size=64, features={'sinks', 'sliding_window'}).name)")
    names = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(names) == 1


def test_tiles_are_data_a_kernel_author_passes():
    """A tile is a value: a spec carries it (or a mapping of its fields), and no table changes."""
    tile = GenericTile("test_long_pipeline", kv_tile=64, stages=6, warps=4, max_rows=64)
    spec = KernelSpec(**BASE, tile=tile)
    assert spec.tile is tile and "test_long_pipeline" in spec.name
    assert KernelSpec(**BASE, tile=tile.to_dict()) == spec
    assert KernelSpec.from_dict(spec.to_dict()) == spec
    assert "test_long_pipeline" not in PATHS["generic"].tiles
    # same name, other fields: another kernel
    assert KernelSpec(**BASE, tile=dict(tile.to_dict(), stages=5)).name != spec.name


def test_kernel_identity_holds_no_launch_argument():
    """What the emitted code does not depend on (the KV layout, sizes, scales) is not in a spec."""
    assert "kv_layout" not in KernelSpec(**BASE).to_dict()
    with pytest.raises(TypeError):
        KernelSpec(**BASE, kv_layout="HND")
