"""The second step of a decode call: which kernel runs it, on which tile, in how many KV splits.

:func:`plan_launch` is the one place where path, tile and split count are chosen; the API, the
benchmark and the GPU tests call it.  Each choice is the path's (``xqagen.emitters``): a tile by
launch shape (:meth:`~xqagen.emitters.KernelPath.choose_tile`), a split count
(:meth:`~xqagen.emitters.KernelPath.auto_splits`), capped by what the workspace holds.  An explicit
``tile`` or ``num_splits`` overrides the path's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .emitters import KernelPath, LaunchShape, WorkspaceSize, path_of
from .spec import KernelSpec


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
