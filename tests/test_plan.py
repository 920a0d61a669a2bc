"""Launch planning: the tile a decode runs and its split-KV count, chosen in xqagen.plan from the
path's answers (no GPU needed)."""

from __future__ import annotations

import dataclasses

import pytest

from xqagen.emitters import LaunchShape, WorkspaceSize, path_of
from xqagen.emitters.generic import MAX_AUTO_SPLITS, SPLIT_TILE
from xqagen.plan import plan_launch
from xqagen.spec import KernelSpec

H100_SMS = 132
FP8 = KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=128, group=8, page_size=64)
GENERIC = path_of(FP8)
LARGE = WorkspaceSize(floats=64 << 20, semaphores=1 << 16)


def shape(batch, kv_len, num_kv_heads=8, sm_count=H100_SMS):
    return LaunchShape(batch=batch, num_kv_heads=num_kv_heads, kv_len=kv_len, sm_count=sm_count)


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
    plan = plan_launch(FP8, shape(batch, kv_len), workspace=LARGE)
    assert (plan.spec.tile.name, plan.num_splits) == (tile, splits)


def test_splits_keep_two_tiles_each_and_stay_under_the_cap():
    assert GENERIC.auto_splits(FP8, shape(1, 64 * 2 * 3)) == 3
    assert GENERIC.auto_splits(FP8, shape(1, 1024)) == 8  # batch 1 x 1k: 8 splits of 2 tiles
    assert GENERIC.auto_splits(FP8, shape(1, 1 << 20, num_kv_heads=1)) == MAX_AUTO_SPLITS
    assert GENERIC.auto_splits(FP8, shape(1, 1)) == 1


def test_fewer_sms_shift_the_split_tile_threshold():
    assert GENERIC.choose_tile(FP8, shape(1, 32768, sm_count=64)).tile.name == "decode_fp8"  # 8 x 16 x 4 warps fill 64 SMs
    assert GENERIC.choose_tile(FP8, shape(1, 32768, sm_count=160)).tile.name == SPLIT_TILE


def test_split_tile_only_where_it_fits():
    wide_16bit = KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=256, group=8, page_size=64)
    assert GENERIC.launch_specs(wide_16bit) == [wide_16bit]  # three 128-token stages of 512-byte rows exceed shared memory
    assert GENERIC.choose_tile(wide_16bit, shape(1, 1 << 16)) == wide_16bit
    assert [s.tile.name for s in GENERIC.launch_specs(FP8)] == ["decode_fp8", SPLIT_TILE]
    split = GENERIC.launch_specs(FP8)[1]
    assert GENERIC.launch_specs(split) == [split]


def test_split_tile_keeps_every_other_field():
    spec = KernelSpec(q_dtype="fp16", kv_dtype="fp16", head_dim=64, group=5, page_size=16, q_seq_len=4,
                      features=frozenset({"sinks", "sliding_window"}))
    split = GENERIC.launch_specs(spec)[1]
    assert split.tile.name == SPLIT_TILE
    assert {**split.to_dict(), "tile": None} == {**spec.to_dict(), "tile": None}


def test_a_named_tile_and_a_forced_split_count_are_kept():
    plan = plan_launch(FP8, shape(1, 32768), tile_given=True, num_splits=5, workspace=LARGE)
    assert (plan.spec, plan.num_splits) == (FP8, 5)


