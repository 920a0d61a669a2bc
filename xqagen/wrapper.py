"""Plan a decode step once, launch it for every layer: :class:`DecodeWrapper`.

A serving engine runs the same attention geometry in every layer of a step: the same page table,
sequence lengths, mask, sinks and scales, with each layer's own query, KV cache and output.
:meth:`DecodeWrapper.plan` checks the step's arguments, chooses the variant, tile and split count
(:func:`xqagen.plan.plan_launch`), loads the kernel and packs its parameters; :meth:`DecodeWrapper.run`
then only writes the layer's four pointers into the packed parameters and launches: no check, no
planning, no allocation, no host sync, so it can be captured in a CUDA graph.

The split-KV workspace belongs to the engine: :meth:`DecodeWrapper.workspace_bytes` sizes it for
the largest step, :meth:`xqagen.runtime.Workspace.allocate` allocates it.  A wrapper without one
runs every launch in one split.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from .emitters import LaunchShape, WorkspaceSize
from .api import variant_for
from .plan import choose_path, plan_launch
from .problem import DTYPE_NAMES, DecodeProblem, describe, fail
from .runtime import POINTER_WORDS, BoundLaunch, Workspace, get_kernel, sm_count as device_sm_count, supports_pdl
from .spec import KernelSpec

__all__ = ["DecodeWrapper"]

# The pointer fields run() rewrites per layer, and those plan() takes from the step's tensors; pack()
# fills the workspace's from the real workspace.  Together, every pointer field (a test holds it).
LAYER_POINTERS = ("q", "k", "v", "out")
STEP_POINTERS = ("page_table", "seq_lens", "sinks", "mask", "q_cu_seq_lens", "q_scale_ptr", "kv_scale_ptr")
_Q, _K, _V, _OUT, _PAGE_TABLE, _SEQ_LENS, _SINKS, _MASK, _Q_CU_SEQ_LENS, _Q_SCALE, _KV_SCALE = (
    POINTER_WORDS[name] for name in LAYER_POINTERS + STEP_POINTERS)


def _meta(t):
    """A stand-in with ``t``'s shape, strides and dtype and no storage (a float stays a float)."""
    if not isinstance(t, torch.Tensor):
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _describe_step(page_table, seq_lens, kv_cache, *, num_q_heads, q_dtype, out_dtype, q_seq_len, kv_layout,
                   q_strides, out_strides, mask, sinks, sliding_window, q_scale, kv_scale,
                   rcp_out_scale, q_cu_seq_lens=None, num_q_tokens=None, fp8_mma=False) -> DecodeProblem:
    """:func:`xqagen.problem.describe` of a step, on storage-less stand-ins of its tensors: the checks
    read shapes, strides and dtypes only, and the pointers are written per launch (their 16-byte
    alignment is the caller's, as every layer's)."""
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 4:
        fail("kv_cache", "a 4-D page pool tensor", getattr(kv_cache, "shape", type(kv_cache).__name__))
    batch, head_dim = page_table.shape[0], kv_cache.shape[-1]
    if q_cu_seq_lens is not None:  # ragged: q and out packed [num_q_tokens, heads, head_dim]
        if not isinstance(num_q_tokens, int) or isinstance(num_q_tokens, bool) or num_q_tokens < 0:
            fail("num_q_tokens", "the packed q's number of tokens (an int >= 0) with q_cu_seq_lens", repr(num_q_tokens))
        shape = (num_q_tokens, num_q_heads, head_dim)
    elif q_seq_len == 1:
        shape = (batch, 1, num_q_heads, head_dim)
    else:
        shape = (batch, 1, q_seq_len, num_q_heads, head_dim)
    q = torch.empty_strided(shape, q_strides or _contiguous_strides(shape), dtype=q_dtype, device="meta")
    out = torch.empty_strided(shape, out_strides or _contiguous_strides(shape),
                              dtype=q_dtype if out_dtype is None else out_dtype, device="meta")
    cache = _meta(kv_cache)
    return describe(q, cache, cache, _meta(page_table), _meta(seq_lens), out=out, kv_layout=kv_layout,
                    q_scale=_meta(q_scale), kv_scale=_meta(kv_scale), rcp_out_scale=rcp_out_scale,
                    sinks=_meta(sinks), sliding_window=sliding_window, mask=_meta(mask),
                    q_cu_seq_lens=_meta(q_cu_seq_lens), q_seq_len=q_seq_len if q_cu_seq_lens is not None else None,
                    fp8_mma=fp8_mma, validate=False)


