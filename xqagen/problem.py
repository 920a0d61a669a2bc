"""The first step of a decode call: check every argument and describe the problem.

:func:`describe` turns the tensors and options of :func:`xqagen.api.xqa_decode` into a
:class:`DecodeProblem`: shapes, dtypes, the KV layout's strides, features and scales, with every
argument checked first.  A bad argument raises ``ValueError`` or ``TypeError`` naming it and what
was expected.  Value checks that need the device's data (sequence lengths against the page table,
page indices against the pool) cost one host sync; they run with ``validate=True`` unless the
current stream is being captured into a CUDA graph.

The next steps (:mod:`xqagen.plan`: path, tile, split count; the path's ``pack``: kernel
parameters; :mod:`xqagen.runtime`: bind and launch) read only the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._torch import torch
from .layouts import KvLayout, kv_layout as _kv_layout
from .spec import HEAD_DIMS, HEAD_DIMS_RULE, MAX_GROUP, MAX_Q_SEQ_LEN, PAGE_SIZES, KernelSpec

# The torch dtype of each KernelSpec dtype name, and back.
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_INDEX_DTYPES = (torch.int32, torch.uint32)


def fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_tensor(name: str, t, *, device: torch.device | None, dtypes, ndims) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        fail(name, f"dtype in {[str(d) for d in dtypes]}", t.dtype)
    if t.dim() not in ndims:
        fail(name, f"{' or '.join(map(str, ndims))} dimensions", f"shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        fail(name, f"a tensor on {device}", t.device)


def _check_rows_16b(name: str, t: torch.Tensor) -> None:
    """Head-dim rows are read as 16-byte vectors: contiguous last dim, aligned pointer and strides."""
    if t.stride(-1) != 1:
        fail(name, "a contiguous last (head_dim) dimension", f"strides {t.stride()}")
    align = 16 // t.element_size()
    if t.data_ptr() % 16 or any(s % align for s in t.stride()[:-1]):
        fail(name, "a 16-byte aligned data pointer and strides that are multiples of 16 bytes",
             f"pointer offset {t.data_ptr() % 16}, strides {t.stride()}")


def _scale(name: str, value, device: torch.device) -> tuple[float, int]:
    """(host value, device pointer or 0): FlashInfer accepts a float or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype != torch.float32 or value.device != device:
            fail(name, f"a float or a one-element float32 tensor on {device}",
                 f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}")
        return 1.0, value.data_ptr()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float or a one-element float32 tensor, got {type(value).__name__}")
    return float(value), 0