def test_the_workspace_caps_the_splits():
    per_split = GENERIC.workspace_need(FP8, 1, 8, 1)
    assert per_split == WorkspaceSize(0, 0)  # one split needs no workspace
    two = GENERIC.workspace_need(FP8, 1, 8, 2)
    small = WorkspaceSize(floats=two.floats * 3 // 2, semaphores=two.semaphores)  # room for 3 splits
    assert plan_launch(FP8, shape(1, 8191), workspace=small).num_splits == 3
    assert plan_launch(FP8, shape(1, 8191), workspace=None).num_splits == 1
    assert plan_launch(FP8, shape(1, 8191), workspace=WorkspaceSize(two.floats * 10, semaphores=7)).num_splits == 1
    with pytest.raises(ValueError, match="num_splits: expected at most 3"):
        plan_launch(FP8, shape(1, 8191), num_splits=4, workspace=small)


def test_kv_len_is_the_window_when_there_is_one():
    # a 4096-token window keeps the default tile where the page table alone would pick the split tile
    assert GENERIC.choose_tile(FP8, shape(1, 4096)).tile.name == "decode_fp8"
    assert GENERIC.choose_tile(FP8, shape(1, 32768)).tile.name == SPLIT_TILE


def test_the_generic_path_targets_sm80_and_newer():
    assert GENERIC.unsupported_target("sm_75") and GENERIC.unsupported_target("sm_70")
    assert not any(GENERIC.unsupported_target(arch) for arch in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_120"))
    assert GENERIC.target_arch("sm_75") is None and GENERIC.target_arch("sm_86") == "sm_86"


# ---- the Hopper path and path dispatch ----
HOPPER_FP8 = KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=128, group=8, page_size=64, path="hopper")


def test_dispatch_sends_fp8_kv_on_sm90_to_the_hopper_path():
    from xqagen.plan import choose_path

    tma_ok = lambda: None  # noqa: E731
    large = shape(64, 8192)
    assert choose_path(FP8, "sm_90", tma_ok, large) == HOPPER_FP8
    for arch in ("sm_80", "sm_89", "sm_100", "sm_120"):  # Hopper cubins run on sm_90 only
        assert choose_path(FP8, arch, tma_ok, large) == FP8
    assert choose_path(FP8, "sm_90", lambda: "the KV pool's token stride is not a multiple of 16", large) == FP8
    for q_seq_len, group in ((2, 8), (4, 8), (8, 4), (8, 8), (5, 8), (16, 8)):  # the register split holds 64 rows
        specdec = dataclasses.replace(FP8, q_seq_len=q_seq_len, group=group)
        for batch, kv_len in ((1, 32768), (4, 16384), (9, 16384), (64, 8192)):
            assert choose_path(specdec, "sm_90", tma_ok, shape(batch, kv_len)).path == "hopper"
    # d256: 32 rows per CTA; more tile over CTAs, each converting the KV, so only grids that need splits
    many_rows = dataclasses.replace(FP8, q_seq_len=8, head_dim=256)
    assert choose_path(many_rows, "sm_90", tma_ok, shape(8, 16384)).path == "hopper"  # 128 CTAs of 32 rows
    assert choose_path(many_rows, "sm_90", tma_ok, shape(9, 16384)).path == "generic"  # 144: more than 132 SMs


@pytest.mark.parametrize("batch, kv_len, path", [
    (1, 1024, "hopper"),    # small launches: the Hopper path's pipeline starts sooner
    (16, 1024, "hopper"),
    (1, 32768, "hopper"),   # 64 MiB: 0.5 MiB per SM
    (4, 16384, "hopper"),   # 4096 tokens per KV split: the cp.async tile streams faster than the generic path
    (16, 4096, "hopper"),
    (16, 8192, "hopper"),
    (64, 8192, "generic"),  # two CTAs per SM and more: the generic path
])
def test_dispatch_sends_small_16bit_decodes_to_the_hopper_path(batch, kv_len, path):
    from xqagen.plan import choose_path

    bf16 = KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=128, group=8, page_size=64)
    assert choose_path(bf16, "sm_90", lambda: None, shape(batch, kv_len)).path == path
    assert choose_path(bf16, "sm_80", lambda: None, shape(batch, kv_len)) == bf16
    # 32 rows of speculative decoding: the Hopper path while its CTAs fit on the SMs, without a window
    specdec = dataclasses.replace(bf16, q_seq_len=4)
    assert choose_path(specdec, "sm_90", lambda: None, shape(batch, kv_len)).path == (
        "hopper" if batch * 8 <= 132 else "generic")
    windowed = dataclasses.replace(specdec, features=frozenset({"sliding_window"}))
    assert choose_path(windowed, "sm_90", lambda: None, shape(batch, kv_len)) == windowed
    # more than 32 rows: the register split holds 64 per CTA up to head_dim 128, at any shape
    for q_seq_len in (5, 7, 8, 16):
        many_rows = dataclasses.replace(bf16, q_seq_len=q_seq_len)
        assert choose_path(many_rows, "sm_90", lambda: None, shape(batch, kv_len)).path == "hopper"
    wide_head = dataclasses.replace(bf16, q_seq_len=8, head_dim=256)  # 32 rows per CTA: stays generic
    assert choose_path(wide_head, "sm_90", lambda: None, shape(batch, kv_len)) == wide_head


