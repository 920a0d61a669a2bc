"""TMA tensor maps of a paged KV pool, for the Hopper path's ``__grid_constant__`` parameters.

A K or V pool is one 4-D tiled map: dims (head_dim, kv heads, tokens per page, pages), strides
from the tensor (so NHD and HND, and any strides, are one kernel), a box of one swizzled row chunk
x ``box_tokens`` tokens of one head and page.  The kernel gives the page id from the page table as
the fourth coordinate; a page outside [0, num_pages) or a box past the sequence (page -1) lies
outside the map, which TMA fills with zeros.

Maps are encoded with the driver's ``cuTensorMapEncodeTiled`` through ctypes (cuda-python's
wrapper costs microseconds per call), into 64-byte-aligned buffers that the launch passes by
value; :meth:`TensorMap.retarget` moves a map to another pool of the same geometry (a plan serving
every layer) with ``cuTensorMapReplaceAddress``.
"""

from __future__ import annotations

import ctypes
import functools

from cuda.bindings import driver

from ._torch import torch

TENSOR_MAP_BYTES = 128
TENSOR_MAP_ALIGN = 64

_DTYPES = {
    torch.float16: driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    torch.bfloat16: driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
    torch.float8_e4m3fn: driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8,
}
_SWIZZLE = {64: driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_64B,
            128: driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B}


class TensorMapError(ValueError):
    """A KV pool whose geometry TMA cannot describe (the Hopper path then does not take it)."""


class TensorMap(ctypes.Structure):
    """One encoded ``CUtensorMap`` (opaque 128 bytes), at a 64-byte-aligned address."""

    _fields_ = [("opaque", ctypes.c_uint64 * (TENSOR_MAP_BYTES // 8))]

    @classmethod
    def aligned(cls) -> "TensorMap":
        raw = ctypes.create_string_buffer(TENSOR_MAP_BYTES + TENSOR_MAP_ALIGN)
        address = -(-ctypes.addressof(raw) // TENSOR_MAP_ALIGN) * TENSOR_MAP_ALIGN
        tensor_map = cls.from_address(address)
        tensor_map._raw = raw  # keeps the memory alive
        return tensor_map

    def retarget(self, address: int) -> None:
        """Point the map at another pool of the same geometry (``address`` 16-byte aligned).  A
        method, so that a path's ``refresh`` calls it without importing this module (a function-
        level import costs about a microsecond per launch)."""
        if address == self.address:
            return
        err = _replace_address()(ctypes.addressof(self), address)
        if err:
            raise TensorMapError(f"cuTensorMapReplaceAddress failed ({driver.CUresult(err).name}) for address "
                                 f"{address:#x}")
        self.address = address


@functools.lru_cache(maxsize=None)
def _driver_function(name: str, argtypes: tuple):
    function = getattr(ctypes.CDLL("libcuda.so.1"), name)
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


@functools.cache
def _replace_address():
    # looked up without arguments: a retarget per layer would otherwise hash _driver_function's key
    return _driver_function("cuTensorMapReplaceAddress", (ctypes.c_void_p, ctypes.c_void_p))


def tma_incompatibility(pool: torch.Tensor, strides: tuple[int, int, int]) -> str | None:
    """Why TMA cannot read ``pool`` with these (page, token, head) element strides (None: it can):
    its base must be 16-byte aligned and every stride a positive multiple of 16 bytes below 2^40."""
    elem = pool.element_size()
    if pool.data_ptr() % 16:
        return "the KV pool's address is not 16-byte aligned"
    for name, stride in zip(("page", "token", "head"), strides):
        if stride <= 0 or (stride * elem) % 16 or stride * elem >= 1 << 40:
            return f"the KV pool's {name} stride ({stride * elem} bytes) is not a positive multiple of 16 below 2^40"
    return None


def encode(pool: torch.Tensor, *, head_dim: int, num_kv_heads: int, page_size: int, num_pages: int,
           strides: tuple[int, int, int], chunk_elems: int, box_tokens: int) -> TensorMap:
    """The tensor map of one pool; ``strides`` are (page, token, head) in elements."""
    reason = tma_incompatibility(pool, strides)
    if reason:
        raise TensorMapError(reason)
    elem = pool.element_size()
    stride_page, stride_token, stride_head = strides
    u64x4, u64x3, u32x4 = ctypes.c_uint64 * 4, ctypes.c_uint64 * 3, ctypes.c_uint32 * 4
    tensor_map = TensorMap.aligned()
    encode_tiled = _driver_function("cuTensorMapEncodeTiled", (
        ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int))
    dims = u64x4(head_dim, num_kv_heads, page_size, num_pages)
    byte_strides = u64x3(stride_head * elem, stride_token * elem, stride_page * elem)
    box = u32x4(chunk_elems, 1, box_tokens, 1)
    unit = u32x4(1, 1, 1, 1)
    err = encode_tiled(ctypes.addressof(tensor_map), int(_DTYPES[pool.dtype]), 4, pool.data_ptr(), dims, byte_strides,
                       box, unit, int(driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE),
                       int(_SWIZZLE[chunk_elems * elem]),
                       int(driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B),
                       int(driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))
    tensor_map.address = pool.data_ptr()
    if err:
        raise TensorMapError(f"cuTensorMapEncodeTiled failed ({driver.CUresult(err).name}) for dims "
                             f"{list(dims)}, byte strides {list(byte_strides)}, box {list(box)}")
    return tensor_map


def kv_tensor_maps(problem, *, chunk_elems: int, box_tokens: int) -> tuple[TensorMap, TensorMap]:
    """The K and V pools' maps of a validated decode problem (``xqagen.problem.DecodeProblem``)."""
    strides = problem.layout.strides(problem.k_cache)
    geometry = dict(head_dim=problem.head_dim, num_kv_heads=problem.num_kv_heads, page_size=problem.page_size,
                    num_pages=problem.k_cache.shape[0], strides=strides, chunk_elems=chunk_elems,
                    box_tokens=box_tokens)
    return encode(problem.k_cache, **geometry), encode(problem.v_cache, **geometry)

