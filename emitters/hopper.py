"""The Hopper path: a warp-specialised sm_90a paged-KV decode kernel (TMA + mbarrier pipeline + wgmma).

One producer warp loads K and V tiles with TMA (the page id is a tensor-map coordinate) into a
multi-stage shared-memory pipeline (CUTLASS's ``PipelineTmaAsync``); one consumer warpgroup runs
wgmma and the online softmax.  KV tokens sit on the wgmma's M side (swap-AB): S^T = K Q^T and
O^T = V^T P^T, with the query rows (8 to 64) as N, so a group of 8 pays for 8 rows rather than 64.
fp8 KV is converted exactly to fp16 in registers and multiplied with 16-bit wgmma (the register-A
form); Q and P are never quantised to 8 bits.

:class:`HopperPlan` holds every derived compile-time decision; :class:`HopperPath` answers the
launcher's questions from it and packs the K/V tensor maps (:mod:`xqagen.tensor_maps`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from xqagen.spec import KernelSpec, SpecError, check_int_range

from .params import KernelParams, SplitWorkspace
from .path import EmittedKernel, KernelPath, LaunchShape
from .render import piece_context, render

TARGET = "sm_90a"  # wgmma and setmaxnreg exist only on the sm_90a target
MAX_SMEM_PER_CTA = 227 * 1024
ELEM_BYTES = {"fp16": 2, "bf16": 2, "e4m3": 1}

KV_TILE = 64  # KV tokens per stage: the M of one wgmma
WARPGROUP_THREADS = 128
PRODUCER_THREADS = 32  # one warp issues every TMA
# Query rows per CTA: the wgmma N, a power of two from 8; more rows tile over CTAs.  64 rows take up
# to 241 registers per consumer thread (d128 with sinks, window and ragged q), which a CTA of one
# consumer warpgroup has; with two and a producer warp, ptxas rounds the 288-thread CTA up to whole
# warpgroups and allows 168 (32 rows fit, 64 spill), and d256 spills even with 255.  A register
# split gives two consumer warpgroups 64 rows: the producer is a whole warpgroup that keeps
# PRODUCER_REGISTERS per thread and gives the rest to them (setmaxnreg; 384 threads x 168 registers
# = 2 x 128 x CONSUMER_REGISTERS + 128 x PRODUCER_REGISTERS).
MAX_ROWS_CTA = 64
MAX_ROWS_CTA_SHARED_REGISTERS = 32  # two consumer warpgroups without a register split, or head_dim above 128
PRODUCER_REGISTERS = 24
CONSUMER_REGISTERS = 240
LOADERS = ("tma", "cp_async")
# TMA writes K and V to shared memory, past L1: all of the unified memory goes to shared memory, so
# that as many CTAs are resident as their registers and shared memory allow.  Left to the driver,
# the two-stage tile (36 KiB, four CTAs per SM) ran fp8 batch 256 x 2k in 0.2788-0.2880 ms after
# other kernels in the bench, against 0.2584-0.2598 alone (H200; docs/benchmarks.md).
SMEM_CARVEOUT = 100
# TMA box and swizzle: a shared-memory row of K/V is cut into chunks of at most 128 bytes (the
# widest swizzle), each chunk one box of a tile.
MAX_CHUNK_BYTES = 128

# ---- launch-shape heuristics (H200 measurements in docs/benchmarks.md) ----
# Splits fill the GPU once with one CTA per SM: two resident CTAs of two consumer warpgroups each
# measured slower than one with twice the tiles (H200, fp8 d128: batch 8 x 32k 0.1320 ms at 2
# splits against 0.1493 at 4; batch 1 x 32k 0.0226 ms at 16 against 0.0266 at 32).  A split keeps
# at least MIN_TILES_PER_SPLIT tiles, one per consumer warpgroup (batch 1 x 1k: 8 splits of 2 tiles
# 6.0 us, 4 of 4 7.5 us, 16 of 1 6.5 us); the last CTA of each output tile merges every split alone.
MAX_AUTO_SPLITS = 32
MIN_TILES_PER_SPLIT = 2
# Grids of at least this many CTAs per SM (every SM's two resident six-stage CTAs busy without
# splits) run the six-stage default on four stages: fp8 d128 batch 64 x 8k 0.2608-0.2619 ms against
# 0.2634-0.2670, batch 256 x 2k 0.2737 against 0.2825; a CTA alone on its SM keeps six (batch 8 x
# 32k 0.1320 against 0.1398).
FULL_GRID_CTAS_PER_SM = 2
# Full grids whose CTAs walk at most SHORT_KV_MAX_TOKENS run the six-stage default on two stages and
# one consumer warpgroup instead: 160 threads of 95 registers and 36 KiB (fp8 d128), so four CTAs
# per SM start and finish under each other's loads.  H200, fp8 d128 against four stages: batch 256
# x 2k 0.2599-0.2602 ms against 0.2624-0.2641, batch 64 x 1k 0.0362 against 0.0382, batch 64 x 8k
# 0.2562 both; from 16k tokens four stages lead (batch 256 x 16k 2.0939 against 2.1322, batch 64 x
# 16k 0.5127 against 0.5376).
SHORT_KV_MAX_TOKENS = 8192
# Those full grids load K and V with cp.async rather than TMA up to CP_ASYNC_MAX_ROWS query rows per
# CTA (by KV element bytes): one box of a page's head per TMA capped the read at 86-92% where 32
# producer lanes' copies reach 95% (H200, fp8 d128 group 8: batch 256 x 64k 7.85 ms against 8.61,
# batch 64 x 8k 0.2437-0.2456 against 0.2563, page 16 batch 128 x 4k 0.2459-0.2466 against 0.2578;
# bf16 d64 q_seq_len 4, 32 rows: 0.2478 against 0.2522-0.2707).  With more rows per KV byte the
# consumers have no time to spare for the producer's copies on their SM sub-partitions: fp8
# q_seq_len 4 x group 8 ran 0.3208-0.3225 ms against 0.2843-0.3001 with TMA.
CP_ASYNC_MAX_ROWS = {1: 8, 2: 32}
# ... and beyond CP_ASYNC_MIN_TOKENS per CTA: on shorter ranges TMA's first stage arrives sooner, and it
# was as fast or faster (fp8 batch 256 x 1k 0.1326-0.1333 ms against 0.1347-0.1349, x 2k 0.2572-0.2583
# against 0.2565-0.2589; gpt-oss q_seq_len 4 under a 128-token window 13.7 us against 14.4; bf16 d128
# batch 1 x 1k 5.9 us against 6.7-6.8, batch 4 x 4k in four splits 21.5-21.6 against 22.3-22.4).
CP_ASYNC_MIN_TOKENS = 2048


@dataclass(frozen=True)
class HopperTile:
    """How a CTA of the Hopper path walks the KV sequence.

    stages: depth of the TMA pipeline, in 64-token K+V tiles.
    consumers: consumer warpgroups; each takes every consumers-th tile with its own softmax state,
      merged at the end, so that one CTA has that many tiles in the tensor cores at once.
    register_split: the producer is a warpgroup that gives most of its registers to two consumer
      warpgroups (setmaxnreg), so that each holds 64 query rows; without it, one warp.
    loader: how the producer warp fills a stage: "tma" (one TMA box per page and head-dim chunk)
      or "cp_async" (16-byte cp.async copies, an address per unit, into the same swizzled layout).
    """

    name: str
    stages: int = 4
    consumers: int = 1
    register_split: bool = False
    loader: str = "tma"

    def __post_init__(self) -> None:
        owner = f"HopperTile({self.name!r})"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SpecError(f"HopperTile.name = {self.name!r} is invalid; expected an identifier")
        check_int_range(owner, "stages", self.stages, 2, 8)
        check_int_range(owner, "consumers", self.consumers, 1, 2)
        if not isinstance(self.register_split, bool):
            raise SpecError(f"{owner}.register_split = {self.register_split!r} is invalid; expected true or false")
        if self.loader not in LOADERS:
            raise SpecError(f"{owner}.loader = {self.loader!r} is invalid; expected one of {', '.join(LOADERS)}")
        if self.register_split and self.loader != "tma":
            # its producer keeps PRODUCER_REGISTERS; a cp.async producer computes an address per copy
            # (with 56 of them, the consumers' 224 spilled at 64 rows, and fp8 q_seq_len 8 x group 8
            # ran at 48% of the read against 62% with TMA; docs/benchmarks.md)
            raise SpecError(f"{owner}.register_split needs loader = 'tma', got {self.loader!r}")
        if self.register_split and self.consumers != 2:
            raise SpecError(f"{owner}.register_split needs consumers = 2 (one consumer warpgroup has 255 registers "
                            f"without it), got {self.consumers}")
        if self.stages % self.consumers:
            # A warpgroup waits on its next stage's barrier by phase parity: with each warpgroup on its
            # own stages it can never be two phases ahead of one of them.
            raise SpecError(f"{owner}.stages = {self.stages} must be a multiple of consumers = {self.consumers}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The shipped catalogue: stages x consumer warpgroups, "r" for a register split; "tma" or "cpa" for
# the loader (HopperPath.default_tile and choose_tile choose).
TILES: Mapping[str, HopperTile] = {tile.name: tile for tile in (
    *(HopperTile(f"tma{stages}x{consumers}", stages=stages, consumers=consumers)
      for stages, consumers in ((2, 1), (3, 1), (4, 1), (6, 1), (2, 2), (4, 2), (6, 2))),
    *(HopperTile(f"tma{stages}x2r", stages=stages, consumers=2, register_split=True) for stages in (2, 4, 6)),
    *(HopperTile(f"cpa{stages}x{consumers}", stages=stages, consumers=consumers, loader="cp_async")
      for stages, consumers in ((2, 1), (4, 2), (6, 2))))}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class HopperPlan:
    mma_dtype: str
    rows_cta: int  # N of the wgmma: query rows per CTA, a multiple of 8
    row_tiles: int
    head_dim_pad: int  # head_dim rounded up to the 64-row M blocks of O^T (TMA zero-fills the rest)
    chunk_bytes: int  # bytes of one swizzled K/V row chunk (one TMA box wide): 64 or 128
    box_tokens: int  # tokens per TMA box: a page, or a whole tile of a larger page
    p_atom: str  # GMMA shared-memory atom of P (MN-major; K-major for 8-bit wgmmas)
    q_atom: str  # GMMA shared-memory atom of Q (K-major)
    threads: int
    smem_bytes: int
    stage_bytes: int  # K + V bytes one stage receives (the pipeline's transaction count)
    workspace: SplitWorkspace

    @classmethod
    def of(cls, spec: KernelSpec) -> "HopperPlan":
        kv_bytes = ELEM_BYTES[spec.kv_dtype]
        fp8_mma = "fp8_mma" in spec.features
        if fp8_mma and spec.kv_dtype != "e4m3":
            raise SpecError(f"the fp8_mma feature needs kv_dtype = 'e4m3', got {spec.kv_dtype!r}")
        mma_dtype = "e4m3" if fp8_mma else "fp16" if spec.kv_dtype == "e4m3" else spec.q_dtype
        mma_bytes = ELEM_BYTES[mma_dtype]
        head_dim_pad = _round_up(spec.head_dim, 64)
        own_registers = spec.tile.consumers == 1 or spec.tile.register_split
        max_rows = MAX_ROWS_CTA if own_registers and head_dim_pad <= 128 else MAX_ROWS_CTA_SHARED_REGISTERS
        rows_cta = min(max_rows, max(8, 1 << (spec.rows - 1).bit_length()))
        row_bytes = head_dim_pad * kv_bytes
        chunk_bytes = MAX_CHUNK_BYTES if row_bytes % MAX_CHUNK_BYTES == 0 else 64
        if fp8_mma:  # P K-major: a row's 64 tokens in 64 bytes
            p_atom = "Layout_K_SW64_Atom"
        else:  # P's rows of 16-bit values, as wide as the swizzle allows
            p_atom = {64: "Layout_MN_SW128_Atom", 32: "Layout_MN_SW64_Atom", 16: "Layout_MN_SW32_Atom",
                      8: "Layout_MN_INTER_Atom"}[rows_cta]
        q_atom = "Layout_K_SW128_Atom" if head_dim_pad * mma_bytes % 128 == 0 else "Layout_K_SW64_Atom"
        stage_bytes = 2 * KV_TILE * head_dim_pad * kv_bytes
        if spec.tile.loader == "cp_async" and 32 % (row_bytes // 16):
            raise SpecError(f"tile {spec.tile.name!r} copies a K/V row as 16-byte units on whole lanes of a warp; "
                            f"{row_bytes} bytes (head_dim {spec.head_dim} padded to {head_dim_pad}) are "
                            f"{row_bytes // 16} units, which do not divide 32: use a TMA tile")
        pipe = spec.tile.stages * stage_bytes
        consumers = spec.tile.consumers
        # after the pipeline, in its memory: fp32 output rows (padded) and row sums per consumer warp
        staging = consumers * rows_cta * (head_dim_pad + 4) * 4 + consumers * 4 * rows_cta * 4
        q_bytes = rows_cta * head_dim_pad * mma_bytes
        p_bytes = consumers * rows_cta * KV_TILE * mma_bytes
        small = consumers * 4 * rows_cta * 4 + 2 * spec.tile.stages * 8 + 16  # row maxima per warp, mbarriers, flag
        smem = _round_up(max(pipe, staging), 1024) + _round_up(q_bytes, 1024) + p_bytes + small
        smem = _round_up(smem, 1024)  # the storage's 1024-byte alignment (128-byte swizzle atoms) pads its size
        if smem > MAX_SMEM_PER_CTA:
            raise SpecError(f"tile {spec.tile.name!r} needs {smem} bytes of shared memory for head_dim {spec.head_dim} "
                            f"({spec.kv_dtype} KV); the limit is {MAX_SMEM_PER_CTA}: use fewer stages")
        threads = consumers * WARPGROUP_THREADS + (WARPGROUP_THREADS if spec.tile.register_split else PRODUCER_THREADS)
        return cls(mma_dtype=mma_dtype, rows_cta=rows_cta, row_tiles=-(-spec.rows // rows_cta),
                   head_dim_pad=head_dim_pad, chunk_bytes=chunk_bytes,
                   box_tokens=min(spec.page_size, KV_TILE), p_atom=p_atom, q_atom=q_atom,
                   threads=threads, smem_bytes=smem, stage_bytes=stage_bytes,
                   workspace=SplitWorkspace(rows=rows_cta, head_dim=spec.head_dim))


@functools.lru_cache(maxsize=None)
def plan_of(spec: KernelSpec) -> HopperPlan:
    return HopperPlan.of(spec)


class HopperPath(KernelPath):
    name = "hopper"
    tile_type = HopperTile
    arches = (TARGET,)

    @property
    def tiles(self) -> Mapping[str, HopperTile]:
        return TILES

    def default_tile(self, spec: KernelSpec) -> HopperTile:
        """Two consumer warpgroups, and as many stages as keep the pipeline near 96-128 KiB: six
        16 KiB stages (fp8 d128, 16-bit d64), four of 32 KiB, two of larger ones (H200 sweep in
        docs/benchmarks.md: fp8 b64 x 8k 0.2632 ms with six stages against 0.3053 with one
        consumer and two stages)."""
        stage_bytes = 2 * KV_TILE * _round_up(spec.head_dim, 64) * ELEM_BYTES[spec.kv_dtype]
        if stage_bytes <= 16 * 1024:
            return TILES["tma6x2"]
        return TILES["tma4x2" if stage_bytes <= 32 * 1024 else "tma2x2"]

    def unsupported(self, spec: KernelSpec) -> str | None:
        try:
            plan_of(spec)
        except SpecError as err:
            return str(err)
        return None

    def emit(self, spec: KernelSpec) -> EmittedKernel:
        plan = plan_of(spec)
        source = render("hopper_decode.cu.j2", tile=spec.tile, plan=plan, kernel_name=spec.name, kv_tile=KV_TILE,
                        mainloop="swap_ab",
                        producer_registers=PRODUCER_REGISTERS, consumer_registers=CONSUMER_REGISTERS,
                        **piece_context(spec, mma_dtype=plan.mma_dtype, workspace=plan.workspace))
        return EmittedKernel(spec=spec, source=source, kernel_name=spec.name, threads=plan.threads,
                             smem_bytes=plan.smem_bytes, arches=self.arches, smem_carveout=SMEM_CARVEOUT)

    def unsupported_target(self, arch: str) -> str | None:
        if arch != TARGET:
            return f"the hopper path builds for {TARGET} only (wgmma and TMA), not {arch}"
        return None

    def target_arch(self, device_arch: str) -> str | None:
        return TARGET if device_arch in ("sm_90", TARGET) else None

    def sass_features(self, spec: KernelSpec, arch: str) -> Mapping[str, str]:
        wgmma = ("QGMMA", "no 8-bit wgmma in the fp8 MMA mode") if "fp8_mma" in spec.features else ("HGMMA", "no wgmma")
        loads = (("LDGSTS", "K/V are not loaded with cp.async") if spec.tile.loader == "cp_async"
                 else ("UTMALDG", "K/V are not loaded with TMA"))
        features = {wgmma[0]: wgmma[1], loads[0]: loads[1],
                    "SYNCS": "no mbarrier synchronisation (the TMA pipeline)"}
        if spec.tile.register_split:
            features["USETMAXREG"] = "no register reallocation (setmaxnreg) in a register-split tile"
        return features

    # ---- launch time ----
    def block_threads(self, spec: KernelSpec) -> int:
        return plan_of(spec).threads

    def smem_bytes(self, spec: KernelSpec) -> int:
        return plan_of(spec).smem_bytes

    def row_tiles(self, spec: KernelSpec) -> int:
        return plan_of(spec).row_tiles

    def split_workspace(self, spec: KernelSpec) -> SplitWorkspace:
        return plan_of(spec).workspace

    def pack(self, spec, problem, num_splits, workspace) -> tuple:
        from xqagen.tensor_maps import kv_tensor_maps

        params = KernelParams(**problem.params(), workspace=workspace.scratch.data_ptr(),
                              semaphores=workspace.semaphores.data_ptr(), faults=workspace.faults_ptr,
                              num_splits=num_splits)
        plan = plan_of(spec)
        return (params, *kv_tensor_maps(problem, chunk_elems=plan.chunk_bytes // ELEM_BYTES[spec.kv_dtype],
                                        box_tokens=plan.box_tokens))

    def refresh(self, params: tuple) -> None:
        struct, k_map, v_map = params
        k_map.retarget(struct.k)
        v_map.retarget(struct.v)

    @staticmethod
    def _on_tile(spec: KernelSpec, tile: HopperTile) -> KernelSpec | None:
        """``spec`` on ``tile``, or None where that variant does not exist."""
        try:
            return dataclasses.replace(spec, tile=tile)
        except SpecError:  # e.g. cp.async copies of a row whose 16-byte units do not divide a warp
            return None

    def _instead_of_six_stages(self, spec: KernelSpec, tile: str) -> KernelSpec | None:
        """``spec`` on ``tile`` where it is on the six-stage default (and that variant exists), else None."""
        return self._on_tile(spec, TILES[tile]) if spec.tile == TILES["tma6x2"] else None

    @staticmethod
    def _loader(spec: KernelSpec, tokens: int) -> str:
        """The tile prefix of the loader for ``spec``'s CTAs walking ``tokens`` each: "cpa"
        (cp.async) up to CP_ASYNC_MAX_ROWS and beyond CP_ASYNC_MIN_TOKENS, else "tma"."""
        copies = spec.rows <= CP_ASYNC_MAX_ROWS[ELEM_BYTES[spec.kv_dtype]] and tokens > CP_ASYNC_MIN_TOKENS
        return "cpa" if copies else "tma"

    def _full_grid_variant(self, spec: KernelSpec) -> KernelSpec | None:
        """``spec`` on the four-stage tile where it is on the six-stage one, else None: beyond
        SHORT_KV_MAX_TOKENS, so by cp.async up to CP_ASYNC_MAX_ROWS."""
        return self._instead_of_six_stages(spec, f"{self._loader(spec, SHORT_KV_MAX_TOKENS + 1)}4x2")

    def copying_variant(self, spec: KernelSpec) -> KernelSpec | None:
        """``spec`` on its tile's cp.async twin where a 16-bit K/V row spans more than one TMA box
        (d128) and rows fit CP_ASYNC_MAX_ROWS, else None: with one CTA per SM such rows streamed at
        88-92% of the read by TMA and 96-99% by cp.async (bf16 d128, batch 4 x 64k: 0.2605 ms
        against 0.2462-0.2481; batch 16 x 64k 0.9789-0.9799 against the generic path's
        0.9973-1.0034), where one box per row streams at the read's pace by TMA (fp8 d128 batch
        16 x 64k: 0.5057-0.5066 against 0.5204-0.5786).  fp8 rows of two boxes (d256) are not
        measured, so they keep TMA."""
        plan = plan_of(spec)
        twin = TILES.get("cpa" + spec.tile.name.removeprefix("tma"))
        wide_rows = plan.head_dim_pad * ELEM_BYTES[spec.kv_dtype] > plan.chunk_bytes
        fits = ELEM_BYTES[spec.kv_dtype] == 2 and spec.rows <= CP_ASYNC_MAX_ROWS[2]
        return self._on_tile(spec, twin) if twin and spec.tile.loader == "tma" and wide_rows and fits else None

    def short_kv_variant(self, spec: KernelSpec, loader: str = "tma") -> KernelSpec | None:
        """``spec`` on the short-KV tile (two stages, one consumer warpgroup: four CTAs per SM) of
        ``loader`` where it is on the six-stage one, else None; never for speculative decoding in
        the fp8 MMA mode, whose six stages measured faster (q_seq_len 4 x group 8, batch 64 x 8k:
        ``tma6x2`` 0.2704 ms, ``tma4x2`` 0.2769, ``tma2x1`` 0.3036; docs/benchmarks.md)."""
        if "fp8_mma" in spec.features and spec.has_mask:
            return None
        return self._instead_of_six_stages(spec, f"{loader}2x1")

    def wide_rows_variant(self, spec: KernelSpec) -> KernelSpec | None:
        """``spec`` with a register split, so that each of its two consumer warpgroups holds 64
        query rows, where its default tile splits more than 32 rows into row tiles of 32 and its
        head dim lets a warpgroup hold 64; else None."""
        tile = TILES.get(f"tma{spec.tile.stages}x2r")
        if spec.tile.consumers == 1 or spec.tile.register_split or spec.rows <= MAX_ROWS_CTA_SHARED_REGISTERS or tile is None:
            return None
        wide = dataclasses.replace(spec, tile=tile)
        return wide if self.unsupported(wide) is None and plan_of(wide).rows_cta > MAX_ROWS_CTA_SHARED_REGISTERS else None

    def launch_specs(self, spec: KernelSpec) -> list[KernelSpec]:
        wide = self.wide_rows_variant(spec)
        if wide is not None and spec.kv_dtype == "e4m3":  # choose_tile always takes it
            return [spec, wide]
        variants = (self.copying_variant(spec), self._full_grid_variant(spec), self.short_kv_variant(spec),
                    self.short_kv_variant(spec, self._loader(spec, SHORT_KV_MAX_TOKENS)), wide)
        return list(dict.fromkeys([spec, *(v for v in variants if v is not None)]))

    def choose_tile(self, spec: KernelSpec, shape: LaunchShape) -> KernelSpec:
        """For more than 32 query rows, the register split of 64 rows per CTA (``wide_rows_variant``)
        with fp8 KV always, and with 16-bit KV once its CTAs fill half the SMs or more without KV
        splits; smaller 16-bit grids split the rows into row tiles of 32 instead (H200 sweep in
        docs/benchmarks.md: q_seq_len 8 x group 8, fp8 batch 8 x 8k 66.0 us against 79.1, bf16 batch
        8 x 8k 72.3 against 83.7 split, bf16 batch 16 x 8k 140.8 against 161.1).  Else, for grids of
        FULL_GRID_CTAS_PER_SM CTAs per SM or more, the short-KV tile up to SHORT_KV_MAX_TOKENS (where
        ``short_kv_variant`` offers one) and the four-stage tile beyond, each loading by cp.async
        where ``_loader`` says; ``spec`` otherwise, on its cp.async twin where ``copying_variant``
        offers one and ``_loader`` says for the tokens of one KV split."""
        wide = self.wide_rows_variant(spec)
        if wide is not None and (spec.kv_dtype == "e4m3"
                                 or 2 * shape.batch * shape.num_kv_heads * plan_of(wide).row_tiles >= shape.sm_count):
            return wide
        ctas = shape.batch * shape.num_kv_heads * plan_of(spec).row_tiles
        if ctas < FULL_GRID_CTAS_PER_SM * shape.sm_count:
            copying = self.copying_variant(spec)
            tokens = math.ceil(shape.kv_len / self.auto_splits(spec, shape))
            return copying if copying and self._loader(spec, tokens) == "cpa" else spec
        if shape.kv_len <= SHORT_KV_MAX_TOKENS:
            return self.short_kv_variant(spec, self._loader(spec, shape.kv_len)) or spec
        return self._full_grid_variant(spec) or spec

    def auto_splits(self, spec: KernelSpec, shape: LaunchShape) -> int:
        """As many splits as give each SM one CTA; 1 when the batch already fills the SMs."""
        base = shape.batch * shape.num_kv_heads * plan_of(spec).row_tiles
        tiles = max(1, math.ceil(shape.kv_len / KV_TILE))
        limit = min(MAX_AUTO_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT))
        return max(1, min(limit, shape.sm_count // base))