def test_dispatch_keeps_16bit_decode_grids_of_several_ctas_per_sm_generic():
    from xqagen.plan import choose_path

    gpt_oss = KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=64, group=8, page_size=64, features=frozenset({"sinks"}))
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(64, 8192)) == gpt_oss  # 512 CTAs
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(16, 128)).path == "hopper"  # 128 CTAs


@pytest.mark.parametrize("q_seq_len", [1, 4])
def test_dispatch_sends_16bit_full_grids_under_short_windows_to_the_hopper_path(q_seq_len):
    from xqagen.plan import choose_path

    gpt_oss = KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=64, group=8, page_size=64, q_seq_len=q_seq_len,
                         features=frozenset({"sinks", "sliding_window"}))
    on_hopper = choose_path(gpt_oss, "sm_90", lambda: None, shape(64, 128))  # 512 CTAs under a 128-token window
    assert on_hopper.path == "hopper"
    assert plan_launch(on_hopper, shape(64, 128), workspace=LARGE).spec.tile.name == "tma2x1"
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(64, 1024)).path == "hopper"
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(64, 2048)) == gpt_oss  # the window is too long
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(32, 128)) == gpt_oss  # 256 CTAs: one SM holds one
    # 16-bit d128 has no short-KV tile (32 KiB stages): its windows stay generic on full grids
    llama = dataclasses.replace(gpt_oss, head_dim=128)
    assert choose_path(llama, "sm_90", lambda: None, shape(64, 128)) == llama


def test_dispatch_sends_16bit_full_grids_that_load_by_cp_async_to_the_hopper_path():
    from xqagen.plan import choose_path

    gpt_oss = KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=64, group=8, page_size=64, q_seq_len=4,
                         features=frozenset({"sinks"}))
    on_hopper = choose_path(gpt_oss, "sm_90", lambda: None, shape(64, 8192))  # 512 CTAs of 32 rows, 8k tokens
    assert on_hopper.path == "hopper"
    assert plan_launch(on_hopper, shape(64, 8192), workspace=LARGE).spec.tile.name == "cpa2x1"
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(64, 2048)) == gpt_oss  # short ranges keep TMA: generic
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(32, 8192)) == gpt_oss  # one CTA on some SMs: TMA
    assert choose_path(gpt_oss, "sm_90", lambda: None, shape(16, 8192)).path == "hopper"  # one wave, as before


@pytest.mark.parametrize("batch, kv_len, splits", [
    (1, 32768, 16),   # one CTA per SM: 8 heads x 16 splits on 132 SMs
    (8, 32768, 2),
    (64, 8192, 1),    # the batch fills the SMs
    (1, 64 * 2 * 3, 3),  # two tiles per split at least, one per consumer warpgroup
    (1, 1024, 8),
])
def test_hopper_splits_give_each_sm_one_cta(batch, kv_len, splits):
    assert plan_launch(HOPPER_FP8, shape(batch, kv_len), workspace=LARGE).num_splits == splits


@pytest.mark.parametrize("batch, kv_len, tile", [
    (64, 8192, "cpa2x1"),   # 512 CTAs: two per SM at least, on short KV ranges two stages, four CTAs per SM,
    (256, 4096, "cpa2x1"),  # loaded by cp.async beyond 2048 tokens
    (256, 2048, "tma2x1"),
    (33, 8192, "cpa2x1"),   # 264 CTAs: exactly two per SM
    (64, 8193, "cpa4x2"),   # longer ranges: four stages
    (256, 65536, "cpa4x2"),
    (32, 8192, "tma6x2"),   # 256 CTAs: some SMs hold one, which keeps six stages and TMA
    (8, 32768, "tma6x2"),   # split to one CTA per SM
    (1, 32768, "tma6x2"),
])
def test_hopper_tile_by_grid(batch, kv_len, tile):
    plan = plan_launch(HOPPER_FP8, shape(batch, kv_len), workspace=LARGE)
    assert plan.spec.tile.name == tile
    assert plan.spec in path_of(HOPPER_FP8).launch_specs(HOPPER_FP8)  # recipes ship what dispatch picks
    forced = plan_launch(HOPPER_FP8, shape(batch, kv_len), tile_given=True, workspace=LARGE)
    assert forced.spec == HOPPER_FP8  # a tile the caller names stays


