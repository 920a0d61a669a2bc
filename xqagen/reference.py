"""Pure-torch reference of the XQA decode-attention contract: the executable definition of what a
launch computes, which every kernel is tested against.  Runs on any device.

Inputs (shapes of FlashInfer 0.6.0's ``xqa``)
---------------------------------------------
``q``
    ``[batch, 1, num_q_heads, head_dim]`` (one new token per request) or
    ``[batch, 1, q_seq_len, num_q_heads, head_dim]`` (speculative decoding); fp16 or bf16.
``k_cache``, ``v_cache``
    Page pools, ``[num_pages, page_size, num_kv_heads, head_dim]`` ("NHD") or
    ``[num_pages, num_kv_heads, page_size, head_dim]`` ("HND"), any strides; q's dtype or
    ``float8_e4m3fn``.
``page_table``
    int32 ``[batch, max_pages_per_seq]``: KV position ``t`` of request ``b`` is row ``t % page_size``
    of page ``page_table[b, t // page_size]``.  Only a request's first ``ceil(seq_len / page_size)``
    entries are read; the rest may hold anything.
``seq_lens``
    ``[batch]`` or ``[batch, 1]``: each request's KV length **including** its ``q_seq_len`` new
    tokens, whose K/V are already in the cache at positions ``seq_len - q_seq_len .. seq_len - 1``.

Query head ``h`` attends with KV head ``h // group``, ``group = num_q_heads // num_kv_heads``.

Semantics, for request ``b`` (``L = seq_lens[b]``), query token ``i`` and query head ``h``
------------------------------------------------------------------------------------------
Scores over KV positions ``j`` in ``[0, L)``::

    16-bit KV:  s_j = q_scale            * (q . k_j) / sqrt(head_dim)
    fp8 KV:     s_j = q_scale * kv_scale * (q . k_j) / sqrt(head_dim)

Position ``j`` is visible to query token ``i`` when both hold:

* mask: ``j < L - q_seq_len`` (the history), or bit ``j - (L - q_seq_len)`` of row ``i`` of the
  request's packed mask is set (layout in :mod:`xqagen.masks`).  ``q_seq_len > 1`` requires a
  mask; with ``q_seq_len == 1`` it is optional (no mask: everything is visible).
* sliding window ``W > 0``: query token ``i`` sits at position ``p = L - q_seq_len + i`` and sees
  ``j > p - W``, so with a causal or tree mask its window is ``(p - W, p]``: each draft token has
  its own window, as in FlashInfer 0.7.2 (0.6.0 anchored every token's window at ``L - W``).  With
  ``q_seq_len == 1``, ``p = L - 1``.  ``W = 0``: no window.

Short and empty requests: ``L`` may be smaller than ``q_seq_len`` (a padding row of a CUDA-graph
batch, or a request with fewer new tokens).  Positions are still ``0 .. L - 1``; query token ``i``
sits at ``p = L - q_seq_len + i``, mask bits of positions before 0 are ignored, and a query token
whose visible set is empty gets zeros.  ``L = 0`` reads no KV and gives zeros.

Softmax, with an optional sink logit ``sink`` of head ``h``, over the visible set ``V``::

    m = max(max_{j in V} s_j, sink)
    o = sum_{j in V} exp(s_j - m) v_j / (sum_{j in V} exp(s_j - m) + exp(sink - m))

Without sinks the ``exp(sink - m)`` term is absent.  The sink adds to the denominator only.

Output scaling and rounding::

    16-bit KV:           o                              (kv_scale and rcp_out_scale are ignored)
    fp8 KV:              o * kv_scale
    fp8 KV, fp8 output:  o * kv_scale * rcp_out_scale, saturated to [-448, 448], rounded to e4m3

then rounded to nearest in ``out_dtype`` (default q's dtype; float32/float64 keep the unrounded
values for comparisons).  ``rcp_out_scale`` applies to fp8 output only.

An empty visible set -- only when a tree mask hides a token's own position and the request has
no history, or the window hides every position the mask leaves -- has no softmax: the reference
returns zeros for that row (the empty numerator), with or without a sink.
"""

from __future__ import annotations

import math
from typing import Sequence

from ._torch import torch

from .layouts import kv_layout as _layout
from .masks import _check_positive_int, _describe, unpack_mask, validate_mask

