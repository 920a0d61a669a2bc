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
from .spec import KernelSpec, SpecError


# 16-bit KV decodes of at most this many KV bytes per SM run on the Hopper path: its pipeline starts
# sooner than the generic path's, which streams faster once there is enough to read (H200 sweep in
# docs/benchmarks.md: up to 0.5 MiB per SM the Hopper path is 1.1-1.3x faster; at 2 MiB the two are
# within 1-2% either way; beyond, the generic path leads by 3-11%).
HOPPER_16BIT_MAX_KV_BYTES_PER_SM = 1 << 20


def choose_path(spec: KernelSpec, device_arch: str, kv_incompatibility: Callable[[], str | None],
                shape: LaunchShape) -> KernelSpec:
    """``spec`` (on the generic path's default tile) moved to the path that runs a launch of
    ``shape`` fastest on a GPU of ``device_arch``.  On sm_90, with KV pools that TMA can read
    (``kv_incompatibility()`` is None), the Hopper path takes an fp8 KV cache whose rows
    (q_seq_len x group) one Hopper CTA holds, and 16-bit decode (one query token) of at most
    HOPPER_16BIT_MAX_KV_BYTES_PER_SM; the generic path takes everything else.

    The rule follows the H200 measurements in docs/benchmarks.md ("Path dispatch"): with fp8 KV the
    Hopper path's wgmma and register conversion keep up with HBM where the generic path's mma.sync
    does not (batch 64 x 8k: 0.257 against 0.286 ms; q_seq_len 4 x group 8: 0.334 against 0.376);
    beyond one CTA's rows the Hopper path reads the KV once per row tile (q_seq_len 8 x group 8:
    0.313 against 0.276); 16-bit KV streams at 95-99% of read bandwidth on the generic path against
    90-93% on the Hopper path, whose shorter start wins small launches (batch 1 x 1k: 5.7 against
    7.6 us; batch 16 x 1k: 18.9 against 24.4 us).
    """
    hopper = PATHS["hopper"]
    if hopper.target_arch(device_arch) is None:
        return spec
    if spec.kv_dtype == "e4m3":
        takes = spec.rows <= hopper.max_rows_cta
    else:
        kv_bytes = 2 * shape.batch * shape.kv_len * shape.num_kv_heads * spec.head_dim * 2  # K and V, 2 bytes each
        takes = spec.q_seq_len == 1 and kv_bytes <= HOPPER_16BIT_MAX_KV_BYTES_PER_SM * shape.sm_count
    if not takes or kv_incompatibility() is not None:
        return spec
    try:
        return dataclasses.replace(spec, path=hopper.name, tile=None)
    except SpecError:  # a variant the Hopper path does not take runs on the generic path
        return spec


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
