"""The kernel-path interface: everything the launcher, the recipes and the tests may ask of a path.

A kernel path (the generic sm_80+ path today; a warp-specialised Hopper path next) is one module
under ``emitters/`` with one :class:`KernelPath` subclass and its templates.  Its methods answer
every question the code outside the module has, so that nothing outside imports a path's plan or
tile type:

* compile time: which specs it implements and why not (:meth:`~KernelPath.unsupported`), its tile
  type and catalogue, the cubin targets it builds, the source it emits, the SASS its variants
  must show;
* launch time: grid and block shape, dynamic shared memory, the split-KV workspace it needs,
  the split counts it allows and chooses, and the kernel parameters it takes.

The registry (``xqagen.emitters.PATHS``) lists the paths.  Adding a path means adding one module
and its templates and registering its instance there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xqagen.emitters.params import SplitWorkspace
    from xqagen.problem import DecodeProblem
    from xqagen.runtime import Workspace
    from xqagen.spec import KernelSpec


# A forced split count is capped here on every path: past it every split holds a handful of tiles
# and the merge reads more partials than the splits save.
MAX_SPLITS = 128


@dataclass(frozen=True)
class EmittedKernel:
    """Generated source plus the launch geometry the runtime needs."""

    spec: KernelSpec
    source: str
    kernel_name: str
    threads: int
    smem_bytes: int
    arches: tuple[str, ...]  # cubin targets built by default for this variant
    # the share of each SM's unified L1/shared memory, in percent, the kernel asks to have as shared
    # memory (None: the driver's choice, which may leave fewer CTAs resident than fit)
    smem_carveout: int | None = None


@dataclass(frozen=True)
class LaunchShape:
    """What a launch's grid depends on: the batch, the KV heads, the longest KV range a CTA row walks
    (tokens: the page table's capacity, or the sliding window) and the GPU's SM count."""

    batch: int
    num_kv_heads: int
    kv_len: int
    sm_count: int


@dataclass(frozen=True)
class WorkspaceSize:
    """An amount of split-KV scratch (what a launch uses, or what a workspace holds): fp32 partials
    and int32 semaphores."""

    floats: int
    semaphores: int


class KernelPath(ABC):
    """One family of kernels: its own main loop and tiles, sharing the feature pieces."""

    #: registry name, the value of ``KernelSpec.path``
    name: str
    #: the path's tile configuration type (a frozen dataclass with a ``name``)
    tile_type: type
    #: cubin targets ``xqagen build`` compiles for by default
    arches: tuple[str, ...]

    # ---- compile time ----
    @property
    @abstractmethod
    def tiles(self) -> Mapping[str, Any]:
        """The shipped tile catalogue, by name."""

    @abstractmethod
    def default_tile(self, spec: KernelSpec) -> Any:
        """The tile a spec gets when it names none (``spec.tile`` is still None then)."""

    def tile(self, value: Any) -> Any:
        """A tile from a name in the catalogue, a mapping of tile fields, or a tile object."""
        from xqagen.spec import SpecError

        if isinstance(value, self.tile_type):
            return value
        if isinstance(value, str):
            try:
                return self.tiles[value]
            except KeyError:
                raise SpecError(f"unknown tile configuration {value!r} for the {self.name} path; "
                                f"shipped: {', '.join(sorted(self.tiles))}") from None
        if isinstance(value, Mapping):
            return self.tile_type(**value)
        raise SpecError(f"KernelSpec.tile = {value!r} is invalid for the {self.name} path; expected a "
                        f"{self.tile_type.__name__}, a mapping of its fields or a shipped tile name")

    @abstractmethod
    def unsupported(self, spec: KernelSpec) -> str | None:
        """Why this path cannot implement ``spec`` (None: it can).  Called once the spec's own
        fields are valid and its tile resolved."""

    @abstractmethod
    def emit(self, spec: KernelSpec) -> EmittedKernel:
        """The generated translation unit of ``spec``."""

    @abstractmethod
    def unsupported_target(self, arch: str) -> str | None:
        """Why this path cannot build cubins for ``arch`` (``sm_80``, ``sm_90a``, ...); None: it can."""

    @abstractmethod
    def target_arch(self, device_arch: str) -> str | None:
        """The cubin target for a GPU of ``device_arch`` (``sm_90``, ...); None where this path's
        kernels cannot run on it."""

    @abstractmethod
    def sass_features(self, spec: KernelSpec, arch: str) -> Mapping[str, str]:
        """SASS opcodes every cubin of ``spec`` for ``arch`` must contain, each with what its
        absence would mean (the shipped-variant tests check them)."""

    # ---- launch time ----
    @abstractmethod
    def block_threads(self, spec: KernelSpec) -> int:
        """Threads per CTA (a 1-D block)."""

    @abstractmethod
    def smem_bytes(self, spec: KernelSpec) -> int:
        """Dynamic shared memory per CTA."""

    @abstractmethod
    def row_tiles(self, spec: KernelSpec) -> int:
        """CTAs over the query rows of one (request, KV head)."""

    @abstractmethod
    def split_workspace(self, spec: KernelSpec) -> SplitWorkspace:
        """The layout of one output tile's split-KV partials."""

    def grid(self, spec: KernelSpec, batch: int, num_kv_heads: int, num_splits: int) -> tuple[int, int, int]:
        """Grid shape of a launch: (splits, KV heads x row tiles, batch)."""
        return num_splits, num_kv_heads * self.row_tiles(spec), batch

    def workspace_need(self, spec: KernelSpec, batch: int, num_kv_heads: int, num_splits: int) -> WorkspaceSize:
        """Split-KV scratch a launch uses (none with one split)."""
        if num_splits == 1:
            return WorkspaceSize(0, 0)
        output_tiles = batch * num_kv_heads * self.row_tiles(spec)
        return WorkspaceSize(self.split_workspace(spec).floats(output_tiles, num_splits), output_tiles)

    @abstractmethod
    def pack(self, spec: KernelSpec, problem: DecodeProblem, num_splits: int, workspace: Workspace) -> tuple:
        """The kernel's parameters in declaration order, as ctypes objects: the parameter struct,
        then any ``__grid_constant__`` parameters (tensor maps)."""

    def refresh(self, params: tuple) -> None:
        """Bring parameters derived from the struct's pointers (tensor maps) up to date after a
        bound launch rewrote those pointers; nothing for a path whose only parameter is the struct."""

    def max_splits(self, spec: KernelSpec, batch: int, num_kv_heads: int, workspace: WorkspaceSize | None) -> int:
        """The most KV splits a launch may use with a workspace of this capacity (None: no
        workspace, so 1), at most MAX_SPLITS."""
        if workspace is None:
            return 1
        output_tiles = batch * num_kv_heads * self.row_tiles(spec)
        if output_tiles > workspace.semaphores:
            return 1
        per_split = self.split_workspace(spec).floats(output_tiles, 1)
        return max(1, min(MAX_SPLITS, workspace.floats // per_split))

    @abstractmethod
    def launch_specs(self, spec: KernelSpec) -> list[KernelSpec]:
        """Every variant :meth:`choose_tile` may launch for ``spec`` on its default tile (recipes
        ship them all), ``spec`` first."""

    @abstractmethod
    def choose_tile(self, spec: KernelSpec, shape: LaunchShape) -> KernelSpec:
        """The variant (``spec`` on another tile, or ``spec``) a launch of this shape runs, for
        ``spec`` on its default tile."""

    @abstractmethod
    def auto_splits(self, spec: KernelSpec, shape: LaunchShape) -> int:
        """The split count a launch of this shape runs, before any workspace limit."""
