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


def choose_path(spec: KernelSpec, device_arch: str, kv_incompatibility: Callable[[], str | None]) -> KernelSpec:
    """``spec`` (on the generic path's default tile) moved to the path that runs it fastest on a GPU
    of ``device_arch``: the Hopper path on sm_90 for an fp8 KV cache that TMA can read
    (``kv_incompatibility()`` is None) whose rows (q_seq_len x group) one Hopper CTA holds, the
    generic path otherwise.

    The rule follows the H200 measurements in docs/benchmarks.md ("Path dispatch"): with fp8 KV the
    Hopper path's wgmma and register conversion keep up with HBM where the generic path's mma.sync
    does not (batch 64 x 8k: 0.257 against 0.286 ms; q_seq_len 4 x group 8: 0.334 against 0.376);
    beyond one CTA's rows the Hopper path reads the KV once per row tile (q_seq_len 8 x group 8:
    0.313 against 0.276); 16-bit KV streams at 95-98% of read bandwidth on the generic path against
    91-93% on the Hopper path.
    """
    hopper = PATHS["hopper"]
    if (spec.kv_dtype != "e4m3" or spec.rows > hopper.max_rows_cta or hopper.target_arch(device_arch) is None
            or kv_incompatibility() is not None):
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
