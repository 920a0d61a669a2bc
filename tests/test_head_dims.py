"""Every head_dim the specs accept (multiples of 16 from 32 to 256): a plan for each KV dtype, a
conflict-free shared-memory swizzle, and, for a sample of the sizes that are not multiples of 32 or
not powers of two, NVRTC builds with the SASS their plan means and no local memory.  Correctness on
a GPU: the head-dim cases of tests/test_gpu_decode.py.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from xqagen.compiler import compile_kernel, disassemble
from xqagen.emitters import emit, path_of
from xqagen.emitters.generic import MAX_SMEM_PER_CTA, SPLIT_TILE, TILES, _swizzle, plan_of
from xqagen.spec import HEAD_DIMS, KernelSpec, SpecError

OPCODE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)
KV_DTYPES = (("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "e4m3"))


def test_head_dims_are_the_multiples_of_16_from_32_to_256():
    assert HEAD_DIMS == (32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256)


@pytest.mark.parametrize("head_dim", [16, 40, 264, 272, 64.0, True, "64"])
def test_other_head_dims_are_refused(head_dim):
    with pytest.raises(SpecError, match=r"KernelSpec\.head_dim = .* is invalid; expected a multiple of 16 in \[32, 256\]"):
        KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=head_dim, group=8, page_size=64)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("q_dtype, kv_dtype", KV_DTYPES)
def test_every_head_dim_has_a_plan_on_every_tile_that_fits(head_dim, q_dtype, kv_dtype):
    """The default tile always fits, and so does the split tile that small batches of long sequences
    dispatch to, for fp8 and for 16-bit rows up to 128 elements; a tile is refused only for its
    shared memory."""
    spec = KernelSpec(q_dtype=q_dtype, kv_dtype=kv_dtype, head_dim=head_dim, group=8, page_size=64)
    assert plan_of(spec).smem_bytes <= MAX_SMEM_PER_CTA
    assert f"constexpr int kHeadDim = {head_dim};" in emit(spec).source
    if kv_dtype == "e4m3" or head_dim <= 128:
        assert [s.tile.name for s in path_of(spec).launch_specs(spec)] == [spec.tile.name, SPLIT_TILE]
    for tile in TILES:
        try:
            plan = plan_of(dataclasses.replace(spec, tile=tile))
        except SpecError as err:
            assert "bytes of shared memory" in str(err)
        else:
            assert plan.smem_bytes <= MAX_SMEM_PER_CTA


def _swizzled_chunks(head_dim: int, elem_bytes: int, rows: int) -> dict[tuple[int, int], int]:
    """(row, 16-byte chunk of the row) -> chunk index in shared memory under the plan's swizzle,
    computed as cute::Swizzle<B, M, S> does on the row-major element offset."""
    bits, base, shift = _swizzle(head_dim, elem_bytes)
    chunk = 16 // elem_bytes
    mask = ((1 << bits) - 1) << (base + shift)
    return {(r, c): ((r * head_dim + c * chunk) ^ (((r * head_dim + c * chunk) & mask) >> shift)) // chunk
            for r in range(rows) for c in range(head_dim // chunk)}


@pytest.mark.parametrize("elem_bytes", [1, 2], ids=["fp8", "16bit"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_swizzle_keeps_rows_and_is_bank_conflict_free(head_dim, elem_bytes):
    rows = 128
    chunks_per_row = head_dim * elem_bytes // 16
    where = _swizzled_chunks(head_dim, elem_bytes, rows)
    assert all(place // chunks_per_row == r for (r, _), place in where.items()), "a chunk left its row"
    assert len(set(where.values())) == len(where)
    for r0 in range(rows - 7):  # ldmatrix: one chunk column of 8 consecutive rows
        for c in range(chunks_per_row):
            assert len({where[r0 + i, c] % 8 for i in range(8)}) == 8, f"ldmatrix at rows {r0}.., chunk {c}"
    # The gather: threads take a row's chunks in a power-of-two number of slots (the kernel's
    # kKvSlotsPerRow), the ones past the row idle; a phase is 8 consecutive slots.
    slots = 1 << (chunks_per_row - 1).bit_length()
    for start in range(0, rows * slots, 8):
        phase = [divmod(slot, slots) for slot in range(start, start + 8)]
        banks = [where[r, c] % 8 for r, c in phase if c < chunks_per_row]
        assert len(set(banks)) == len(banks), f"gather phase at slot {start}"


# Head dims that are not multiples of 32 (a last 16-wide MMA step) or not powers of two (a swizzle
# over fewer than 8 chunks, idle gather slots), each with other features, on one target each.
JOBS = [
    (KernelSpec(q_dtype="fp16", kv_dtype="fp16", head_dim=32, group=4, page_size=16), "sm_80"),
    (KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=48, group=8, page_size=64, features=frozenset({"sinks"})),
     "sm_90"),
    (KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=80, group=8, page_size=32, q_seq_len=4), "sm_80"),
    (KernelSpec(q_dtype="fp16", kv_dtype="e4m3", out_dtype="e4m3", head_dim=96, group=16, page_size=64), "sm_90"),
    (KernelSpec(q_dtype="bf16", kv_dtype="e4m3", head_dim=112, group=32, page_size=16), "sm_80"),
    (KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=160, group=8, page_size=64,
                features=frozenset({"sliding_window"})), "sm_90"),
    (KernelSpec(q_dtype="fp16", kv_dtype="fp16", head_dim=192, group=8, page_size=64), "sm_80"),
    (KernelSpec(q_dtype="fp16", kv_dtype="e4m3", head_dim=208, group=8, page_size=64, tile=SPLIT_TILE), "sm_90"),
    (KernelSpec(q_dtype="bf16", kv_dtype="bf16", head_dim=240, group=5, page_size=128, q_seq_len=2), "sm_90"),
]


def _compile(job: tuple[dict, str]):
    spec_dict, arch = job
    emitted = emit(KernelSpec.from_dict(spec_dict))
    return compile_kernel(emitted.source, emitted.kernel_name, arch, use_pch=True)


@pytest.fixture(scope="module")
def compiled() -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        results = pool.map(_compile, [(spec.to_dict(), arch) for spec, arch in JOBS])
        return {job: result for job, result in zip(JOBS, results)}


def test_the_sample_covers_every_kind_of_head_dim():
    for arch in ("sm_80", "sm_90"):
        assert {spec.head_dim % 32 for spec, target in JOBS if target == arch} == {0, 16}
        assert {spec.kv_dtype for spec, target in JOBS if target == arch} >= {"e4m3", "bf16"}
    assert {spec.kv_dtype for spec, _ in JOBS} == {"fp16", "bf16", "e4m3"}
    swizzle_bits = {_swizzle(spec.head_dim, 1 if spec.kv_dtype == "e4m3" else 2)[0] for spec, _ in JOBS}
    assert swizzle_bits == {0, 1, 2, 3}


@pytest.mark.slow
@pytest.mark.parametrize("spec, arch", JOBS, ids=[f"{s.name}-{a}" for s, a in JOBS])
def test_head_dim_variant_sass_and_resources(compiled, spec, arch):
    """No local memory, the path's SASS features, and exactly one tile's tensor-core MMAs per warp:
    (tokens / 8) x (head_dim / 16) for Q K^T and (head_dim / 8) x (tokens / 16) for P V, per 16-row
    block, so a head_dim's last 16-wide step is there and nothing is padded."""
    result = compiled[(spec, arch)]
    res = result.resources
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"local memory: {res}"
    assert 0 < res.registers <= 255
    ops = Counter(OPCODE.findall(disassemble(result.cubin)))
    missing = {op: meaning for op, meaning in path_of(spec).sass_features(spec, arch).items() if not ops[op]}
    assert not missing, f"SASS lacks {missing}"
    assert ops["LDL"] == 0 and ops["STL"] == 0, "local-memory traffic"
    plan = plan_of(spec)
    tokens = spec.tile.kv_tile // plan.warps_n
    assert ops["HMMA"] == plan.warp_blocks * tokens * spec.head_dim // 64
