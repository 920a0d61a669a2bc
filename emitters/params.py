"""What every path's kernel takes, declared once: the parameter struct (rendered as C++ by the
emitters, packed with ctypes by the runtime from the same list) and the split-KV workspace layout
(rendered into the kernels as constants, sized by the runtime from the same object)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

# (field, C++ type, ctypes type).  Pointer element types that depend on the spec are written as
# {q}, {kv}, {out} and filled in per variant.  Order: 8-byte fields first, so the C++ and ctypes
# layouts need no padding rules beyond natural alignment.
PARAMS: tuple[tuple[str, str, type], ...] = (
    ("q", "{q} const*", ctypes.c_void_p),
    ("k", "{kv} const*", ctypes.c_void_p),
    ("v", "{kv} const*", ctypes.c_void_p),
    ("page_table", "int const*", ctypes.c_void_p),
    ("seq_lens", "int const*", ctypes.c_void_p),
    ("out", "{out}*", ctypes.c_void_p),
    ("sinks", "float const*", ctypes.c_void_p),
    ("mask", "uint32_t const*", ctypes.c_void_p),
    ("q_cu_seq_lens", "int const*", ctypes.c_void_p),  # ragged q: [batch + 1] token offsets, or null
    ("q_scale_ptr", "float const*", ctypes.c_void_p),
    ("kv_scale_ptr", "float const*", ctypes.c_void_p),
    ("workspace", "float*", ctypes.c_void_p),
    ("semaphores", "int*", ctypes.c_void_p),
    ("faults", "int*", ctypes.c_void_p),  # fault word (FAULT_* bits), or null
    ("q_stride_batch", "int64_t", ctypes.c_int64),
    ("q_stride_token", "int64_t", ctypes.c_int64),
    ("q_stride_head", "int64_t", ctypes.c_int64),
    ("kv_stride_page", "int64_t", ctypes.c_int64),
    ("kv_stride_token", "int64_t", ctypes.c_int64),
    ("kv_stride_head", "int64_t", ctypes.c_int64),
    ("out_stride_batch", "int64_t", ctypes.c_int64),
    ("out_stride_token", "int64_t", ctypes.c_int64),
    ("out_stride_head", "int64_t", ctypes.c_int64),
    ("page_table_stride", "int64_t", ctypes.c_int64),
    ("q_scale", "float", ctypes.c_float),
    ("kv_scale", "float", ctypes.c_float),
    ("rcp_out_scale", "float", ctypes.c_float),
    ("seq_lens_stride", "int", ctypes.c_int32),
    ("mask_words_per_row", "int", ctypes.c_int32),
    ("window", "int", ctypes.c_int32),
    ("num_splits", "int", ctypes.c_int32),
    ("num_kv_heads", "int", ctypes.c_int32),
    ("num_pages", "int", ctypes.c_int32),  # pages in the KV pool: page indices are checked against it
    ("max_pages_per_seq", "int", ctypes.c_int32),  # the page table's width: lengths are checked against it
    ("total_q_tokens", "int", ctypes.c_int32),  # ragged q: rows of the packed q; offsets are checked against it
)

# Bits a kernel ORs into the fault word when its inputs would make it read outside the page table
# or the KV pool; it reads nothing there instead (see docs/design.md, "Memory safety").
FAULT_SEQ_LEN = 1  # a length outside [0, max_pages_per_seq * page_size]: that request reads no KV
FAULT_PAGE = 2  # a page index outside [0, num_pages): its tokens read as zeros
FAULT_Q_TOKENS = 4  # ragged q: a request's tokens outside [0, q_seq_len] or the packed q: it computes nothing

_ELEM = {"q": "QElem", "kv": "KVElem", "out": "OutElem"}


def c_declarations() -> list[tuple[str, str]]:
    """(field, C++ type) pairs of the parameter struct, in the kernel's element-type aliases."""
    return [(name, ctype.format(**_ELEM)) for name, ctype, _ in PARAMS]


class KernelParams(ctypes.Structure):
    _fields_ = [(name, ct) for name, _, ct in PARAMS]


@dataclass(frozen=True)
class SplitWorkspace:
    """Layout of the split-KV scratch (fp32), per output tile (request, KV head, row tile), in
    ``params.workspace``: first the un-normalised output rows of every split,
    ``[num_splits][rows][head_dim]``, then their (max, sum) pairs, ``[num_splits][rows][2]``.
    Output tile ``t`` starts at ``t * num_splits * floats_per_split``; its semaphore is
    ``params.semaphores[t]``."""

    rows: int
    head_dim: int

    @property
    def o_floats_per_split(self) -> int:
        return self.rows * self.head_dim

    @property
    def floats_per_split(self) -> int:
        return self.rows * (self.head_dim + 2)

    def floats(self, output_tiles: int, num_splits: int) -> int:
        return output_tiles * num_splits * self.floats_per_split
