"""Launch-shape heuristics: the tile a decode runs and its split-KV count (no GPU needed)."""

from __future__ import annotations

import pytest

from xqagen.dispatch import MAX_AUTO_SPLITS, SPLIT_TILE, auto_splits, choose_spec, dispatch_specs, split_variant
from xqagen.spec import KernelSpec

H100_SMS = 132
FP8 = KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=128, group=8, page_size=64)


@pytest.mark.parametrize("batch, kv_len, tile, splits", [
    (1, 32768, SPLIT_TILE, 16),   # 8 CTAs without splits: 16 splits of the 8-warp tile, one CTA per SM
    (2, 32768, SPLIT_TILE, 8),
    (1, 8192, SPLIT_TILE, 16),    # just long enough for 16 splits of 4 x 128-token tiles
    (1, 8191, "decode_fp8", 16),  # shorter: the default tile
    (3, 32768, "decode_fp8", 11), # 16 splits would fill the GPU: the default tile, about 2 CTAs per SM
    (8, 32768, "decode_fp8", 4),
    (64, 8192, "decode_fp8", 1),  # the batch fills the GPU alone
])
def test_tile_and_split_choice_on_132_sms(batch, kv_len, tile, splits):
    spec = choose_spec(FP8, batch, 8, kv_len, H100_SMS)
    assert spec.tile.name == tile
    assert auto_splits(spec, batch, 8, kv_len, H100_SMS) == splits


def test_splits_keep_four_tiles_each_and_stay_under_the_cap():
    assert auto_splits(FP8, 1, 8, 64 * 4 * 3, H100_SMS) == 3
    assert auto_splits(FP8, 1, 1, 1 << 20, H100_SMS) == MAX_AUTO_SPLITS
    assert auto_splits(FP8, 1, 8, 1, H100_SMS) == 1


def test_fewer_sms_shift_the_split_tile_threshold():
    assert choose_spec(FP8, 1, 8, 32768, sm_count=64).tile.name == "decode_fp8"  # 8 x 16 x 4 warps fill 64 SMs
    assert choose_spec(FP8, 1, 8, 32768, sm_count=160).tile.name == SPLIT_TILE


def test_split_tile_only_where_it_fits():
    wide_16bit = KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=256, group=8, page_size=64)
    assert split_variant(wide_16bit) is None  # three 128-token stages of 512-byte rows exceed shared memory
    assert dispatch_specs(wide_16bit) == [wide_16bit]
    assert choose_spec(wide_16bit, 1, 8, 1 << 16, H100_SMS) == wide_16bit
    assert [s.tile.name for s in dispatch_specs(FP8)] == ["decode_fp8", SPLIT_TILE]
    split = split_variant(FP8)
    assert split_variant(split) is None and dispatch_specs(split) == [split]


def test_split_tile_keeps_every_other_field():
    spec = KernelSpec(q_dtype="fp16", kv_dtype="fp16", head_dim=64, group=5, page_size=16, kv_layout="HND",
                      q_seq_len=4, features=frozenset({"sinks", "sliding_window"}))
    split = split_variant(spec)
    assert split.tile.name == SPLIT_TILE
    assert {**split.to_dict(), "tile": None} == {**spec.to_dict(), "tile": None}


def test_kv_range_is_the_window_when_there_is_one():
    from xqagen.dispatch import kv_range

    assert kv_range(32768, 0) == 32768
    assert kv_range(32768, 4096) == 4096
    assert kv_range(1024, 4096) == 1024
    # a 4096-token window keeps the default tile where the page table alone would pick the split tile
    assert choose_spec(FP8, 1, 8, kv_range(32768, 4096), H100_SMS).tile.name == "decode_fp8"