Q_DTYPES = (torch.float16, torch.bfloat16)
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, FP8)
COMPUTE_DTYPES = (torch.float32, torch.float64)
# make_paged_kv's fp8 caches hold standard-normal values times this; kv_scale = 1 / FP8_VALUE_SCALE
# brings them back to unit scale while the stored values use much of e4m3's range.
FP8_VALUE_SCALE = 32.0
RANDOM_CHUNK_ELEMS = 1 << 28  # fp32 values make_paged_kv generates at once (1 GiB)

Scale = float | torch.Tensor


def xqa_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    num_kv_heads: int,
    kv_layout: str = "NHD",
    q_scale: Scale = 1.0,
    kv_scale: Scale = 1.0,
    rcp_out_scale: Scale = 1.0,
    sinks: torch.Tensor | None = None,
    sliding_window: int = 0,
    mask: torch.Tensor | None = None,
    q_cu_seq_lens: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention output of shape ``q.shape`` and dtype ``out_dtype`` (default q's), on q's device.

    The semantics are the module's.  Scales are python numbers or one-element tensors; ``sinks`` is
    float32 ``[num_kv_heads, group]`` or ``[num_q_heads]``; ``mask`` holds packed int32/uint32 words
    ``[batch, q_seq_len, ceil(q_seq_len/32)]``.  Scores, softmax and ``P . V`` are computed in
    ``compute_dtype`` (float32 or float64).

    Ragged q (``q_cu_seq_lens``, ``[batch + 1]`` offsets): request ``b`` has the
    ``q_cu_seq_lens[b + 1] - q_cu_seq_lens[b]`` query tokens (0 allowed) at those rows of a packed
    ``q`` ``[total_q_tokens, num_q_heads, head_dim]`` and of ``mask`` ``[total_q_tokens, words]``,
    and is computed as a request with that many tokens.
    """
    if q_cu_seq_lens is not None:
        return _ragged_reference(q, k_cache, v_cache, page_table, seq_lens, q_cu_seq_lens, mask=mask,
                                 out_dtype=out_dtype, num_kv_heads=num_kv_heads, kv_layout=kv_layout, q_scale=q_scale,
                                 kv_scale=kv_scale, rcp_out_scale=rcp_out_scale, sinks=sinks,
                                 sliding_window=sliding_window, compute_dtype=compute_dtype)
    _check_dtype("q", q, Q_DTYPES)
    if q.dim() not in (4, 5) or q.shape[1] != 1:
        raise ValueError("q must have shape [batch, 1, num_q_heads, head_dim] or "
                         f"[batch, 1, q_seq_len, num_q_heads, head_dim], got {list(q.shape)}")
    queries = q if q.dim() == 5 else q.unsqueeze(2)
    batch, _, q_seq_len, num_q_heads, head_dim = queries.shape
    _check_positive_int("num_kv_heads", num_kv_heads)
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads = {num_q_heads} (from q) must be a multiple of num_kv_heads = {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    page_size = _check_caches(k_cache, v_cache, q, kv_layout, num_kv_heads, head_dim)
    lengths = _check_lengths(seq_lens, page_table, batch, q_seq_len, page_size, k_cache.shape[0])
    fp8_kv = k_cache.dtype == FP8
    if compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype}")
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if out_dtype == FP8 and not fp8_kv:
        raise ValueError("out_dtype = torch.float8_e4m3fn needs a float8_e4m3fn KV cache, "
                         f"got {k_cache.dtype}")
    if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 0:
        raise ValueError(f"sliding_window must be an integer >= 0 (0: no window), got {sliding_window!r}")
    sink_logits = _check_sinks(sinks, num_kv_heads, group)
    if mask is None and q_seq_len > 1:
        raise ValueError(f"mask is required when q_seq_len > 1 (q_seq_len = {q_seq_len})")
    if mask is not None:
        validate_mask(mask, q_seq_len, batch=batch, name="mask")

    device = q.device
    q_factor = _scale_value("q_scale", q_scale)
    kv_factor = _scale_value("kv_scale", kv_scale)
    out_factor = _scale_value("rcp_out_scale", rcp_out_scale)
    if not fp8_kv:
        kv_factor = 1.0  # 16-bit KV ignores kv_scale (and, having no fp8 output, rcp_out_scale)
    qk_scale = q_factor * kv_factor / math.sqrt(head_dim)
    out_scale = kv_factor * (out_factor if out_dtype == FP8 else 1.0)
    allowed = None if mask is None else unpack_mask(mask.to(device), q_seq_len)
    if sink_logits is not None:
        sink_logits = sink_logits.to(device=device, dtype=compute_dtype)

    out = torch.empty(batch, q_seq_len, num_q_heads, head_dim, dtype=compute_dtype, device=device)
    for b, seq_len in enumerate(lengths):
        if seq_len == 0:  # a padding row: nothing to attend to
            out[b] = 0
            continue
        keys = _gather(k_cache, page_table[b], seq_len, page_size, kv_layout).to(compute_dtype)
        values = _gather(v_cache, page_table[b], seq_len, page_size, kv_layout).to(compute_dtype)
        # Heads h = kv_head * group + g, so [num_q_heads, ...] splits into [num_kv_heads, group, ...]:
        # one batched matmul per KV head serves all group * q_seq_len query rows that share it.
        rows = queries[b, 0].transpose(0, 1).reshape(num_kv_heads, group * q_seq_len, head_dim).to(compute_dtype)
        scores = (rows @ keys.transpose(1, 2) * qk_scale).view(num_kv_heads, group, q_seq_len, seq_len)
        visible = _visibility(seq_len, q_seq_len, None if allowed is None else allowed[b], sliding_window, device)
        probs_v = _softmax_times_values(scores, visible, values, sink_logits)
        out[b] = probs_v.reshape(num_q_heads, q_seq_len, head_dim).transpose(0, 1)

    out = out * out_scale
    if out_dtype == FP8:
        # Saturate explicitly: torch's cast saturates on some paths but gives NaN on others.
        out = out.clamp(-FP8_MAX, FP8_MAX)
    return out.to(out_dtype).reshape(q.shape)


def _ragged_reference(q, k_cache, v_cache, page_table, seq_lens, q_cu_seq_lens, *, mask, out_dtype,
                      **kwargs) -> torch.Tensor:
    """xqa_reference over a packed q: each request as one with its own number of tokens."""
    if q.dim() != 3:
        raise ValueError(f"q must have shape [total_q_tokens, num_q_heads, head_dim] with q_cu_seq_lens, "
                         f"got {list(q.shape)}")
    offsets = q_cu_seq_lens.flatten().tolist()
    if offsets[0] != 0 or offsets[-1] != q.shape[0] or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"q_cu_seq_lens must rise from 0 to q.shape[0] = {q.shape[0]}, got {offsets}")
    out_dtype = q.dtype if out_dtype is None else out_dtype
    out = torch.zeros(q.shape, dtype=out_dtype, device=q.device)
    lens = seq_lens.flatten()
    for b, (first, end) in enumerate(zip(offsets, offsets[1:])):
        tokens = end - first
        if tokens == 0:
            continue
        request_q = q[first:end].unsqueeze(0).unsqueeze(0)  # [1, 1, tokens, heads, head_dim]
        request_mask = None if mask is None else mask[first:end].view(torch.int32).unsqueeze(0)
        if tokens == 1:
            request_q = request_q.squeeze(2)
        result = xqa_reference(request_q, k_cache, v_cache, page_table[b:b + 1], lens[b:b + 1], mask=request_mask,
                               out_dtype=out_dtype, **kwargs)
        out[first:end] = result.reshape(tokens, *q.shape[1:])
    return out


def make_paged_kv(
    batch: int,
    seq_lens: Sequence[int] | torch.Tensor,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    kv_layout: str = "NHD",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    shuffle: bool = True,
    extra_pages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random paged ``(k_cache, v_cache, page_table)`` holding ``batch`` requests of ``seq_lens``.

    The pool has ``sum(ceil(seq_len / page_size)) + extra_pages`` pages, all filled with random data
    (also the pages no request uses), so reading a wrong page changes the result.  fp16/bf16
    values are standard normal; float8_e4m3fn values are standard normal times
    :data:`FP8_VALUE_SCALE`, saturated to +-448 (use ``kv_scale = 1 / FP8_VALUE_SCALE``).

    ``page_table`` is int32 ``[batch, max(ceil(seq_len / page_size))]``; with ``shuffle`` the
    requests' pages are a random permutation of the pool, otherwise consecutive.  Entries past a
    request's last page are -1.  Random numbers come from ``generator`` on its own device (keep it
    on ``device`` for large caches); the results are moved to ``device``.
    """
    _check_positive_int("batch", batch)
    lengths = [int(n) for n in (seq_lens.flatten().tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens)]
    if len(lengths) != batch or min(lengths) < 0 or max(lengths) < 1:
        raise ValueError(f"seq_lens must hold {batch} (batch) lengths >= 0, not all 0, got {lengths}")
    for name, value in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("page_size", page_size)):
        _check_positive_int(name, value)
    if dtype not in Q_DTYPES + (FP8,):
        raise TypeError(f"dtype must be one of {Q_DTYPES + (FP8,)}, got {dtype}")
    layout = _layout(kv_layout)
    if not isinstance(extra_pages, int) or extra_pages < 0:
        raise ValueError(f"extra_pages must be an integer >= 0, got {extra_pages!r}")

    pages_per_seq = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages_per_seq) + extra_pages
    random_device = generator.device if generator is not None else device
    shape = layout.shape(num_pages, page_size, num_kv_heads, head_dim)

    def random_cache() -> torch.Tensor:  # in runs of pages, so that no fp32 copy of a large pool exists
        cache = torch.empty(shape, dtype=dtype, device=device)
        page_elems = cache[:1].numel() if num_pages else 1
        step = max(1, RANDOM_CHUNK_ELEMS // page_elems)
        for first in range(0, num_pages, step):
            data = torch.randn((min(step, num_pages - first), *shape[1:]), generator=generator,
                               device=random_device).to(device)
            if dtype == FP8:
                data = (data * FP8_VALUE_SCALE).clamp(-FP8_MAX, FP8_MAX)
            cache[first:first + step] = data.to(dtype)
        return cache

    k_cache, v_cache = random_cache(), random_cache()
    if shuffle:
        order = torch.randperm(num_pages, generator=generator, device=random_device).cpu()
    else:
        order = torch.arange(num_pages)
    page_table = torch.full((batch, max(pages_per_seq)), -1, dtype=torch.int32)
    first = 0
    for b, n in enumerate(pages_per_seq):
        page_table[b, :n] = order[first:first + n]
        first += n
    return k_cache, v_cache, page_table.to(device)


def relative_l2_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf if either holds a NaN or an infinity.

    Identical all-zero tensors give 0; a non-zero ``out`` against an all-zero ``ref`` gives inf.
    """
    if out.shape != ref.shape:
        raise ValueError(f"out and ref must have the same shape, got {list(out.shape)} and {list(ref.shape)}")
    out64 = out.detach().to(torch.float64)
    ref64 = ref.detach().to(device=out.device, dtype=torch.float64)
    if not (torch.isfinite(out64).all() and torch.isfinite(ref64).all()):
        return math.inf
    err = torch.linalg.vector_norm(out64 - ref64).item()
    norm = torch.linalg.vector_norm(ref64).item()
    if norm == 0:
        return 0.0 if err == 0 else math.inf
    return err / norm


def _gather(cache: torch.Tensor, pages_row: torch.Tensor, seq_len: int, page_size: int, kv_layout: str) -> torch.Tensor:
    """One request's ``[num_kv_heads, seq_len, head_dim]`` keys or values, copying only its pages."""
    pages = pages_row[: -(-seq_len // page_size)].to(device=cache.device, dtype=torch.long)
    blocks = cache.index_select(0, pages)
    # To [num_kv_heads, pages, page_size, head_dim], so that merging the middle dims gives positions.
    blocks = _layout(kv_layout).heads_pages_tokens(blocks)
    return blocks.reshape(blocks.shape[0], -1, blocks.shape[-1])[:, :seq_len]


def _visibility(seq_len: int, q_seq_len: int, allowed: torch.Tensor | None, sliding_window: int,
                device: torch.device) -> torch.Tensor:
    """``[q_seq_len, seq_len]`` bools: which KV positions each query token of the request sees."""
    visible = torch.ones(q_seq_len, seq_len, dtype=torch.bool, device=device)
    first_new = seq_len - q_seq_len  # position of query token 0; negative for a short request
    if allowed is not None:
        visible[:, max(first_new, 0):] = allowed[:, max(-first_new, 0):]
    if sliding_window:
        positions = torch.arange(seq_len, device=device)
        token_positions = first_new + torch.arange(q_seq_len, device=device)
        visible &= positions[None, :] > (token_positions - sliding_window)[:, None]
    return visible


def _softmax_times_values(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor,
                          sink_logits: torch.Tensor | None) -> torch.Tensor:
    """softmax(scores) . values over the visible positions, a sink adding to the denominator.

    scores ``[num_kv_heads, group, q_seq_len, seq_len]``, visible ``[q_seq_len, seq_len]``, values
    ``[num_kv_heads, seq_len, head_dim]``, sink_logits ``[num_kv_heads, group]`` or None; returns
    ``[num_kv_heads, group, q_seq_len, head_dim]``.
    """
    scores = scores.masked_fill(~visible, -math.inf)
    row_max = scores.amax(-1, keepdim=True)
    sink = None if sink_logits is None else sink_logits[..., None, None]
    if sink is not None:
        row_max = torch.maximum(row_max, sink)
    # An empty row without a sink has max -inf; shifting by 0 instead keeps its exps at 0, not NaN.
    row_max = row_max.masked_fill(row_max == -math.inf, 0.0)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink - row_max)
    # The maximum term contributes exp(0) = 1, so denom >= 1 unless the row is empty; then denom and
    # the numerator are 0, and clamping yields the documented zeros.
    probs_v = (weights.flatten(1, 2) @ values).view(*weights.shape[:3], values.shape[-1])
    return probs_v / denom.clamp_min(1.0)


def _check_dtype(name: str, tensor: object, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype not in dtypes:
        raise TypeError(f"{name} must be a tensor of dtype {' or '.join(map(str, dtypes))}, got {_describe(tensor)}")


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, kv_layout: str,
                  num_kv_heads: int, head_dim: int) -> int:
    """Validate the page pools against q; return the page size."""
    layout = _layout(kv_layout)
    kv_dtypes = (q.dtype, FP8)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_dtype(name, cache, kv_dtypes)
        if cache.dim() != 4 or layout.num_kv_heads(cache.shape) != num_kv_heads or cache.shape[3] != head_dim:
            raise ValueError(f"{name} must have shape {layout.dims} ({kv_layout}) with num_kv_heads = {num_kv_heads} "
                             f"and head_dim = {head_dim} (from q), got {list(cache.shape)}")
        if cache.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cache.device}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache must match k_cache ({k_cache.dtype} {list(k_cache.shape)}), "
                         f"got {v_cache.dtype} {list(v_cache.shape)}")
    return layout.page_size(k_cache.shape)


