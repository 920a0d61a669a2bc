"""Drop-in replacements for FlashInfer 0.7.2's XQA entry points (0.6.0's calls work unchanged).

``from xqagen.flashinfer_compat import xqa`` replaces ``from flashinfer.xqa import xqa``, and
``xqa_batch_decode_with_kv_cache`` replaces ``flashinfer.decode.xqa_batch_decode_with_kv_cache``:
same signatures, same argument conventions (uint32 ``seq_lens``, uint16 masks, caller-owned
workspace and semaphores), same results.  Differences, all of them relaxations:

* any sm_80+ GPU (FlashInfer's XQA needs sm_90+), and sinks, windows and ragged q combine with
  speculative decoding on one kernel;
* NVFP4 scale caches (``k_sf_cache``/``v_sf_cache``, ``kv_cache_sf``) are not supported: passing
  one raises ``ValueError``;
* ``sm_count`` only informs the split-KV heuristic;
* ``enable_pdl`` (programmatic dependent launch, sm_90+) is honoured, but ``None`` means off where
  FlashInfer turns it on: back-to-back decodes of both libraries measured slower with it on an H100
  (docs/benchmarks.md);
* every argument is validated before the first launch of each geometry (FlashInfer asserts on a
  few); values (sequence lengths, page indices) are not checked, so a call never synchronises.

Both lower to the ``torch.ops.xqagen.decode`` custom op (:mod:`xqagen.ops`), so they compile with
``torch.compile(fullgraph=True)`` and capture in CUDA graphs; eager calls skip its dispatcher.
"""

from __future__ import annotations

import math

from ._torch import torch

from .ops import launch
from .layouts import kv_layout as kv_layout_named

# FlashInfer's batch API reserves the first 8 MiB of its workspace for semaphores.
SEMAPHORE_BYTES = 8 << 20


def xqa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    output: torch.Tensor,
    workspace_buffer: torch.Tensor,
    semaphores: torch.Tensor,
    num_kv_heads: int,
    page_size: int,
    sinks: torch.Tensor | None = None,
    q_scale: float | torch.Tensor = 1.0,
    kv_scale: float | torch.Tensor = 1.0,
    sliding_win_size: int = 0,
    kv_layout: str = "NHD",
    sm_count: int | None = None,
    enable_pdl: bool | None = None,
    rcp_out_scale: float = 1.0,
    q_seq_len: int = 1,
    mask: torch.Tensor | None = None,
    *,
    q_cu_seq_lens: torch.Tensor | None = None,
    k_sf_cache: torch.Tensor | None = None,
    v_sf_cache: torch.Tensor | None = None,
) -> None:
    """``flashinfer.xqa.xqa``: writes attention of ``q`` over the paged cache into ``output``.

    ``semaphores`` (uint32) must be zero before the first call; every call leaves them zero.  With
    ``q_cu_seq_lens`` (int32 ``[batch + 1]``), q and output are packed ``[total_q_tokens,
    num_q_heads, head_dim]``, ``q_seq_len`` is the largest number of tokens of a request and the
    mask rows are packed like q.
    """
    if k_sf_cache is not None or v_sf_cache is not None:
        _no_nvfp4(k_sf_cache=k_sf_cache, v_sf_cache=v_sf_cache)
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q: expected a torch.Tensor, got {type(q).__name__}")
    if q_cu_seq_lens is None:
        inferred = q.shape[2] if q.dim() == 5 else 1
        if q_seq_len != inferred:
            raise ValueError(f"q_seq_len: expected {inferred} (q has shape {tuple(q.shape)}), got {q_seq_len}")
    layout = kv_layout_named(kv_layout)
    kv_shape = k_cache.shape if isinstance(k_cache, torch.Tensor) else ()  # read once: each read builds a Size
    if len(kv_shape) == 4:
        if layout.page_size(kv_shape) != page_size:
            raise ValueError(f"page_size: expected {layout.page_size(kv_shape)} (k_cache's {kv_layout} "
                             f"shape {tuple(kv_shape)}), got {page_size}")
        if layout.num_kv_heads(kv_shape) != num_kv_heads:
            raise ValueError(f"num_kv_heads: expected {layout.num_kv_heads(kv_shape)} (k_cache's {kv_layout} "
                             f"shape {tuple(kv_shape)}), got {num_kv_heads}")
    q_scale_tensor, q_scale = (q_scale, 1.0) if isinstance(q_scale, torch.Tensor) else (None, q_scale)
    kv_scale_tensor, kv_scale = (kv_scale, 1.0) if isinstance(kv_scale, torch.Tensor) else (None, kv_scale)
    launch(q, k_cache, v_cache, page_table, seq_lens, output, workspace_buffer, semaphores, sinks, mask, q_scale_tensor,
           kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_win_size, kv_layout, 0, sm_count or 0,
           bool(enable_pdl), q_cu_seq_lens, q_seq_len if q_cu_seq_lens is not None else 0)


def _no_nvfp4(**scale_caches) -> None:
    for name, value in scale_caches.items():
        if value is not None:
            raise ValueError(f"{name}: expected None; NVFP4 KV caches (scale-factor caches) are not supported, "
                             f"only fp16/bf16 and float8_e4m3fn caches")