@dataclass(frozen=True)
class DecodeProblem:
    """One validated decode: the tensors, their shapes and layout, features and scales."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    out: torch.Tensor
    sinks: torch.Tensor | None
    mask: torch.Tensor | None
    q_cu_seq_lens: torch.Tensor | None  # ragged q: [batch + 1] token offsets into the packed q
    layout: KvLayout
    batch: int
    num_kv_heads: int
    group: int
    head_dim: int
    q_seq_len: int
    page_size: int
    sliding_window: int
    q_scale: tuple[float, int]  # (value, device pointer or 0)
    kv_scale: tuple[float, int]
    rcp_out_scale: float
    fp8_mma: bool = False  # the opt-in fp8 MMA mode: Q and P quantised to e4m3 (the Hopper path)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def kv_len(self) -> int:
        """The longest KV range one CTA row walks: the page table's capacity in tokens, or the
        window's last ``sliding_window`` positions."""
        capacity = self.page_table.shape[1] * self.page_size
        return min(capacity, self.sliding_window) if self.sliding_window else capacity

    def spec(self, *, path: str = "generic", tile=None) -> KernelSpec:
        """The kernel variant these arguments need, on ``tile`` (None: the path's default)."""
        features = {name for name, on in (("sinks", self.sinks is not None),
                                          ("sliding_window", self.sliding_window > 0),
                                          ("ragged_q", self.q_cu_seq_lens is not None),
                                          ("fp8_mma", self.fp8_mma)) if on}
        return KernelSpec(q_dtype=DTYPE_NAMES[self.q.dtype], kv_dtype=DTYPE_NAMES[self.k_cache.dtype],
                          out_dtype=DTYPE_NAMES[self.out.dtype], head_dim=self.head_dim, group=self.group,
                          page_size=self.page_size, q_seq_len=self.q_seq_len, features=frozenset(features),
                          path=path, tile=tile)

    def params(self) -> dict:
        """Every field of the kernel-parameter struct (xqagen.emitters.params) that the problem
        fixes: pointers, strides, scales and features; the plan adds splits and workspace."""
        q, out = self.q, self.out
        stride_page, stride_token, stride_head = self.layout.strides(self.k_cache)
        if self.q_cu_seq_lens is not None:  # packed [total_q_tokens, heads, head_dim]
            token_strides = dict(q_stride_batch=0, q_stride_token=q.stride(0), out_stride_batch=0,
                                 out_stride_token=out.stride(0))
        else:
            token_strides = dict(q_stride_batch=q.stride(0), q_stride_token=q.stride(2) if q.dim() == 5 else 0,
                                 out_stride_batch=out.stride(0),
                                 out_stride_token=out.stride(2) if out.dim() == 5 else 0)
        return dict(
            q=q.data_ptr(), k=self.k_cache.data_ptr(), v=self.v_cache.data_ptr(),
            page_table=self.page_table.data_ptr(), seq_lens=self.seq_lens.data_ptr(), out=out.data_ptr(),
            sinks=self.sinks.data_ptr() if self.sinks is not None else 0,
            mask=self.mask.data_ptr() if self.mask is not None else 0,
            q_cu_seq_lens=self.q_cu_seq_lens.data_ptr() if self.q_cu_seq_lens is not None else 0,
            q_scale_ptr=self.q_scale[1], kv_scale_ptr=self.kv_scale[1], **token_strides, q_stride_head=q.stride(-2),
            kv_stride_page=stride_page, kv_stride_token=stride_token, kv_stride_head=stride_head,
            out_stride_head=out.stride(-2), page_table_stride=self.page_table.stride(0),
            q_scale=self.q_scale[0], kv_scale=self.kv_scale[0], rcp_out_scale=self.rcp_out_scale,
            seq_lens_stride=self.seq_lens.stride(0), mask_words_per_row=(self.q_seq_len + 31) // 32,
            window=self.sliding_window, num_kv_heads=self.num_kv_heads,
            num_pages=self.k_cache.shape[0], max_pages_per_seq=self.page_table.shape[1], total_q_tokens=q.shape[0],
        )


