"""The second step of a decode call: which kernel runs it, on which tile, in how many KV splits.

:func:`choose_path` picks the kernel path of a call that names none, and :func:`plan_launch` the
tile and split count; the API, the benchmark and the GPU tests call them.  Each choice is the path's (``xqagen.emitters``): a tile by
launch shape (:meth:`~xqagen.emitters.KernelPath.choose_tile`), a split count
(:meth:`~xqagen.emitters.KernelPath.auto_splits`), capped by what the workspace holds.  An explicit
``tile`` or ``num_splits`` overrides the path's choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from .emitters import PATHS, KernelPath, LaunchShape, WorkspaceSize, path_of
from .emitters.hopper import FULL_GRID_CTAS_PER_SM
from .spec import KernelSpec, SpecError


# 16-bit KV decodes of at most this many KV bytes per SM run on the Hopper path: its pipeline starts
# sooner than the generic path's, which streams faster once there is enough to read (H200 sweep in
# docs/benchmarks.md: up to 0.5 MiB per SM the Hopper path is 1.1-1.3x faster; at 2 MiB the two are
# within 1-2% either way; beyond, the generic path leads by 3-11%).  Twice that where the batch's
# CTAs fill the SMs without KV splits, whose merge the Hopper path then skips (batch 16 x 4k, 2 MiB
# per SM: 0.0663 ms against 0.0694-0.0701 on the generic path's two splits).
HOPPER_16BIT_MAX_KV_BYTES_PER_SM = 1 << 20
HOPPER_16BIT_UNSPLIT_MAX_KV_BYTES_PER_SM = 2 << 20
# 16-bit KV under a sliding window of at most this many tokens runs on the Hopper path once its CTAs
# fill the SMs twice: its two-stage tile keeps four short CTAs per SM (H200, gpt-oss d64 with sinks,
# batch 64 and 256: windows of 128-1024 tokens 1-17% faster than the generic path, 2048 within 2%).
HOPPER_16BIT_MAX_WINDOW = 1024


def choose_path(spec: KernelSpec, device_arch: str, kv_incompatibility: Callable[[], str | None],
                shape: LaunchShape) -> KernelSpec:
    """``spec`` (on the generic path's default tile) moved to the path that runs a launch of
    ``shape`` fastest on a GPU of ``device_arch``.  On sm_90, with KV pools that TMA can read
    (``kv_incompatibility()`` is None), the Hopper path takes

    - fp8 KV whose query rows (q_seq_len x group) one CTA holds: 32 on two consumer warpgroups,
      64 with the register split up to head_dim 128; more rows where that split tiles them, or
      where its CTAs do not fill the SMs without KV splits;
    - 16-bit KV with more than 32 query rows, up to head_dim 128 (the register split);
    - 16-bit speculative decoding with at most 32 rows, without a sliding window, whose CTAs fit on
      the SMs at once or whose tile loads K and V by cp.async (``HopperPath.choose_tile``);
    - 16-bit decode (one query token) whose CTAs fit on the SMs at once, of at most
      HOPPER_16BIT_MAX_KV_BYTES_PER_SM, or HOPPER_16BIT_UNSPLIT_MAX_KV_BYTES_PER_SM where the
      Hopper path needs no KV split, or whose tile loads by cp.async;
    - 16-bit KV, up to 32 rows, under a sliding window of at most HOPPER_16BIT_MAX_WINDOW tokens
      whose CTAs fill the SMs FULL_GRID_CTAS_PER_SM times (the Hopper path's short-KV tile);

    and the generic path everything else.  The rule follows the H200 measurements in
    docs/benchmarks.md ("Path dispatch"): with fp8 KV the Hopper path's wgmma and register
    conversion keep up with HBM where the generic path's mma.sync does not (batch 64 x 8k: 0.257
    against 0.286 ms; q_seq_len 4 x group 8: 0.334 against 0.376); with 64 rows the register split
    leads both paths at every batch measured (q_seq_len 8 x group 8, batch 32 x 8k, fp8: 0.222
    against 0.275; bf16: 0.274 against 0.334; 40 and 128 rows alike); 32-row 16-bit speculative
    decoding (gpt-oss, d64 with sinks, q_seq_len 4) is faster on the Hopper path up to one wave of
    CTAs (batch 16 x 8k: 68.7 against 73.9 us) and slower beyond (batch 64: 267.0 against 252.4);
    16-bit decode streams at 95-99% of read bandwidth on the generic path against 90-93% on the
    Hopper path's TMA tiles and 96-99% on its cp.async ones (bf16 batch 16 x 64k: 0.980 against
    0.997-1.003 ms; gpt-oss q_seq_len 4, batch 64 x 8k: 0.254-0.259 against 0.264-0.268), whose
    shorter start wins small launches (batch 1 x 1k: 5.7 against 7.6 us; batch
    16 x 1k: 18.9 against 24.4 us) and, with four of its two-stage CTAs per SM, full grids under a
    short window (128 tokens, batch 64: 7.9 against 8.9 us; q_seq_len 4: 14.2 against 15.1 us).
    """
    hopper = PATHS["hopper"]
    if hopper.target_arch(device_arch) is None:
        return spec
    try:
        candidate = dataclasses.replace(spec, path=hopper.name, tile=None)
    except SpecError:  # a variant the Hopper path does not take runs on the generic path
        return spec
    row_tiles = hopper.row_tiles(candidate)
    ctas = shape.batch * shape.num_kv_heads * row_tiles
    one_wave = ctas <= shape.sm_count
    short_window = ("sliding_window" in spec.features and shape.kv_len <= HOPPER_16BIT_MAX_WINDOW
                    and ctas >= FULL_GRID_CTAS_PER_SM * shape.sm_count and hopper.short_kv_variant(candidate) is not None)
    split_rows = row_tiles > 1 and hopper.wide_rows_variant(candidate) is not None  # 64 rows per CTA

    def copies() -> bool:  # the Hopper tile of this shape streams K and V by cp.async (16-bit rules only)
        return hopper.choose_tile(candidate, shape).tile.loader == "cp_async"

    if spec.kv_dtype == "e4m3":
        takes = row_tiles == 1 or split_rows or one_wave
    elif row_tiles > 1:
        takes = split_rows
    elif short_window:
        takes = True
    elif spec.q_seq_len > 1:
        takes = (one_wave or copies()) and "sliding_window" not in spec.features
    else:
        # K and V, 2 bytes each
        kv_bytes_per_sm = 2 * shape.batch * shape.kv_len * shape.num_kv_heads * spec.head_dim * 2 / shape.sm_count
        unsplit = hopper.auto_splits(candidate, shape) == 1
        takes = one_wave and (copies() or kv_bytes_per_sm <= (HOPPER_16BIT_UNSPLIT_MAX_KV_BYTES_PER_SM if unsplit
                                                            else HOPPER_16BIT_MAX_KV_BYTES_PER_SM))
    return candidate if takes and kv_incompatibility() is None else spec


@dataclass(frozen=True)
class LaunchPlan:
    spec: KernelSpec  # the variant that runs
    num_splits: int

    @property
    def path(self) -> KernelPath:
        return path_of(self.spec)


def plan_launch(spec: KernelSpec, shape: LaunchShape, *, tile_given: bool = False, num_splits: int | None = None,
                workspace: WorkspaceSize | None = None) -> LaunchPlan:
    """The plan of a launch of ``shape`` for ``spec``.

    ``tile_given``: ``spec``'s tile was named by the caller, so dispatch keeps it; otherwise ``spec``
    is on its path's default tile and the path may choose another for this shape.  ``num_splits``:
    None lets the path choose; a forced count must fit the workspace (``ValueError`` naming
    ``num_splits`` otherwise).  ``workspace``: what the split-KV workspace holds (None: none, so
    one split).
    """
    path = path_of(spec)
    if not tile_given:
        spec = path.choose_tile(spec, shape)
    cap = path.max_splits(spec, shape.batch, shape.num_kv_heads, workspace)
    if num_splits is None:
        return LaunchPlan(spec, min(path.auto_splits(spec, shape), cap))
    if num_splits > cap:
        raise ValueError(f"num_splits: expected at most {cap} for this workspace and grid, got {num_splits}")
    return LaunchPlan(spec, num_splits)