def xqa_batch_decode_with_kv_cache(
    query: torch.Tensor,
    kv_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    workspace_buffer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    bmm1_scale: float | torch.Tensor = 1.0,
    bmm2_scale: float | torch.Tensor = 1.0,
    window_left: int = -1,
    out: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    kv_layout: str = "NHD",
    enable_pdl: bool | None = None,
    q_len_per_req: int | None = 1,
    o_scale: float | None = 1.0,
    mask: torch.Tensor | None = None,
    kv_cache_sf: torch.Tensor | None = None,
    q_cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``flashinfer.decode.xqa_batch_decode_with_kv_cache``.

    ``query`` is ``[batch * q_len_per_req, num_q_heads, head_dim]`` (the result, like FlashInfer's, is
    ``[batch, q_len_per_req, num_q_heads, head_dim]`` when ``q_len_per_req > 1``), or, with
    ``q_cu_seq_lens`` (ragged: each request its own number of tokens, at most ``q_len_per_req``),
    ``[total_q_tokens, num_q_heads, head_dim]`` and a result of that shape; ``kv_cache`` a ``(k, v)`` pair or
    one ``[num_pages, 1 or 2, ...]`` tensor; ``workspace_buffer`` must be zero before its first use
    (its first 8 MiB hold the split-KV semaphores).  The scales map onto the kernel's as
    ``kv_scale = bmm2_scale * o_scale``, ``q_scale = bmm1_scale / kv_scale * sqrt(head_dim)``,
    ``rcp_out_scale = 1 / o_scale``.  Float scales cost nothing per call.  A tensor scale is read by
    the kernel on the device (no sync), but the mapping is tensor arithmetic before the decode: one
    elementwise kernel for ``bmm2_scale * o_scale`` (none when ``o_scale`` is 1), and for ``q_scale``
    one when only ``bmm1_scale`` is a tensor, two when ``bmm2_scale`` is (a division by it); inside
    ``torch.compile`` they fuse into one.  Making them kernel-free needs the kernel to take the
    score scale and the output scale as the batch API defines them.
    """
    del max_seq_len  # the page table's width bounds the sequences
    if kv_cache_sf is not None:
        _no_nvfp4(kv_cache_sf=kv_cache_sf)
    if isinstance(kv_cache, tuple):
        k_cache, v_cache = kv_cache
    else:
        if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[1] not in (1, 2):
            raise ValueError("kv_cache: expected a (k_cache, v_cache) pair or a [num_pages, 1 or 2, ...] tensor, "
                             f"got {getattr(kv_cache, 'shape', type(kv_cache).__name__)}")
        k_cache, v_cache = (kv_cache[:, 0], kv_cache[:, 0]) if kv_cache.shape[1] == 1 else kv_cache.unbind(dim=1)
    query_shape = query.shape if isinstance(query, torch.Tensor) else ()  # read once: each read builds a Size
    if len(query_shape) != 3:
        raise ValueError(f"query: expected [num_tokens, num_q_heads, head_dim], got "
                         f"{getattr(query, 'shape', type(query).__name__)}")
    num_tokens, num_q_heads, head_dim = query_shape
    q_len = q_len_per_req or 1
    if q_cu_seq_lens is None:
        if num_tokens % q_len:
            raise ValueError(f"query: {num_tokens} tokens are not a multiple of q_len_per_req = {q_len}")
        if q_len > 1:  # as FlashInfer: the query (and a default output) become [batch, q_len, heads, dim]
            query = query.view(num_tokens // q_len, q_len, num_q_heads, head_dim)
    if out is None:
        out = torch.empty_like(query)
    if out.shape != query.shape:
        raise ValueError(f"out: expected shape {tuple(query.shape)}, got {tuple(out.shape)}")
    q, q_out = (query, out) if q_cu_seq_lens is not None else (query.unsqueeze(1), out.unsqueeze(1))
    o_scale = 1.0 if o_scale is None else o_scale
    kv_scale = bmm2_scale * o_scale if o_scale != 1.0 else bmm2_scale
    q_scale = bmm1_scale * (math.sqrt(head_dim) / kv_scale) if not isinstance(kv_scale, torch.Tensor) else \
        bmm1_scale * math.sqrt(head_dim) / kv_scale
    # A tensor scale becomes the one float32 the kernel reads (a view when it is one already).
    q_scale_tensor, q_scale = (q_scale.to(torch.float32).reshape(1), 1.0) if isinstance(q_scale, torch.Tensor) else \
        (None, q_scale)
    kv_scale_tensor, kv_scale = (kv_scale.to(torch.float32).reshape(1), 1.0) if isinstance(kv_scale, torch.Tensor) \
        else (None, kv_scale)
    if not isinstance(workspace_buffer, torch.Tensor) or workspace_buffer.nbytes <= SEMAPHORE_BYTES:
        raise ValueError(f"workspace_buffer: expected a tensor of more than {SEMAPHORE_BYTES} bytes")
    raw = workspace_buffer if workspace_buffer.dtype == torch.uint8 else workspace_buffer.view(torch.uint8)
    sinks_2d = sinks.reshape(kv_layout_named(kv_layout).num_kv_heads(k_cache.shape), -1) if sinks is not None else None
    launch(q, k_cache, v_cache, block_tables, seq_lens, q_out, raw[SEMAPHORE_BYTES:], raw[:SEMAPHORE_BYTES],
           sinks_2d, mask, q_scale_tensor, kv_scale_tensor, q_scale, kv_scale, 1.0 / o_scale,
           window_left + 1 if window_left >= 0 else 0, kv_layout, 0, 0, bool(enable_pdl), q_cu_seq_lens,
           q_len if q_cu_seq_lens is not None else 0)
    return out