@pytest.mark.parametrize("spec, batch, kv_len, tile", [
    # more than 8 fp8 rows keep TMA on full grids: the consumers have no time for the copies
    ("fp8-q4", 64, 8192, "tma2x1"), ("fp8-q4", 64, 8193, "tma4x2"),
    # 16-bit d64 (gpt-oss): 32 rows of speculative decoding by cp.async on full grids
    ("bf16-d64-q4", 64, 8192, "cpa2x1"), ("bf16-d64-q4", 64, 8193, "cpa4x2"), ("bf16-d64-q4", 16, 8192, "tma6x2"),
    # 16-bit d128 (two TMA boxes per token row) by cp.async on one CTA per SM beyond 2048 tokens per split
    ("bf16-d128", 4, 16384, "cpa4x2"), ("bf16-d128", 16, 4096, "cpa4x2"), ("bf16-d128", 1, 32768, "tma4x2"),
    ("bf16-d128", 1, 1024, "tma4x2"),
    ("fp8-d256", 4, 16384, "tma4x2"),  # fp8 rows of two boxes: not measured, TMA
])
def test_hopper_loader_by_rows_and_tokens(spec, batch, kv_len, tile):
    specs = {"fp8-q4": dataclasses.replace(HOPPER_FP8, q_seq_len=4),
             "bf16-d64-q4": dataclasses.replace(HOPPER_FP8, kv_dtype="bf16", head_dim=64, q_seq_len=4, tile=None),
             "bf16-d128": dataclasses.replace(HOPPER_FP8, kv_dtype="bf16", tile=None),
             "fp8-d256": dataclasses.replace(HOPPER_FP8, head_dim=256, tile=None)}
    spec = specs[spec]
    plan = plan_launch(spec, shape(batch, kv_len), workspace=LARGE)
    assert plan.spec.tile.name == tile
    assert plan.spec in path_of(spec).launch_specs(spec)  # recipes ship what dispatch picks


@pytest.mark.parametrize("batch, kv_len, tile", [(64, 8192, "tma6x2"), (64, 8193, "tma4x2"), (8, 8192, "tma6x2")])
def test_hopper_fp8_mma_speculative_decoding_keeps_six_stages_on_short_kv(batch, kv_len, tile):
    spec = dataclasses.replace(HOPPER_FP8, q_seq_len=4, features=frozenset({"fp8_mma"}))
    plan = plan_launch(spec, shape(batch, kv_len), workspace=LARGE)
    assert plan.spec.tile.name == tile
    assert plan.spec in path_of(spec).launch_specs(spec)


@pytest.mark.parametrize("kv_dtype, batch, kv_len, tile, rows_cta", [
    ("bf16", 32, 8192, "tma4x2r", 64),  # 256 CTAs of 64 rows: the register split
    ("bf16", 16, 8192, "tma4x2r", 64),  # 128
    ("bf16", 9, 8192, "tma4x2r", 64),   # 72: half the SMs at least
    ("bf16", 8, 8192, "tma4x2", 32),    # 64 would need splits: two row tiles of 32
    ("bf16", 4, 16384, "tma4x2", 32),
    ("e4m3", 32, 8192, "tma6x2r", 64),  # fp8 converts each KV tile once per CTA: 64 rows at every grid
    ("e4m3", 8, 8192, "tma6x2r", 64),
    ("e4m3", 4, 16384, "tma6x2r", 64),
])
def test_hopper_tile_for_64_rows(kv_dtype, batch, kv_len, tile, rows_cta):
    from xqagen.emitters.hopper import plan_of

    spec = KernelSpec(q_dtype="bf16", kv_dtype=kv_dtype, head_dim=128, group=8, page_size=64, q_seq_len=8,
                      path="hopper")
    plan = plan_launch(spec, shape(batch, kv_len), workspace=LARGE)
    assert (plan.spec.tile.name, plan_of(plan.spec).rows_cta) == (tile, rows_cta)
    assert plan.spec in path_of(spec).launch_specs(spec)  # recipes ship what dispatch picks


