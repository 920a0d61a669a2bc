"""Launch-shape heuristics: which tile a decode runs and into how many KV splits it is cut.

Pure functions of the launch shape (batch, KV heads, longest KV range, SM count), shared by the
runtime, which applies them per call, and by recipes, which ship every tile they can choose for a
variant (:func:`dispatch_specs`).  Measurements behind the constants: docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import math

from .emitters.generic import GenericPlan
from .spec import KernelSpec, SpecError, get_tile

# A memory-bound decode saturates HBM with about TARGET_WARPS_PER_SM warps per SM (2 CTAs of the
# 4-warp tiles, 1 of the 8-warp split tile).  The last CTA of each output tile merges every split
# alone, so more than MAX_AUTO_SPLITS cost more in that merge than they gain (H100, fp8 d128: batch
# 8 x 32k best at 4 splits, batch 1 x 32k at 16).  A split keeps at least MIN_TILES_PER_SPLIT tiles.
TARGET_WARPS_PER_SM = 8
MAX_AUTO_SPLITS = 16
MIN_TILES_PER_SPLIT = 4
# A forced split count is capped here: past it every split holds a handful of tiles and the merge
# reads more partials than the splits save.
MAX_SPLITS = 128
# Grids too small to fill the GPU even at MAX_AUTO_SPLITS splits of the default tile (batch 1-2 of
# 8 KV heads on 132 SMs) run this tile instead: 8 warps over 128-token stages, one CTA per SM, so
# that the GPU holds as many bytes in flight from a sixteenth of the CTAs (H100, fp8 d128 batch 1:
# 14.3 / 32.2 / 99.4 us at 8k / 32k / 128k tokens against 15.3 / 34.8 / 107.2 us).
SPLIT_TILE = "split"


def kv_range(page_capacity: int, sliding_window: int) -> int:
    """The longest KV range one CTA row walks: the page table's capacity in tokens, or the
    window's last ``sliding_window`` positions (0: no window)."""
    return min(page_capacity, sliding_window) if sliding_window else page_capacity


def split_variant(spec: KernelSpec) -> KernelSpec | None:
    """``spec`` on the split tile, or None where that tile does not fit the variant (a 16-bit
    head_dim 256 stage exceeds shared memory) or the variant is not on the generic path."""
    if spec.path != "generic" or spec.tile.name == SPLIT_TILE:
        return None
    candidate = dataclasses.replace(spec, tile=get_tile(SPLIT_TILE))
    try:
        GenericPlan.of(candidate)
    except SpecError:
        return None
    return candidate


def dispatch_specs(spec: KernelSpec) -> list[KernelSpec]:
    """Every variant :func:`choose_spec` can launch for ``spec`` (its default-tile form)."""
    split = split_variant(spec)
    return [spec] if split is None else [spec, split]


def auto_splits(spec: KernelSpec, batch: int, num_kv_heads: int, kv_len: int, sm_count: int) -> int:
    """Splits that bring the grid to about TARGET_WARPS_PER_SM warps per SM; 1 when the batch
    already fills the GPU.  ``kv_len``: the longest KV range a CTA row walks (tokens)."""
    base = batch * num_kv_heads * GenericPlan.of(spec).row_tiles
    target = TARGET_WARPS_PER_SM * sm_count / spec.tile.warps
    tiles = max(1, math.ceil(kv_len / spec.tile.kv_tile))
    limit = min(MAX_AUTO_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT))
    return max(1, min(limit, round(target / base)))


def choose_spec(spec: KernelSpec, batch: int, num_kv_heads: int, kv_len: int, sm_count: int) -> KernelSpec:
    """The variant a launch of this shape runs, given ``spec`` on its default tile: the split tile
    for grids that MAX_AUTO_SPLITS splits cannot fill and whose KV range is long enough to give
    every one of those splits MIN_TILES_PER_SPLIT of its tiles; ``spec`` otherwise."""
    split = split_variant(spec)
    if split is None:
        return spec
    base_warps = batch * num_kv_heads * GenericPlan.of(spec).row_tiles * spec.tile.warps
    under_filled = base_warps * MAX_AUTO_SPLITS < TARGET_WARPS_PER_SM * sm_count
    long_enough = kv_len >= MAX_AUTO_SPLITS * MIN_TILES_PER_SPLIT * split.tile.kv_tile
    return split if under_filled and long_enough else spec