def _check_lengths(seq_lens: torch.Tensor, page_table: torch.Tensor, batch: int, q_seq_len: int, page_size: int,
                   num_pages: int) -> list[int]:
    """Validate seq_lens and the page-table entries they use; return the lengths as ints."""
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dtype.is_floating_point or seq_lens.dtype == torch.bool:
        raise TypeError(f"seq_lens must be an integer tensor, got {_describe(seq_lens)}")
    if seq_lens.shape not in ((batch,), (batch, 1)):
        raise ValueError(f"seq_lens must have shape [batch] or [batch, 1] with batch = {batch}, "
                         f"got {list(seq_lens.shape)}")
    _check_dtype("page_table", page_table, (torch.int32,))
    if page_table.dim() != 2 or page_table.shape[0] != batch:
        raise ValueError(f"page_table must have shape [batch, max_pages_per_seq] with batch = {batch}, "
                         f"got {list(page_table.shape)}")
    lengths = seq_lens.flatten().tolist()
    capacity = page_table.shape[1] * page_size
    table = page_table.cpu()
    for b, seq_len in enumerate(lengths):
        if not 0 <= seq_len <= capacity:
            raise ValueError(f"seq_lens[{b}] = {seq_len} must be in [0, max_pages_per_seq * page_size] "
                             f"= [0, {capacity}] (it includes the new tokens)")
        pages = table[b, : -(-seq_len // page_size)]
        bad = ((pages < 0) | (pages >= num_pages)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"page_table[{b}, {i}] = {int(pages[i])} is not a page of the pool [0, {num_pages})")
    return lengths


def _check_sinks(sinks: torch.Tensor | None, num_kv_heads: int, group: int) -> torch.Tensor | None:
    """Validate sinks; return them as ``[num_kv_heads, group]``."""
    if sinks is None:
        return None
    _check_dtype("sinks", sinks, (torch.float32,))
    if sinks.shape not in ((num_kv_heads, group), (num_kv_heads * group,)):
        raise ValueError(f"sinks must have shape [num_kv_heads, group] = [{num_kv_heads}, {group}] or "
                         f"[num_q_heads] = [{num_kv_heads * group}], got {list(sinks.shape)}")
    return sinks.reshape(num_kv_heads, group)


def _scale_value(name: str, value: Scale) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a python number or a one-element tensor, got {_describe(value)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a python number or a one-element tensor, got {_describe(value)}")
    return float(value)
