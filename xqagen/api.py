"""The user-facing decode call: problem -> plan -> pack -> bind -> launch.

1. :func:`xqagen.problem.describe` checks every argument before anything is launched and describes
   the problem (a bad argument raises ``ValueError``/``TypeError`` naming it);
2. :func:`xqagen.plan.plan_launch` picks the variant (path, tile) and the split count;
3. the variant's path packs the kernel parameters;
4. :mod:`xqagen.runtime` binds them to the loaded kernel and launches on torch's current stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._torch import torch

from .emitters import LaunchShape
from .plan import LaunchPlan, plan_launch
from .problem import DTYPE_NAMES, TORCH_DTYPES, describe, fail
from .runtime import BoundLaunch, DecodeKernel, Workspace, default_workspace, get_kernel, supports_pdl

__all__ = ["DTYPE_NAMES", "TORCH_DTYPES", "DecodeCall", "prepare_decode", "xqa_decode"]


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
    enable_pdl: bool = False,
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
    enable_pdl: programmatic dependent launch (sm_90+): the kernel may start while the previous
    kernel on the stream finishes, and waits for its writes before reading anything.  Off by
    default: back-to-back decodes measured slower with it on an H100 (docs/benchmarks.md).
    Returns ``out`` (allocated when not given) with q's shape.
    """
    return prepare_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, out_dtype=out_dtype,
                          kv_layout=kv_layout, q_scale=q_scale, kv_scale=kv_scale, rcp_out_scale=rcp_out_scale,
                          sinks=sinks, sliding_window=sliding_window, mask=mask, q_cu_seq_lens=q_cu_seq_lens,
                          q_seq_len=q_seq_len, num_splits=num_splits,
                          workspace=workspace, tile=tile, enable_pdl=enable_pdl, validate=validate,
                          cache_dir=cache_dir).launch()


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
                   q_cu_seq_lens=None, q_seq_len=None, num_splits=None, workspace=None, tile=None,
                   enable_pdl=False, validate=True, cache_dir=None, sm_count=None) -> DecodeCall:
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
                       validate=validate)
    spec = problem.spec(tile=tile)
    # Every argument is checked first, so that a CPU tensor reports its real mistakes too.
    device = problem.device
    if device.type != "cuda":
        fail("q", "CUDA tensors (the kernels run on NVIDIA GPUs)", f"tensors on {device}")
    if enable_pdl and not supports_pdl(device):
        fail("enable_pdl", "False on a GPU older than sm_90 (programmatic dependent launch needs sm_90+)",
             f"True on {torch.cuda.get_device_name(device)}")

    workspace = default_workspace(device) if workspace is None else workspace
    if sm_count is None:
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    plan = plan_launch(spec, LaunchShape(problem.batch, problem.num_kv_heads, problem.kv_len, sm_count),
                       tile_given=tile is not None, num_splits=num_splits, workspace=workspace.size)
    kernel = get_kernel(plan.spec, cache_dir=cache_dir)
    params = kernel.path.pack(plan.spec, problem, plan.num_splits, workspace)
    bound = kernel.bind(params, batch=problem.batch, num_kv_heads=problem.num_kv_heads, num_splits=plan.num_splits,
                        device=device, pdl=enable_pdl)
    return DecodeCall(plan, kernel, problem.out, bound)