class DecodeWrapper:
    """One decode step's plan, launched per layer.

    ``workspace``: the split-KV workspace every launch of this wrapper uses (sized with
    :meth:`workspace_bytes`; one stream at a time), or None for one split per launch.  A wrapper
    serves one thread; engines keep one per stream.
    """

    def __init__(self, workspace: Workspace | None = None, *, cache_dir=None):
        self._workspace = workspace
        self._cache_dir = cache_dir
        self._bound: BoundLaunch | None = None
        self._keep: tuple = ()
        self.plan_info = None  # the LaunchPlan of the last plan(): variant and split count

    @staticmethod
    def workspace_bytes(*, max_batch: int, num_q_heads: int, num_kv_heads: int, head_dim: int, page_size: int,
                        q_dtype: torch.dtype, kv_dtype: torch.dtype, max_kv_len: int, sm_count: int,
                        out_dtype: torch.dtype | None = None, q_seq_len: int = 1, sinks: bool = False,
                        sliding_window: bool = False, tile=None, path: str | None = None,
                        num_splits: int | None = None, fp8_mma: bool = False) -> tuple[int, int]:
        """(scratch bytes, int32 semaphore words, the fault word included) that every step up to ``max_batch`` requests of up to
        ``max_kv_len`` tokens (the page table's capacity) needs for the split count its plan chooses.

        Evaluated over every batch size and over KV lengths at and just below each power of two
        (where the paths change tile) and at ``max_kv_len``, for ``path`` or (None) every path
        :func:`xqagen.plan.choose_path` may pick.  A smaller workspace is not an error:
        a launch that would not fit runs in fewer splits.
        """
        features = frozenset(name for name, on in (("sinks", sinks), ("sliding_window", sliding_window),
                                                   ("fp8_mma", fp8_mma)) if on)
        if fp8_mma:  # the fp8 MMA mode runs on the Hopper path only
            path = "hopper"
        spec = KernelSpec(q_dtype=DTYPE_NAMES[q_dtype], kv_dtype=DTYPE_NAMES[kv_dtype],
                          out_dtype=DTYPE_NAMES[out_dtype] if out_dtype is not None else None, head_dim=head_dim,
                          group=num_q_heads // num_kv_heads, page_size=page_size, q_seq_len=q_seq_len,
                          features=features, path=path or "generic", tile=tile)
        unbounded = WorkspaceSize(1 << 62, 1 << 62)
        powers = [1 << k for k in range(max_kv_len.bit_length()) if 1 << k <= max_kv_len]
        kv_lens = sorted({max_kv_len, *powers, *(p - 1 for p in powers if p > 1)})
        floats = semaphores = 0
        for batch, kv_len in itertools.product(range(1, max_batch + 1), kv_lens):
            shape = LaunchShape(batch, num_kv_heads, kv_len, sm_count)
            specs = {spec}
            if path is None and tile is None:  # what dispatch picks on a GPU that takes the Hopper path
                specs.add(choose_path(spec, "sm_90", lambda: None, shape))
            for launched in specs:
                plan = plan_launch(launched, shape, tile_given=tile is not None, num_splits=num_splits,
                                   workspace=unbounded)
                need = plan.path.workspace_need(plan.spec, batch, num_kv_heads, plan.num_splits)
                floats, semaphores = max(floats, need.floats), max(semaphores, need.semaphores)
        return 4 * floats, semaphores + 1  # the semaphore buffer's last int32 is the fault word

    def plan(self, page_table: torch.Tensor, seq_lens: torch.Tensor, kv_cache: torch.Tensor, *, num_q_heads: int,
             q_dtype: torch.dtype, out_dtype: torch.dtype | None = None, q_seq_len: int = 1, kv_layout: str = "NHD",
             q_strides: tuple[int, ...] | None = None, out_strides: tuple[int, ...] | None = None,
             mask: torch.Tensor | None = None, sinks: torch.Tensor | None = None, sliding_window: int = 0,
             q_scale: float | torch.Tensor = 1.0, kv_scale: float | torch.Tensor = 1.0, rcp_out_scale: float = 1.0,
             num_splits: int | None = None, tile=None, path: str | None = None, enable_pdl: bool = False,
             sm_count: int | None = None, q_cu_seq_lens: torch.Tensor | None = None,
             num_q_tokens: int | None = None, fp8_mma: bool = False) -> None:
        """Check a step's arguments and fix its launch (as :func:`xqagen.api.xqa_decode` defines them).

        ``kv_cache``: one layer's K cache; every layer's K and V caches passed to :meth:`run` must
        have its shape, dtype and strides.  q and out are ``[batch, 1, num_q_heads, head_dim]`` (or
        ``[batch, 1, q_seq_len, num_q_heads, head_dim]``), contiguous unless ``q_strides`` /
        ``out_strides`` say otherwise.  ``page_table``, ``seq_lens``, ``mask``, ``sinks`` and
        tensor scales are read by every launch until the next plan: write new values into them,
        or plan again.  Values are not checked (no host sync).  Ragged speculative decoding:
        ``q_cu_seq_lens`` (``[batch + 1]`` offsets, read by every launch) and ``num_q_tokens``, q
        and out then packed ``[num_q_tokens, num_q_heads, head_dim]``, ``q_seq_len`` the most
        tokens of a request.  ``fp8_mma``: the opt-in fp8 MMA mode (:func:`xqagen.api.xqa_decode`).
        """
        device = page_table.device if isinstance(page_table, torch.Tensor) else None
        if device is None or device.type != "cuda":
            fail("page_table", "a CUDA tensor (the kernels run on NVIDIA GPUs)",
                 getattr(page_table, "device", page_table))
        for name, t in (("seq_lens", seq_lens), ("kv_cache", kv_cache), ("mask", mask), ("sinks", sinks),
                        ("q_cu_seq_lens", q_cu_seq_lens), ("q_scale", q_scale), ("kv_scale", kv_scale)):
            if isinstance(t, torch.Tensor) and t.device != device:
                fail(name, f"a tensor on {device} (page_table's device)", t.device)
        if self._workspace is not None and self._workspace.device != device:
            fail("workspace", f"a workspace on {device}", self._workspace.device)
        if enable_pdl and not supports_pdl(device):
            fail("enable_pdl", "False on a GPU older than sm_90 (programmatic dependent launch needs sm_90+)", True)
        problem = _describe_step(page_table, seq_lens, kv_cache, num_q_heads=num_q_heads, q_dtype=q_dtype,
                                 out_dtype=out_dtype, q_seq_len=q_seq_len, kv_layout=kv_layout, q_strides=q_strides,
                                 out_strides=out_strides, mask=mask, sinks=sinks, sliding_window=sliding_window,
                                 q_scale=q_scale, kv_scale=kv_scale, rcp_out_scale=rcp_out_scale,
                                 q_cu_seq_lens=q_cu_seq_lens, num_q_tokens=num_q_tokens, fp8_mma=fp8_mma)
        batch = problem.batch
        if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool)
                                       or num_splits < 1):
            fail("num_splits", "None or an integer >= 1", repr(num_splits))
        workspace = self._workspace
        if workspace is None:  # one split: the kernel never reads the (empty) workspace
            workspace = Workspace(torch.empty(0, dtype=torch.float32, device=device),
                                  torch.empty(0, dtype=torch.int32, device=device))
        launch_shape = LaunchShape(batch, problem.num_kv_heads, problem.kv_len, sm_count or device_sm_count(device))
        spec = variant_for(problem, launch_shape, path=path, tile=tile, device=device, k_cache=kv_cache,
                           v_cache=kv_cache)
        plan = plan_launch(spec, launch_shape,
                           tile_given=tile is not None, num_splits=num_splits,
                           workspace=self._workspace.size if self._workspace is not None else None)
        kernel = get_kernel(plan.spec, cache_dir=self._cache_dir)
        # packed against a real pool: a path may derive more than pointers from it (tensor maps)
        real_pools = dataclasses.replace(problem, k_cache=kv_cache, v_cache=kv_cache)
        params = kernel.path.pack(plan.spec, real_pools, plan.num_splits, workspace)
        bound = kernel.bind(params, batch=batch, num_kv_heads=problem.num_kv_heads, num_splits=plan.num_splits,
                            device=device, pdl=enable_pdl)
        words = bound.words
        words[_PAGE_TABLE], words[_SEQ_LENS] = page_table.data_ptr(), seq_lens.data_ptr()
        for index, t in ((_SINKS, sinks), (_MASK, mask), (_Q_CU_SEQ_LENS, q_cu_seq_lens), (_Q_SCALE, q_scale),
                         (_KV_SCALE, kv_scale)):
            if isinstance(t, torch.Tensor):
                words[index] = t.data_ptr()
        self._bound, self.plan_info = bound, plan
        self._keep = (page_table, seq_lens, mask, sinks, q_cu_seq_lens, q_scale, kv_scale, workspace)  # what launches read

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Launch the planned decode for one layer on torch's current stream; returns ``out``.

        The tensors must match the plan (shapes, strides, dtypes, device, 16-byte aligned); nothing
        is checked here.
        """
        bound = self._bound
        if bound is None:
            raise RuntimeError("DecodeWrapper.run: call plan() first")
        words = bound.words
        words[_Q] = q.data_ptr()
        words[_K] = k_cache.data_ptr()
        words[_V] = v_cache.data_ptr()
        words[_OUT] = out.data_ptr()
        bound.refresh()
        bound()
        return out