def describe(q, k_cache, v_cache, page_table, seq_lens, *, out=None, out_dtype=None, kv_layout="NHD",
             q_scale=1.0, kv_scale=1.0, rcp_out_scale=1.0, sinks=None, sliding_window=0, mask=None,
             q_cu_seq_lens=None, q_seq_len=None, fp8_mma=False, validate=True) -> DecodeProblem:
    """Check the arguments of :func:`xqagen.api.xqa_decode` and describe the problem; allocates
    ``out`` when it is None."""
    ragged = q_cu_seq_lens is not None
    _check_tensor("q", q, device=None, dtypes=(torch.float16, torch.bfloat16), ndims=(3,) if ragged else (4, 5))
    device = q.device
    num_q_heads, head_dim = q.shape[-2], q.shape[-1]
    if ragged:
        _check_tensor("q_cu_seq_lens", q_cu_seq_lens, device=device, dtypes=_INDEX_DTYPES, ndims=(1,))
        if q_cu_seq_lens.shape[0] < 2 or not q_cu_seq_lens.is_contiguous():
            fail("q_cu_seq_lens", "a contiguous tensor of shape [batch + 1]", f"shape {tuple(q_cu_seq_lens.shape)}")
        batch = q_cu_seq_lens.shape[0] - 1
        if not isinstance(q_seq_len, int) or isinstance(q_seq_len, bool):
            fail("q_seq_len", "the largest number of query tokens of a request (an int) with q_cu_seq_lens",
                 repr(q_seq_len))
    else:
        if q.shape[1] != 1:
            fail("q", "beam width 1 (q.shape[1] == 1)", f"shape {tuple(q.shape)}")
        batch = q.shape[0]
        inferred = q.shape[2] if q.dim() == 5 else 1
        if q_seq_len is not None and q_seq_len != inferred:
            fail("q_seq_len", f"{inferred} (q has shape {tuple(q.shape)}) or None", repr(q_seq_len))
        q_seq_len = inferred
    if head_dim not in HEAD_DIMS:
        fail("q", f"head_dim (last dimension) {HEAD_DIMS_RULE}", head_dim)
    if not 1 <= q_seq_len <= MAX_Q_SEQ_LEN:
        fail("q_seq_len" if ragged else "q", f"q_seq_len (dimension 2 of a 5-D q) in [1, {MAX_Q_SEQ_LEN}]", q_seq_len)
    if batch < 1 or batch > 65535:
        fail("q", "a batch size in [1, 65535]", batch)
    _check_rows_16b("q", q)

    # ---- KV cache ----
    layout = _kv_layout(kv_layout)
    kv_dtypes = (q.dtype, torch.float8_e4m3fn)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, device=device, dtypes=kv_dtypes, ndims=(4,))
        _check_rows_16b(name, cache)
    if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        fail("v_cache", "the dtype, shape and strides of k_cache",
             f"{v_cache.dtype} {tuple(v_cache.shape)} strides {v_cache.stride()} vs "
             f"{k_cache.dtype} {tuple(k_cache.shape)} strides {k_cache.stride()}")
    num_pages = k_cache.shape[0]
    page_size, num_kv_heads = layout.page_size(k_cache.shape), layout.num_kv_heads(k_cache.shape)
    if k_cache.shape[3] != head_dim:
        fail("k_cache", f"head_dim {head_dim} (q's last dimension)", k_cache.shape[3])
    if page_size not in PAGE_SIZES:
        fail("k_cache", f"a page size in {PAGE_SIZES} ({kv_layout} layout)", page_size)
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        fail("k_cache", f"a number of KV heads dividing num_q_heads = {num_q_heads} ({kv_layout} layout)",
             num_kv_heads)
    group = num_q_heads // num_kv_heads
    if group > MAX_GROUP:
        fail("q", f"at most {MAX_GROUP} query heads per KV head", group)
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn

    # ---- page table, sequence lengths ----
    _check_tensor("page_table", page_table, device=device, dtypes=(torch.int32,), ndims=(2,))
    if page_table.shape[0] != batch or page_table.stride(1) != 1:
        fail("page_table", f"shape [{batch}, max_pages] with a contiguous last dimension",
             f"shape {tuple(page_table.shape)}, strides {page_table.stride()}")
    _check_tensor("seq_lens", seq_lens, device=device, dtypes=_INDEX_DTYPES, ndims=(1, 2))
    if seq_lens.shape[0] != batch or (seq_lens.dim() == 2 and seq_lens.shape[1] != 1):
        fail("seq_lens", f"shape [{batch}] or [{batch}, 1]", f"shape {tuple(seq_lens.shape)}")

    # ---- output ----
    out_torch_dtype = out_dtype if out_dtype is not None else (out.dtype if out is not None else q.dtype)
    if out_torch_dtype not in (q.dtype, torch.float8_e4m3fn):
        fail("out_dtype", f"{q.dtype} or torch.float8_e4m3fn", out_torch_dtype)
    if out_torch_dtype == torch.float8_e4m3fn and not kv_fp8:
        fail("out_dtype", "a 16-bit output with a 16-bit KV cache (fp8 output needs an fp8 cache)", out_torch_dtype)
    if out is None:
        out = torch.empty(q.shape, dtype=out_torch_dtype, device=device)
    else:
        _check_tensor("out", out, device=device, dtypes=(out_torch_dtype,), ndims=(q.dim(),))
        if out.shape != q.shape:
            fail("out", f"q's shape {tuple(q.shape)}", tuple(out.shape))
        if out.stride(-1) != 1 or out.data_ptr() % 16 or any(s % 8 for s in out.stride()[:-1]):
            fail("out", "a contiguous head_dim, 16-byte aligned pointer and strides that are multiples of 8",
                 f"strides {out.stride()}")

    # ---- features ----
    if sinks is not None:
        _check_tensor("sinks", sinks, device=device, dtypes=(torch.float32,), ndims=(1, 2))
        if sinks.numel() != num_q_heads or not sinks.is_contiguous():
            fail("sinks", f"a contiguous float32 tensor of shape [{num_kv_heads}, {group}]", tuple(sinks.shape))
    if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 0:
        fail("sliding_window", "an integer >= 0 (0: no window)", repr(sliding_window))
    if q_seq_len > 1:
        if mask is None:
            fail("mask", f"a packed speculative-decoding mask for q_seq_len = {q_seq_len}", None)
        _check_tensor("mask", mask, device=device, dtypes=(torch.int32, torch.uint32, torch.uint16),
                      ndims=(2,) if ragged else (3,))
        words = (q_seq_len + 31) // 32 * (2 if mask.dtype == torch.uint16 else 1)
        rows = (q.shape[0],) if ragged else (batch, q_seq_len)  # ragged: rows packed like q
        if tuple(mask.shape) != (*rows, words) or not mask.is_contiguous():
            fail("mask", f"a contiguous tensor of shape {list((*rows, words))} ({mask.dtype})",
                 f"shape {tuple(mask.shape)}")
    elif mask is not None:
        fail("mask", "None when q_seq_len == 1", f"a tensor of shape {tuple(mask.shape)}")

    if not isinstance(fp8_mma, bool):
        fail("fp8_mma", "a bool", repr(fp8_mma))
    if fp8_mma and not kv_fp8:
        fail("fp8_mma", "False with a 16-bit KV cache (the fp8 MMA mode multiplies an e4m3 cache)", True)

    q_scale = _scale("q_scale", q_scale, device)
    kv_scale = _scale("kv_scale", kv_scale, device)
    if not isinstance(rcp_out_scale, (int, float)) or isinstance(rcp_out_scale, bool):
        raise TypeError(f"rcp_out_scale: expected a float, got {type(rcp_out_scale).__name__}")
    if validate and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _check_values(seq_lens, page_table, page_size, num_pages)
        if ragged:
            _check_token_offsets(q_cu_seq_lens, q_seq_len, q.shape[0])
    return DecodeProblem(q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, seq_lens=seq_lens, out=out,
                         sinks=sinks, mask=mask, q_cu_seq_lens=q_cu_seq_lens, layout=layout, batch=batch, num_kv_heads=num_kv_heads, group=group,
                         head_dim=head_dim, q_seq_len=q_seq_len, page_size=page_size, sliding_window=sliding_window,
                         q_scale=q_scale, kv_scale=kv_scale, rcp_out_scale=float(rcp_out_scale), fp8_mma=fp8_mma)


