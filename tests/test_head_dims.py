"""Shared-memory swizzles of every head_dim the specs accept: ldmatrix and the gather stay free of bank
conflicts, and every chunk stays in its row.
"""

from __future__ import annotations

import pytest

from xqagen.emitters.generic import _swizzle
from xqagen.spec import HEAD_DIMS


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