def test_hopper_tiles_and_rows():
    from xqagen.emitters.hopper import HopperTile, plan_of
    from xqagen.spec import SpecError

    assert HOPPER_FP8.tile.name == "tma6x2"  # 16 KiB stages: six of them, two consumer warpgroups
    wide = KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=256, group=8, page_size=64, path="hopper")
    assert wide.tile.name == "tma2x2" and plan_of(wide).smem_bytes <= 227 * 1024
    with pytest.raises(SpecError, match="multiple of consumers"):
        HopperTile("odd", stages=3, consumers=2)  # a warpgroup could run two phases ahead of a stage
    with pytest.raises(SpecError, match="register_split needs consumers = 2"):
        HopperTile("alone", stages=4, consumers=1, register_split=True)
    split = KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=128, group=8, page_size=64, q_seq_len=8,
                       path="hopper", tile="tma4x2r")
    assert (plan_of(split).rows_cta, plan_of(split).threads) == (64, 384)  # a producer warpgroup
    # rows -> wgmma N: powers of two from 8 to 32 with two consumer warpgroups, to 64 with one (up to
    # head_dim 128), more rows over several CTAs
    for group, q_seq_len, tile, head_dim, rows_cta, row_tiles in (
            (1, 1, None, 128, 8, 1), (5, 1, None, 128, 8, 1), (8, 3, None, 128, 32, 1), (16, 4, None, 128, 32, 2),
            (16, 4, "tma4x1", 128, 64, 1), (8, 13, "tma2x1", 96, 64, 2), (8, 8, "tma2x1", 256, 32, 2)):
        spec = KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=head_dim, group=group, page_size=16,
                          q_seq_len=q_seq_len, path="hopper", tile=tile)
        assert (plan_of(spec).rows_cta, plan_of(spec).row_tiles) == (rows_cta, row_tiles)


def test_hopper_kernels_ask_for_all_of_the_unified_memory_as_shared_memory():
    # the CTAs per SM that choose_tile counts on (TMA loads do not use L1); the generic path's
    # cp.async loads leave the split to the driver
    assert path_of(HOPPER_FP8).emit(HOPPER_FP8).smem_carveout == 100
    generic = KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=128, group=8, page_size=64)
    assert path_of(generic).emit(generic).smem_carveout is None


def test_hopper_targets_sm90a_only():
    hopper = path_of(HOPPER_FP8)
    assert hopper.arches == ("sm_90a",)
    assert hopper.target_arch("sm_90") == "sm_90a" and hopper.target_arch("sm_80") is None
    assert hopper.target_arch("sm_100") is None
    assert "sm_90a only" in hopper.unsupported_target("sm_90")


def test_tma_rules_for_kv_pools():
    import torch

    from xqagen.tensor_maps import tma_incompatibility

    pool = torch.empty(4, 64, 8, 128, dtype=torch.float8_e4m3fn)
    assert tma_incompatibility(pool, (64 * 8 * 128, 8 * 128, 128)) is None
    assert "token stride" in tma_incompatibility(pool, (64 * 8 * 136, 8 * 136 + 8, 136))
    assert "16-byte aligned" in tma_incompatibility(pool.view(-1)[1:1 + 16].view(1, 1, 1, 16), (16, 16, 16))


def test_workspace_sizing_covers_the_hopper_path():
    import torch

    from xqagen.wrapper import DecodeWrapper

    args = dict(max_batch=2, num_q_heads=64, num_kv_heads=8, head_dim=128, page_size=64, q_dtype=torch.bfloat16,
                kv_dtype=torch.float8_e4m3fn, max_kv_len=32768, sm_count=H100_SMS)
    auto = DecodeWrapper.workspace_bytes(**args)
    generic = DecodeWrapper.workspace_bytes(**args, path="generic")
    hopper = DecodeWrapper.workspace_bytes(**args, path="hopper")
    assert auto == (max(generic[0], hopper[0]), max(generic[1], hopper[1]))