def _check_values(seq_lens, page_table, page_size, num_pages) -> None:
    """Sequence lengths within the page table, and the pages they use inside the pool (one sync)."""
    lens = seq_lens.reshape(-1).to(torch.int64)
    max_pages = page_table.shape[1]
    used = (lens + page_size - 1) // page_size
    cols = torch.arange(max_pages, device=page_table.device)
    in_use = cols[None, :] < used[:, None]
    bad_page = in_use & ((page_table < 0) | (page_table >= num_pages))
    summary = torch.stack([lens.min(), lens.max(), bad_page.any().to(torch.int64)]).cpu()
    lo, hi, any_bad = (int(v) for v in summary)
    if lo < 0:
        fail("seq_lens", "every length >= 0 (lengths include the new tokens; 0: a padding row)", lo)
    if hi > max_pages * page_size:
        fail("seq_lens", f"every length <= page_table.shape[1] * page_size = {max_pages * page_size}", hi)
    if any_bad:
        row, col = (int(v) for v in bad_page.nonzero()[0].cpu())
        fail("page_table", f"page indices in [0, {num_pages}) for the pages a sequence uses",
             f"page_table[{row}, {col}] = {int(page_table[row, col])}")


def _check_token_offsets(q_cu_seq_lens, q_seq_len, total_q_tokens) -> None:
    """Ragged q: offsets from 0 to q's rows, each request at most q_seq_len tokens (one sync)."""
    cu = q_cu_seq_lens.to(torch.int64)
    counts = cu[1:] - cu[:-1]
    first, last, lo, hi = (int(v) for v in torch.stack([cu[0], cu[-1], counts.min(), counts.max()]).cpu())
    if first != 0 or last != total_q_tokens:
        fail("q_cu_seq_lens", f"offsets from 0 to q.shape[0] = {total_q_tokens}", f"{first} .. {last}")
    if lo < 0 or hi > q_seq_len:
        fail("q_cu_seq_lens", f"between 0 and q_seq_len = {q_seq_len} tokens per request", f"{lo} .. {hi}")
