"""The generic path: a CuTe sm_80+ paged-KV decode kernel (cp.async gather, ldmatrix, SM80 MMA atoms).

:class:`GenericPlan` owns every derived compile-time decision (warp layout, swizzles, shared
memory, residency); the template only spells it out.  :class:`GenericPath` answers the launcher's
questions (grid, workspace, tile and split choice by launch shape) from the same plan.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from xqagen.spec import KernelSpec, SpecError, check_choice, check_int_range

from .params import KernelParams, SplitWorkspace
from .path import EmittedKernel, KernelPath, LaunchShape
from .render import piece_context, render

# Shared memory one CTA may use on sm_80/sm_90 (227 KiB opt-in), and per SM.
MAX_SMEM_PER_CTA = 227 * 1024
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024
MAX_BLOCKS_PER_SM = 4
REGISTERS_PER_SM = 65536
MAX_REGISTERS = 255
# Registers a thread holds besides its accumulators and Q fragments (addresses, softmax state,
# K/V fragments in flight), plus those of each further 16-token group a warp's K/V fragments are
# loaded ahead for; from ptxas reports of the shipped variants.
REGISTER_OVERHEAD = 56
REGISTERS_PER_EXTRA_TOKEN_GROUP = 8
# Warps with two 16-row blocks use about this many registers more than the estimate (fp8 head_dim
# 128: 223 for 200 at group 32, 248 for 224 at q_seq_len 8), so a warp takes a second block only
# where the estimate leaves that much below the cap (fp8 head_dim 160 at group 32 spilled).
TWO_BLOCK_REGISTER_MARGIN = 24
# Q's MMA fragments stay in registers (head_dim / 4 of them) up to this head size; above it they
# are reloaded from shared memory for every KV tile.
Q_IN_REGISTERS_MAX_HEAD_DIM = 128

ELEM_BYTES = {"fp16": 2, "bf16": 2, "e4m3": 1}
MMA_OPS = {"fp16": "SM80_16x8x16_F32F16F16F32_TN", "bf16": "SM80_16x8x16_F32BF16BF16F32_TN"}

# ---- launch-shape heuristics (H100 measurements in docs/benchmarks.md) ----
# A memory-bound decode saturates HBM with about TARGET_WARPS_PER_SM warps per SM (2 CTAs of the
# 4-warp tiles, 1 of the 8-warp split tile).  The last CTA of each output tile merges every split
# alone, so more than MAX_AUTO_SPLITS cost more in that merge than they gain (H100, fp8 d128: batch
# 8 x 32k best at 4 splits, batch 1 x 32k at 16).  A split keeps at least MIN_TILES_PER_SPLIT tiles
# (H200, batch 1 x 1k: 8 splits of 2 tiles 7.4 us, 4 of 4 10.8 us, 16 of 1 7.6 us for fp8 KV).
TARGET_WARPS_PER_SM = 8
MAX_AUTO_SPLITS = 16
MIN_TILES_PER_SPLIT = 2
# The split tile pays for requests long enough to give MAX_AUTO_SPLITS splits 4 of its tiles each.
SPLIT_TILE_MIN_KV_LEN = MAX_AUTO_SPLITS * 4 * 128
# Grids too small to fill the GPU even at MAX_AUTO_SPLITS splits of the default tile (batch 1-2 of
# 8 KV heads on 132 SMs) run this tile instead: 8 warps over 128-token stages, one CTA per SM, so
# that the GPU holds as many bytes in flight from a sixteenth of the CTAs (H100, fp8 d128 batch 1:
# 14.3 / 32.2 / 99.4 us at 8k / 32k / 128k tokens against 15.3 / 34.8 / 107.2 us).
SPLIT_TILE = "split"


@dataclass(frozen=True)
class GenericTile:
    """How a CTA of the generic path walks the KV sequence.

    kv_tile: KV tokens per pipeline stage (a multiple of 16 * warps along the tokens).
    stages: depth of the cp.async pipeline, in KV tiles.
    warps: warps per CTA; they split the query rows (16 per warp) and the tile's tokens.
    max_rows: most query rows (group * q_seq_len) one CTA holds; larger groups tile over rows.
    warp_rows: most query rows one warp computes (16 or 32): each K/V fragment a warp loads feeds
      that many rows, at the cost of as many accumulators.
    """

    name: str
    kv_tile: int = 64
    stages: int = 3
    warps: int = 4
    max_rows: int = 64
    warp_rows: int = 16

    def __post_init__(self) -> None:
        owner = f"GenericTile({self.name!r})"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SpecError(f"GenericTile.name = {self.name!r} is invalid; expected an identifier")
        check_choice(owner, "warps", self.warps, (4, 8))
        check_choice(owner, "kv_tile", self.kv_tile, (16, 32, 64, 128))
        check_int_range(owner, "stages", self.stages, 2, 8)
        check_choice(owner, "max_rows", self.max_rows, (16, 32, 64, 128))
        check_choice(owner, "warp_rows", self.warp_rows, (16, 32))
        if self.max_rows // self.warp_rows > self.warps:
            raise SpecError(f"{owner}.max_rows = {self.max_rows} needs {self.max_rows // self.warp_rows} warps "
                            f"({self.warp_rows} rows each); warps = {self.warps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The shipped catalogue (see GenericPath.default_tile); `deep` trades residency for a longer
# pipeline, and `split` is what small batches of long sequences dispatch to.
TILES: Mapping[str, GenericTile] = {tile.name: tile for tile in (
    GenericTile("decode", kv_tile=64, stages=3, warps=4, max_rows=64),
    GenericTile("decode_fp8", kv_tile=64, stages=3, warps=4, max_rows=64, warp_rows=32),
    GenericTile("many_rows", kv_tile=64, stages=2, warps=4, max_rows=64),
    GenericTile("deep", kv_tile=64, stages=5, warps=4, max_rows=64),
    GenericTile("wide_head", kv_tile=64, stages=2, warps=4, max_rows=64),
    GenericTile(SPLIT_TILE, kv_tile=128, stages=3, warps=8, max_rows=64),
)}


def _swizzle(row_elems: int, elem_bytes: int) -> tuple[int, int, int]:
    """CuTe Swizzle<B, M, S> of a row-major tile of ``row_elems``-element rows under which ldmatrix's
    8 rows (one 16-byte chunk of each of 8 consecutive rows) hit 8 distinct bank groups, with no
    padding, for any number of chunks per row.

    Number the chunks in row-major order, C = row * c + j, with c = 2^t * odd chunks per row.  Over
    8 consecutive rows (fixed j), C >> t advances by an odd number per row, so C's bits [t, t + 3)
    take 8 distinct values.  The swizzle XORs those of them at bits [max(3, t), t + 3) (B = min(3,
    t) bits) into C's bits [0, B), so that the bank group, C's bits [0, 3), takes 8 distinct values
    too.  The XOR stays inside aligned groups of 2^B chunks, which neither cross a row (2^B divides
    c) nor break a gather phase (8 consecutive chunks from a multiple of 8).  Power-of-two rows get
    the usual XOR with the row index mod 8; an odd c needs no XOR.
    """
    chunk_elems = 16 // elem_bytes
    chunks_per_row = row_elems // chunk_elems
    t = (chunks_per_row & -chunks_per_row).bit_length() - 1  # 2^t: the largest power of two dividing it
    return min(3, t), int(math.log2(chunk_elems)), max(3, t)


# The oldest GPU the generic kernels run on (cp.async and ldmatrix feeding SM80 MMAs).
MIN_ARCH = 80


def _arch_number(arch: str) -> int:
    """80 for ``sm_80``, 90 for ``sm_90a``."""
    return int(arch.removeprefix("sm_").rstrip("af"))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class GenericPlan:
    mma_dtype: str
    mma_op: str
    rows_cta: int
    row_tiles: int
    warp_blocks: int
    warps_m: int
    warps_n: int
    threads: int
    kv_swizzle: tuple[int, int, int]
    q_swizzle: tuple[int, int, int]
    smem_bytes: int
    min_blocks_per_sm: int
    q_in_registers: bool
    workspace: SplitWorkspace

    @classmethod
    def of(cls, spec: KernelSpec) -> "GenericPlan":
        tile = spec.tile
        if "fp8_mma" in spec.features:
            raise SpecError("the generic path has no fp8_mma mode (8-bit wgmmas are Hopper's); use path='hopper'")
        mma_dtype = "fp16" if spec.kv_dtype == "e4m3" else spec.q_dtype
        # Rows per CTA, in 16-row MMA blocks: each warp takes up to tile.warp_rows of them (fewer
        # where their accumulators would not fit in registers); the warps that remain split each
        # tile's tokens.
        rows16 = -(-spec.rows // 16) * 16
        rows_cta = min(tile.max_rows, 1 << (rows16 - 1).bit_length())

        def warp_layout(warp_blocks: int) -> tuple[int, int, int, int]:
            """(warps_m, warps_n, tokens per warp, live registers besides Q's fragments)."""
            warps_m = rows_cta // (16 * warp_blocks)
            warps_n = tile.warps // warps_m
            tokens = tile.kv_tile // warps_n
            registers = (warp_blocks * (spec.head_dim // 2 + tokens // 2) + REGISTER_OVERHEAD
                         + REGISTERS_PER_EXTRA_TOKEN_GROUP * (tokens // 16 - 1))
            return warps_m, warps_n, tokens, registers

        warp_blocks = min(tile.warp_rows, rows_cta) // 16
        while warp_blocks > 1 and warp_layout(warp_blocks)[3] + TWO_BLOCK_REGISTER_MARGIN > MAX_REGISTERS:
            warp_blocks -= 1
        warps_m, warps_n, tokens_per_warp, base_registers = warp_layout(warp_blocks)
        if tile.kv_tile % (16 * warps_n):
            raise SpecError(f"tile {tile.name!r}: kv_tile = {tile.kv_tile} must be a multiple of 16 x {warps_n} "
                            f"warps along the tokens for {spec.rows} query rows")
        kv_bytes = ELEM_BYTES[spec.kv_dtype]
        kv_stage = tile.kv_tile * spec.head_dim * kv_bytes
        pipe = 2 * tile.stages * kv_stage
        merge = warps_n * rows_cta * (spec.head_dim + 4) * 4 + 2 * warps_n * rows_cta * 4
        union = _round_up(max(pipe, merge), 128)
        q_bytes = rows_cta * spec.head_dim * 2
        smem = _round_up(union + q_bytes + 4, 128)
        if smem > MAX_SMEM_PER_CTA:
            raise SpecError(f"tile {tile.name!r} needs {smem} bytes of shared memory for head_dim "
                            f"{spec.head_dim} ({spec.kv_dtype} KV); the limit is {MAX_SMEM_PER_CTA}: use fewer "
                            f"stages or a smaller kv_tile")
        # Resident CTAs per SM: as many as shared memory allows, unless the register cap that
        # __launch_bounds__ derives from them would undercut the estimated live registers.  Q's
        # fragments stay in registers only where that costs no residency (a partial last wave of
        # a batch-sized grid costs more than reloading Q from shared memory).
        q_registers = warp_blocks * spec.head_dim // 4

        def resident(live_registers: int) -> int:
            by_registers = REGISTERS_PER_SM // (32 * tile.warps * min(MAX_REGISTERS, live_registers))
            return max(1, min(MAX_BLOCKS_PER_SM, SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA), by_registers))

        blocks = resident(base_registers)
        q_in_registers = (spec.head_dim <= Q_IN_REGISTERS_MAX_HEAD_DIM
                          and base_registers + q_registers <= MAX_REGISTERS
                          and resident(base_registers + q_registers) == blocks)
        return cls(
            mma_dtype=mma_dtype, mma_op=MMA_OPS[mma_dtype],
            rows_cta=rows_cta, row_tiles=-(-spec.rows // rows_cta), warp_blocks=warp_blocks, warps_m=warps_m,
            warps_n=warps_n,
            threads=32 * tile.warps,
            kv_swizzle=_swizzle(spec.head_dim, kv_bytes), q_swizzle=_swizzle(spec.head_dim, 2),
            smem_bytes=smem, min_blocks_per_sm=blocks,
            q_in_registers=q_in_registers,
            workspace=SplitWorkspace(rows=rows_cta, head_dim=spec.head_dim),
        )


@functools.lru_cache(maxsize=None)
def plan_of(spec: KernelSpec) -> GenericPlan:
    """The plan of a spec, computed once per process."""
    return GenericPlan.of(spec)


class GenericPath(KernelPath):
    name = "generic"
    tile_type = GenericTile
    arches = ("sm_80", "sm_90")

    @property
    def tiles(self) -> Mapping[str, GenericTile]:
        return TILES

    def default_tile(self, spec: KernelSpec) -> GenericTile:
        """The shipped tile of a variant (H100 measurements in docs/benchmarks.md).

        - fp8 KV: `decode_fp8`, whose warps take 32 rows each where there are that many, so that
          every K/V fragment is converted from fp8 once for 32 rows (group 32: 0.398 against 0.457 ms).
        - 16-bit head_dim above 128: `wide_head`, 2 stages, since a 64-token stage of head_dim 256
          is 64 KiB.
        - 16-bit KV and more than 32 rows (speculative decoding): `many_rows`, 2 stages (q_seq_len
          8: 0.367 against 0.377 ms).
        - Otherwise `decode`: 3 stages of 64 tokens.
        """
        if spec.kv_dtype == "e4m3":
            return TILES["decode_fp8"]
        if spec.head_dim > 128:
            return TILES["wide_head"]
        return TILES["many_rows" if spec.rows > 32 else "decode"]

    def unsupported(self, spec: KernelSpec) -> str | None:
        try:
            plan_of(spec)
        except SpecError as err:
            return str(err)
        return None

    def emit(self, spec: KernelSpec) -> EmittedKernel:
        plan = plan_of(spec)
        source = render("generic_decode.cu.j2", tile=spec.tile, plan=plan, kernel_name=spec.name,
                        **piece_context(spec, mma_dtype=plan.mma_dtype, workspace=plan.workspace))
        return EmittedKernel(spec=spec, source=source, kernel_name=spec.name, threads=plan.threads,
                             smem_bytes=plan.smem_bytes, arches=self.arches)

    def unsupported_target(self, arch: str) -> str | None:
        if _arch_number(arch) < MIN_ARCH:
            return (f"the generic path builds for sm_{MIN_ARCH} and newer (cp.async, ldmatrix and the SM80 "
                    f"tensor-core MMAs), not {arch}")
        return None

    def target_arch(self, device_arch: str) -> str | None:
        return None if self.unsupported_target(device_arch) else device_arch

    def sass_features(self, spec: KernelSpec, arch: str) -> Mapping[str, str]:
        features = {"HMMA": "no tensor-core MMA", "LDSM": "operands are not loaded with ldmatrix",
                    "LDGSTS": "the KV gather does not use cp.async"}
        if spec.kv_dtype == "e4m3" and _arch_number(arch) >= 89:
            features["F2FP"] = "fp8 conversion does not use the hardware converter"
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
        return (KernelParams(**problem.params(), workspace=workspace.scratch.data_ptr(),
                             semaphores=workspace.semaphores.data_ptr(), faults=workspace.faults_ptr,
                             num_splits=num_splits),)

    def _split_variant(self, spec: KernelSpec) -> KernelSpec | None:
        """``spec`` on the split tile, or None where that tile does not fit the variant (16-bit
        stages of head_dim above 128 exceed shared memory)."""
        if spec.tile.name == SPLIT_TILE:
            return None
        try:
            return dataclasses.replace(spec, tile=TILES[SPLIT_TILE])
        except SpecError:
            return None

    def launch_specs(self, spec: KernelSpec) -> list[KernelSpec]:
        split = self._split_variant(spec)
        return [spec] if split is None else [spec, split]

    def choose_tile(self, spec: KernelSpec, shape: LaunchShape) -> KernelSpec:
        """The split tile for grids that MAX_AUTO_SPLITS splits of ``spec``'s tile cannot fill and
        whose KV range is at least SPLIT_TILE_MIN_KV_LEN; ``spec`` otherwise."""
        split = self._split_variant(spec)
        if split is None:
            return spec
        base_warps = shape.batch * shape.num_kv_heads * plan_of(spec).row_tiles * spec.tile.warps
        under_filled = base_warps * MAX_AUTO_SPLITS < TARGET_WARPS_PER_SM * shape.sm_count
        long_enough = shape.kv_len >= SPLIT_TILE_MIN_KV_LEN
        return split if under_filled and long_enough else spec

    def auto_splits(self, spec: KernelSpec, shape: LaunchShape) -> int:
        """Splits that bring the grid to about TARGET_WARPS_PER_SM warps per SM; 1 when the batch
        already fills the GPU."""
        base = shape.batch * shape.num_kv_heads * plan_of(spec).row_tiles
        target = TARGET_WARPS_PER_SM * shape.sm_count / spec.tile.warps
        tiles = max(1, math.ceil(shape.kv_len / spec.tile.kv_tile))
        limit = min(MAX_AUTO_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT))
        return max(1, min(limit, round(target / base)))
