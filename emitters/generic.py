"""Generic-path emitter: renders a KernelSpec into a CuTe sm_80+ paged-KV decode kernel.

The Python side owns every derived decision (warp layout, swizzles, shared-memory size,
occupancy) in :class:`GenericPlan`; the template only spells them out, and the launcher reads the
same plan for its grid and workspace.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from xqagen.spec import KernelSpec, SpecError

from .params import c_declarations
from .render import render

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
# Q's MMA fragments stay in registers (head_dim / 4 of them) up to this head size; above it they
# are reloaded from shared memory for every KV tile.
Q_IN_REGISTERS_MAX_HEAD_DIM = 128

CTYPES = {"fp16": "cute::half_t", "bf16": "cute::bfloat16_t", "e4m3": "cute::float_e4m3_t"}
ELEM_BYTES = {"fp16": 2, "bf16": 2, "e4m3": 1}
MMA_OPS = {"fp16": "SM80_16x8x16_F32F16F16F32_TN", "bf16": "SM80_16x8x16_F32BF16BF16F32_TN"}


def _swizzle(row_elems: int, elem_bytes: int) -> tuple[int, int, int]:
    """CuTe Swizzle<B, M, S> that XORs a row's 16-byte chunk index with the row index (mod 8)."""
    chunk_elems = 16 // elem_bytes
    chunks_per_row = row_elems // chunk_elems
    bits = min(3, int(math.log2(chunks_per_row)))
    base = int(math.log2(chunk_elems))
    return bits, base, int(math.log2(row_elems)) - base


@dataclass(frozen=True)
class GenericPlan:
    kv_fp8: bool
    out_fp8: bool
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
    rsqrt_head_dim: str

    @classmethod
    def of(cls, spec: KernelSpec) -> "GenericPlan":
        tile = spec.tile
        kv_fp8 = spec.kv_dtype == "e4m3"
        mma_dtype = "fp16" if kv_fp8 else spec.q_dtype
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
        while warp_blocks > 1 and warp_layout(warp_blocks)[3] > MAX_REGISTERS:
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
            kv_fp8=kv_fp8, out_fp8=spec.out_dtype == "e4m3", mma_dtype=mma_dtype, mma_op=MMA_OPS[mma_dtype],
            rows_cta=rows_cta, row_tiles=-(-spec.rows // rows_cta), warp_blocks=warp_blocks, warps_m=warps_m,
            warps_n=warps_n,
            threads=32 * tile.warps,
            kv_swizzle=_swizzle(spec.head_dim, kv_bytes), q_swizzle=_swizzle(spec.head_dim, 2),
            smem_bytes=smem, min_blocks_per_sm=blocks,
            q_in_registers=q_in_registers,
            rsqrt_head_dim=repr(1.0 / math.sqrt(spec.head_dim)),
        )


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def emit_generic(spec: KernelSpec):
    from . import EmittedKernel

    plan = GenericPlan.of(spec)
    source = render(
        "generic_decode.cu.j2",
        spec=spec, tile=spec.tile, plan=plan, kernel_name=spec.name, ctype=CTYPES,
        spec_json=json.dumps(spec.to_dict(), sort_keys=True),
        params=c_declarations(),
    )
    return EmittedKernel(spec=spec, source=source, kernel_name=spec.name, threads=plan.threads,
                         smem_bytes=plan.smem_bytes, arches=("sm_80", "sm_90"))
