"""The user-facing decode call: problem -> plan -> pack -> bind -> launch.

1. :func:`xqagen.problem.describe` checks every argument before anything is launched and describes
   the problem (a bad argument raises ``ValueError``/``TypeError`` naming it);
2. :func:`xqagen.plan.plan_launch` picks the variant (path, tile) and the split count;
3. the variant's path packs the kernel parameters;
4. :mod:`xqagen.runtime` binds them to the loaded kernel and launches on torch's current stream.

With ``validate=False`` the first three steps run once per geometry (shapes, strides, dtypes,
options): :func:`launch_decode` keeps the bound launch of each geometry it has seen and, on a
repeat, only rewrites the pointers and launches.  The custom op (:mod:`xqagen.ops`) and the
FlashInfer-compatible entry points take that path.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ._torch import torch

from .emitters import PATHS, LaunchShape
from .plan import LaunchPlan, choose_path, plan_launch
from .problem import DTYPE_NAMES, TORCH_DTYPES, describe, fail
from .runtime import (POINTER_WORDS, BoundLaunch, DecodeKernel, Workspace, default_workspace, device_arch,
                      fault_word_offset, get_kernel, sm_count as device_sm_count, supports_pdl)

__all__ = ["DTYPE_NAMES", "TORCH_DTYPES", "DecodeCall", "launch_decode", "prepare_decode", "xqa_decode"]


def xqa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    kv_layout: str = "NHD",
    q_scale: float | torch.Tensor = 1.0,
    kv_scale: float | torch.Tensor = 1.0,
    rcp_out_scale: float = 1.0,
    sinks: torch.Tensor | None = None,
    sliding_window: int = 0,
    mask: torch.Tensor | None = None,
    q_cu_seq_lens: torch.Tensor | None = None,
    q_seq_len: int | None = None,
    num_splits: int | None = None,
    workspace: Workspace | None = None,
    tile=None,
    path: str | None = None,
    enable_pdl: bool = False,
    fp8_mma: bool = False,
    validate: bool = True,
    cache_dir: Path | None = None,
) -> torch.Tensor:
    """Paged-KV XQA decode attention (semantics: xqagen.reference).

    q: ``[batch, 1, num_q_heads, head_dim]`` or ``[batch, 1, q_seq_len, num_q_heads, head_dim]``.
    k_cache, v_cache: ``[num_pages, page_size, num_kv_heads, head_dim]`` (NHD) or
    ``[num_pages, num_kv_heads, page_size, head_dim]`` (HND), any strides with a contiguous head_dim.
    page_table: int32 ``[batch, max_pages]``.  seq_lens: int32/uint32 ``[batch]`` or ``[batch, 1]``.
    mask (q_seq_len > 1): packed words ``[batch, q_seq_len, ceil(q_seq_len / 32)]`` (int32/uint32),
    or FlashInfer's uint16 view of the same bytes.  sinks: float32 ``[num_kv_heads, group]``.
    q_cu_seq_lens (ragged speculative decoding, FlashInfer 0.7.2's convention): int32 ``[batch + 1]``
    offsets; request ``b`` owns tokens ``q_cu_seq_lens[b] .. q_cu_seq_lens[b + 1] - 1`` (0 allowed,
    at most ``q_seq_len``, which is then required) of a packed q ``[total_q_tokens, num_q_heads,
    head_dim]``, of ``out`` (same shape) and of the mask rows ``[total_q_tokens, words]``.
    num_splits: split-KV count (None: chosen from the grid, the SM count and max sequence length).
    tile: the kernel path's tile, a shipped tile's name or a mapping of tile fields (None: the path
    chooses by launch shape).
    path: the kernel path, ``"generic"`` or ``"hopper"`` (None: chosen per launch shape, see
    :mod:`xqagen.plan`).
    enable_pdl: programmatic dependent launch (sm_90+): the kernel may start while the previous
    kernel on the stream finishes, and waits for its writes before reading anything.  Off by
    default: back-to-back decodes measured slower with it on an H100 (docs/benchmarks.md).
    fp8_mma: the fp8 MMA mode (opt-in; an e4m3 cache on the Hopper path): Q and P are quantised to
    e4m3 and multiplied with 8-bit wgmmas, at 2.9-3.9e-2 relative error (H200) against 1.6-1.7e-3
    for the default, which multiplies the exact fp16 values of the cache with 16-bit Q and P
    (docs/benchmarks.md).
    validate: also check sequence lengths and page indices against the page table and the pool
    (one host sync per call).  ``False`` checks the arguments once per geometry and then only
    launches (no sync, no allocation when ``out`` is given).
    Returns ``out`` (allocated when not given) with q's shape.
    """
    # The per-geometry path, unless an argument is already wrong or a tile mapping is no cache key
    # (tested for None first: isinstance against an ABC costs more).
    if not validate and isinstance(q, torch.Tensor) and (tile is None or not isinstance(tile, Mapping)):
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype if out_dtype is None else out_dtype, device=q.device)
        scratch, semaphores = (None, None) if workspace is None else (workspace.scratch, workspace.buffer)
        q_scale_tensor = q_scale if isinstance(q_scale, torch.Tensor) else None
        kv_scale_tensor = kv_scale if isinstance(kv_scale, torch.Tensor) else None
        launch_decode(q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask,
                      q_scale_tensor, kv_scale_tensor, 1.0 if q_scale_tensor is not None else q_scale,
                      1.0 if kv_scale_tensor is not None else kv_scale, rcp_out_scale, sliding_window, kv_layout,
                      num_splits or 0, 0, enable_pdl, q_cu_seq_lens, q_seq_len or 0, fp8_mma, tile=tile, path=path,
                      cache_dir=cache_dir)
        return out
    return prepare_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, out_dtype=out_dtype,
                          kv_layout=kv_layout, q_scale=q_scale, kv_scale=kv_scale, rcp_out_scale=rcp_out_scale,
                          sinks=sinks, sliding_window=sliding_window, mask=mask, q_cu_seq_lens=q_cu_seq_lens,
                          q_seq_len=q_seq_len, num_splits=num_splits,
                          workspace=workspace, tile=tile, path=path, enable_pdl=enable_pdl, fp8_mma=fp8_mma,
                          validate=validate, cache_dir=cache_dir).launch()


@dataclass
class DecodeCall:
    """A validated call: its plan (variant and split count), the kernel handle and the bound launch.

    ``launch()`` may be repeated (e.g. in a benchmark loop or while capturing a graph); it reads the
    tensors the call was prepared with, so new data must be written into those same tensors.
    """

    plan: LaunchPlan
    kernel: DecodeKernel
    out: torch.Tensor
    bound: BoundLaunch

    @property
    def spec(self):
        return self.plan.spec

    @property
    def num_splits(self) -> int:
        return self.plan.num_splits

    def launch(self) -> torch.Tensor:
        self.bound()
        return self.out


def prepare_decode(q, k_cache, v_cache, page_table, seq_lens, *, out=None, out_dtype=None, kv_layout="NHD",
                   q_scale=1.0, kv_scale=1.0, rcp_out_scale=1.0, sinks=None, sliding_window=0, mask=None,
                   q_cu_seq_lens=None, q_seq_len=None, num_splits=None, workspace=None, tile=None, path=None,
                   enable_pdl=False, fp8_mma=False, validate=True, cache_dir=None, sm_count=None) -> DecodeCall:
    """Validate the arguments of :func:`xqa_decode`, plan its launch and bind it, without launching."""
    if not isinstance(enable_pdl, bool):
        fail("enable_pdl", "a bool", repr(enable_pdl))
    if sm_count is not None and (not isinstance(sm_count, int) or isinstance(sm_count, bool) or sm_count < 1):
        fail("sm_count", "None or an integer >= 1", repr(sm_count))
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        fail("num_splits", "None or an integer >= 1", repr(num_splits))
    problem = describe(q, k_cache, v_cache, page_table, seq_lens, out=out, out_dtype=out_dtype, kv_layout=kv_layout,
                       q_scale=q_scale, kv_scale=kv_scale, rcp_out_scale=rcp_out_scale, sinks=sinks,
                       sliding_window=sliding_window, mask=mask, q_cu_seq_lens=q_cu_seq_lens, q_seq_len=q_seq_len,
                       fp8_mma=fp8_mma, validate=validate)
    if path is not None and path not in PATHS:
        fail("path", f"None or one of {', '.join(map(repr, PATHS))}", repr(path))
    # Every argument is checked first, so that a CPU tensor reports its real mistakes too.
    device = problem.device
    if device.type != "cuda":
        fail("q", "CUDA tensors (the kernels run on NVIDIA GPUs)", f"tensors on {device}")
    if sm_count is None:
        sm_count = device_sm_count(device)
    shape = LaunchShape(problem.batch, problem.num_kv_heads, problem.kv_len, sm_count)
    spec = variant_for(problem, shape, path=path, tile=tile, device=device, k_cache=problem.k_cache,
                       v_cache=problem.v_cache)
    if enable_pdl and not supports_pdl(device):
        fail("enable_pdl", "False on a GPU older than sm_90 (programmatic dependent launch needs sm_90+)",
             f"True on {torch.cuda.get_device_name(device)}")

    workspace = default_workspace(device) if workspace is None else workspace
    plan = plan_launch(spec, shape,
                       tile_given=tile is not None, num_splits=num_splits, workspace=workspace.size)
    kernel = get_kernel(plan.spec, cache_dir=cache_dir)
    params = kernel.path.pack(plan.spec, problem, plan.num_splits, workspace)
    bound = kernel.bind(params, batch=problem.batch, num_kv_heads=problem.num_kv_heads, num_splits=plan.num_splits,
                        device=device, pdl=enable_pdl)
    return DecodeCall(plan, kernel, problem.out, bound)


def variant_for(problem, shape: LaunchShape, *, path: str | None, tile, device: torch.device,
                k_cache: torch.Tensor, v_cache: torch.Tensor):
    """The kernel variant of a validated problem launched on CUDA ``device`` in ``shape``: on
    ``path`` and ``tile`` when given, else on the path :func:`xqagen.plan.choose_path` picks.
    ``k_cache`` and ``v_cache`` are the pools the launches read (the problem's may be shape-only).
    A Hopper-path variant needs pools TMA can read."""
    from .tensor_maps import tma_incompatibility

    if path is not None and path not in PATHS:
        fail("path", f"None or one of {', '.join(map(repr, PATHS))}", repr(path))
    if problem.fp8_mma:  # 8-bit wgmmas: the Hopper path only
        if path not in (None, "hopper"):
            fail("fp8_mma", "False on the generic path (the fp8 MMA mode is the Hopper path's)", True)
        if PATHS["hopper"].target_arch(device_arch(device)) is None:
            fail("fp8_mma", "False on a GPU other than sm_90 (the fp8 MMA mode uses Hopper's 8-bit wgmma)",
                 f"True on {torch.cuda.get_device_name(device)}")
        path = "hopper"
    spec = problem.spec(path=path or "generic", tile=tile)

    def kv_incompatibility() -> str | None:
        strides = problem.layout.strides(k_cache)
        return tma_incompatibility(k_cache, strides) or tma_incompatibility(v_cache, strides)

    if spec.path == "hopper" and (reason := kv_incompatibility()):
        fail("k_cache", "a KV pool TMA can read on the hopper path (16-byte aligned, strides multiples of 16 bytes)",
             reason)
    if path is None and tile is None:
        spec = choose_path(spec, device_arch(device), kv_incompatibility, shape)
    return spec


class _LaunchCache:
    """Bound launches by geometry, each entry (bound launch, its semaphore buffer's fault-word
    offset); cleared when full (an engine has a handful of geometries per step).
    ``last`` holds the last geometry launched, (key, entry): layers repeat one geometry, and comparing
    a key with it costs half of hashing it for the dict."""

    MAX_ENTRIES = 4096

    def __init__(self):
        self.entries: dict[tuple, tuple[BoundLaunch, int | None]] = {}
        self.last: tuple = ((), None)

    def add(self, key: tuple, entry: tuple) -> None:
        if len(self.entries) >= self.MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = entry
        self.last = (key, entry)


_launches = _LaunchCache()
_launches_lock = threading.Lock()  # a bound launch's pointers are written, then launched, by one thread at a time
# The pointer fields launch_decode rewrites on every call: all of them (a test holds the two equal).
# The op's C++ kernel rewrites the same, in this order (xqagen/csrc/decode_op.cpp, `Pointer`).
REWRITTEN_POINTERS = ("q", "k", "v", "page_table", "seq_lens", "out", "sinks", "mask", "q_cu_seq_lens",
                      "q_scale_ptr", "kv_scale_ptr", "workspace", "semaphores", "faults")
_REWRITTEN_WORDS = tuple(POINTER_WORDS[name] for name in REWRITTEN_POINTERS)
(_Q, _K, _V, _PAGE_TABLE, _SEQ_LENS, _OUT, _SINKS, _MASK, _Q_CU_SEQ_LENS, _Q_SCALE, _KV_SCALE, _SCRATCH, _SEMAPHORES,
 _FAULTS) = _REWRITTEN_WORDS


def launch_decode(q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask,
                  q_scale_tensor, kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout,
                  num_splits, sm_count, enable_pdl, q_cu_seq_lens=None, q_seq_len=0, fp8_mma=False, *, tile=None,
                  path=None, cache_dir=None) -> None:
    """Launch a decode into ``out`` without value checks, planning once per geometry.

    The arguments of :func:`xqa_decode` flattened as the op (:mod:`xqagen.ops`) takes them:
    ``scratch``/``semaphores`` the split-KV workspace's buffers (None: the device's default
    workspace; the semaphore buffer's last int32 is the fault word); ``q_cu_seq_lens``/``q_seq_len``
    ragged q (None/0 otherwise); ``fp8_mma`` the fp8 MMA mode; a scale is a float, or a one-element
    float32 tensor read by the kernel (then its float is ignored); ``num_splits``/``sm_count`` 0 for
    the default.  The first call of a geometry
    checks every argument (:func:`prepare_decode`, ``validate=False``); a repeat, same shapes,
    strides, dtypes and options, checks only the 16-byte alignment of the new pointers, and trusts
    every tensor to be on q's device as the first call's were.  Float scales are part of the
    geometry: a scale that changes from call to call belongs in a tensor.
    """
    try:
        # The geometry: every tensor's shape, strides and dtype, q's device and every option, in one
        # flat tuple (each optional tensor's part inline: a helper call per tensor costs more).
        key = (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), k_cache.dtype,
               v_cache.shape, v_cache.stride(), v_cache.dtype, page_table.shape, page_table.stride(),
               page_table.dtype, seq_lens.shape, seq_lens.stride(), seq_lens.dtype, out.shape, out.stride(),
               out.dtype,
               None if scratch is None else (scratch.shape, scratch.stride(), scratch.dtype),
               None if semaphores is None else (semaphores.shape, semaphores.stride(), semaphores.dtype),
               None if sinks is None else (sinks.shape, sinks.stride(), sinks.dtype),
               None if mask is None else (mask.shape, mask.stride(), mask.dtype),
               None if q_scale_tensor is None else (q_scale_tensor.shape, q_scale_tensor.stride(),
                                                    q_scale_tensor.dtype),
               None if kv_scale_tensor is None else (kv_scale_tensor.shape, kv_scale_tensor.stride(),
                                                     kv_scale_tensor.dtype),
               None if q_cu_seq_lens is None else (q_cu_seq_lens.shape, q_cu_seq_lens.stride(),
                                                   q_cu_seq_lens.dtype),
               q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout, num_splits, sm_count, enable_pdl,
               q_seq_len, fp8_mma, tile, path, cache_dir)
        launches = _launches
        last_key, entry = launches.last
        if key != last_key:
            entry = launches.entries.get(key)
            if entry is not None:
                launches.last = (key, entry)
    except (AttributeError, TypeError):  # not tensors, or an unhashable option: the checks below name it
        entry = None
    if entry is not None:
        bound, faults_offset = entry
        q_ptr, k_ptr, v_ptr, out_ptr = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr()
        scratch_ptr = scratch.data_ptr() if scratch is not None else 0
        if not (q_ptr | k_ptr | v_ptr | out_ptr | scratch_ptr) & 15:
            _launches_lock.acquire()  # not `with`: its exit call costs as much again
            try:
                words = bound.words
                words[_Q] = q_ptr
                words[_K] = k_ptr
                words[_V] = v_ptr
                words[_OUT] = out_ptr
                words[_PAGE_TABLE] = page_table.data_ptr()
                words[_SEQ_LENS] = seq_lens.data_ptr()
                if sinks is not None:
                    words[_SINKS] = sinks.data_ptr()
                if mask is not None:
                    words[_MASK] = mask.data_ptr()
                if q_cu_seq_lens is not None:
                    words[_Q_CU_SEQ_LENS] = q_cu_seq_lens.data_ptr()
                if q_scale_tensor is not None:
                    words[_Q_SCALE] = q_scale_tensor.data_ptr()
                if kv_scale_tensor is not None:
                    words[_KV_SCALE] = kv_scale_tensor.data_ptr()
                if scratch is not None:  # the default workspace's pointers stay as bound
                    semaphores_ptr = semaphores.data_ptr()
                    words[_SCRATCH] = scratch_ptr
                    words[_SEMAPHORES] = semaphores_ptr
                    # the semaphores' geometry is in the key, so their fault word's offset is the bound one
                    words[_FAULTS] = 0 if faults_offset is None else semaphores_ptr + faults_offset
                bound.refresh()
                bound()
            finally:
                _launches_lock.release()
            return
    # A new geometry, or a misaligned view for the checks to report.
    bound = _bind(q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask, q_scale_tensor,
                  kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout, num_splits, sm_count,
                  enable_pdl, q_cu_seq_lens, q_seq_len, fp8_mma, tile, path, cache_dir)
    entry = (bound, None if semaphores is None else fault_word_offset(semaphores))
    with _launches_lock:
        _launches.add(key, entry)
        bound()


# Bound launches that the op's C++ kernel (xqagen/csrc/decode_op.cpp) holds, by the address of their
# parameter struct, until it reports them dropped.
_native_bound: dict[int, BoundLaunch] = {}


def bind_for_native(q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask,
                    q_scale_tensor, kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout,
                    num_splits, sm_count, enable_pdl, q_cu_seq_lens, q_seq_len, fp8_mma, release) -> list[int]:
    """``xqagen::decode_bind``, the C++ kernel's call for a geometry it has not bound: check, plan,
    bind and launch as :func:`launch_decode` does for a new geometry, and describe the bound launch
    (:meth:`BoundLaunch.native_description`, the fault word's offset in ``semaphores`` or -1, then
    each of REWRITTEN_POINTERS' word index), which stays alive until a later call lists its
    parameter-struct address in ``release``."""
    for address in release:
        _native_bound.pop(address, None)
    bound = _bind(q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask, q_scale_tensor,
                  kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout, num_splits, sm_count,
                  enable_pdl, q_cu_seq_lens, q_seq_len, fp8_mma, None, None, None)
    bound()
    description = bound.native_description()
    _native_bound[description[0]] = bound
    faults_offset = None if semaphores is None else fault_word_offset(semaphores)
    return [*description, -1 if faults_offset is None else faults_offset, *_REWRITTEN_WORDS]


def _bind(q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask, q_scale_tensor,
          kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout, num_splits, sm_count,
          enable_pdl, q_cu_seq_lens, q_seq_len, fp8_mma, tile, path, cache_dir) -> BoundLaunch:
    """The checked, planned and bound launch of :func:`launch_decode`'s arguments."""
    if (scratch is None) != (semaphores is None):
        given = "workspace" if semaphores is None else "semaphores"
        fail("semaphores", "given together with the workspace (or neither)", f"only the {given}")
    workspace = None
    if scratch is not None:
        for name, t in (("workspace", scratch), ("semaphores", semaphores)):
            if t.device != q.device or not t.is_contiguous() or t.data_ptr() % 16:
                fail(name, f"a contiguous, 16-byte aligned tensor on {q.device}",
                     f"a tensor on {t.device} with strides {t.stride()}")
        workspace = Workspace(scratch, semaphores)
    call = prepare_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, kv_layout=kv_layout,
                          q_scale=q_scale if q_scale_tensor is None else q_scale_tensor,
                          kv_scale=kv_scale if kv_scale_tensor is None else kv_scale_tensor,
                          rcp_out_scale=rcp_out_scale, sinks=sinks, sliding_window=sliding_window, mask=mask,
                          q_cu_seq_lens=q_cu_seq_lens, q_seq_len=q_seq_len or None,
                          num_splits=num_splits or None, workspace=workspace, tile=tile, path=path,
                          enable_pdl=enable_pdl, fp8_mma=fp8_mma, validate=False, cache_dir=cache_dir,
                          sm_count=sm_count or None)
    return call.bound
