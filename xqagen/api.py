"""The user-facing decode call: validate tensors -> choose the variant -> launch its handle.

Every argument is checked before anything is launched, and a bad one raises ``ValueError`` or
``TypeError`` naming the argument and what was expected.  Value checks that need the device's data
(sequence lengths against the page table, page indices against the pool) cost one host sync; they
run when ``validate=True`` (the default) unless the current stream is being captured into a CUDA
graph, and can be switched off on hot paths whose inputs are known to be valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._torch import torch

from .emitters.params import KernelParams
from .dispatch import choose_spec, kv_range
from .runtime import BoundLaunch, DecodeKernel, Workspace, default_workspace, get_kernel, supports_pdl
from .spec import HEAD_DIMS, MAX_GROUP, MAX_Q_SEQ_LEN, PAGE_SIZES, KernelSpec, TileConfig

# The torch dtype of each KernelSpec dtype name, and back.
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_INDEX_DTYPES = (torch.int32, torch.uint32)


def _fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def _check_tensor(name: str, t, *, device: torch.device | None, dtypes, ndims) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        _fail(name, f"dtype in {[str(d) for d in dtypes]}", t.dtype)
    if t.dim() not in ndims:
        _fail(name, f"{' or '.join(map(str, ndims))} dimensions", f"shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        _fail(name, f"a tensor on {device}", t.device)


def _check_rows_16b(name: str, t: torch.Tensor) -> None:
    """Head-dim rows are read as 16-byte vectors: contiguous last dim, aligned pointer and strides."""
    if t.stride(-1) != 1:
        _fail(name, "a contiguous last (head_dim) dimension", f"strides {t.stride()}")
    align = 16 // t.element_size()
    if t.data_ptr() % 16 or any(s % align for s in t.stride()[:-1]):
        _fail(name, "a 16-byte aligned data pointer and strides that are multiples of 16 bytes",
              f"pointer offset {t.data_ptr() % 16}, strides {t.stride()}")


def _scale(name: str, value, device: torch.device) -> tuple[float, int]:
    """(host value, device pointer or 0): FlashInfer accepts a float or a one-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype != torch.float32 or value.device != device:
            _fail(name, f"a float or a one-element float32 tensor on {device}",
                  f"{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}")
        return 1.0, value.data_ptr()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a float or a one-element float32 tensor, got {type(value).__name__}")
    return float(value), 0


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
    num_splits: int | None = None,
    workspace: Workspace | None = None,
    tile: TileConfig | str | None = None,
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
    num_splits: split-KV count (None: chosen from the grid, the SM count and max sequence length).
    enable_pdl: programmatic dependent launch (sm_90+): the kernel may start while the previous
    kernel on the stream finishes, and waits for its writes before reading anything.  Off by
    default: back-to-back decodes measured slower with it on an H100 (docs/benchmarks.md).
    Returns ``out`` (allocated when not given) with q's shape.
    """
    return prepare_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, out_dtype=out_dtype,
                          kv_layout=kv_layout, q_scale=q_scale, kv_scale=kv_scale, rcp_out_scale=rcp_out_scale,
                          sinks=sinks, sliding_window=sliding_window, mask=mask, num_splits=num_splits,
                          workspace=workspace, tile=tile, enable_pdl=enable_pdl, validate=validate,
                          cache_dir=cache_dir).launch()


@dataclass
class DecodeCall:
    """A validated call: the chosen variant, its handle, the split count and the bound launch.

    ``launch()`` may be repeated (e.g. in a benchmark loop or while capturing a graph); it reads the
    tensors the call was prepared with, so new data must be written into those same tensors.
    """

    spec: KernelSpec
    kernel: DecodeKernel
    num_splits: int
    out: torch.Tensor
    bound: BoundLaunch

    def launch(self) -> torch.Tensor:
        self.bound()
        return self.out


def prepare_decode(q, k_cache, v_cache, page_table, seq_lens, *, out=None, out_dtype=None, kv_layout="NHD",
                   q_scale=1.0, kv_scale=1.0, rcp_out_scale=1.0, sinks=None, sliding_window=0, mask=None,
                   num_splits=None, workspace=None, tile=None, enable_pdl=False, validate=True, cache_dir=None,
                   sm_count=None) -> DecodeCall:
    """Validate the arguments of :func:`xqa_decode` and pick its kernel, without launching."""
    _check_tensor("q", q, device=None, dtypes=(torch.float16, torch.bfloat16), ndims=(4, 5))
    device = q.device
    if q.shape[1] != 1:
        _fail("q", "beam width 1 (q.shape[1] == 1)", f"shape {tuple(q.shape)}")
    batch, num_q_heads, head_dim = q.shape[0], q.shape[-2], q.shape[-1]
    q_seq_len = q.shape[2] if q.dim() == 5 else 1
    if head_dim not in HEAD_DIMS:
        _fail("q", f"head_dim (last dimension) in {HEAD_DIMS}", head_dim)
    if not 1 <= q_seq_len <= MAX_Q_SEQ_LEN:
        _fail("q", f"q_seq_len (dimension 2 of a 5-D q) in [1, {MAX_Q_SEQ_LEN}]", q_seq_len)
    if batch < 1 or batch > 65535:
        _fail("q", "a batch size in [1, 65535]", batch)
    _check_rows_16b("q", q)

    # ---- KV cache ----
    if kv_layout not in ("NHD", "HND"):
        _fail("kv_layout", "'NHD' or 'HND'", repr(kv_layout))
    kv_dtypes = (q.dtype, torch.float8_e4m3fn)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, device=device, dtypes=kv_dtypes, ndims=(4,))
        _check_rows_16b(name, cache)
    if v_cache.dtype != k_cache.dtype or v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        _fail("v_cache", "the dtype, shape and strides of k_cache",
              f"{v_cache.dtype} {tuple(v_cache.shape)} strides {v_cache.stride()} vs "
              f"{k_cache.dtype} {tuple(k_cache.shape)} strides {k_cache.stride()}")
    num_pages = k_cache.shape[0]
    if kv_layout == "NHD":
        page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
        stride_page, stride_token, stride_head = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    else:
        num_kv_heads, page_size = k_cache.shape[1], k_cache.shape[2]
        stride_page, stride_head, stride_token = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    if k_cache.shape[3] != head_dim:
        _fail("k_cache", f"head_dim {head_dim} (q's last dimension)", k_cache.shape[3])
    if page_size not in PAGE_SIZES:
        _fail("k_cache", f"a page size in {PAGE_SIZES} ({kv_layout} layout)", page_size)
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        _fail("k_cache", f"a number of KV heads dividing num_q_heads = {num_q_heads} ({kv_layout} layout)",
              num_kv_heads)
    group = num_q_heads // num_kv_heads
    if group > MAX_GROUP:
        _fail("q", f"at most {MAX_GROUP} query heads per KV head", group)
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn

    # ---- page table, sequence lengths ----
    _check_tensor("page_table", page_table, device=device, dtypes=(torch.int32,), ndims=(2,))
    if page_table.shape[0] != batch or page_table.stride(1) != 1:
        _fail("page_table", f"shape [{batch}, max_pages] with a contiguous last dimension",
              f"shape {tuple(page_table.shape)}, strides {page_table.stride()}")
    _check_tensor("seq_lens", seq_lens, device=device, dtypes=_INDEX_DTYPES, ndims=(1, 2))
    if seq_lens.shape[0] != batch or (seq_lens.dim() == 2 and seq_lens.shape[1] != 1):
        _fail("seq_lens", f"shape [{batch}] or [{batch}, 1]", f"shape {tuple(seq_lens.shape)}")
    max_seq_len = page_table.shape[1] * page_size

    # ---- output ----
    out_torch_dtype = out_dtype if out_dtype is not None else (out.dtype if out is not None else q.dtype)
    if out_torch_dtype not in (q.dtype, torch.float8_e4m3fn):
        _fail("out_dtype", f"{q.dtype} or torch.float8_e4m3fn", out_torch_dtype)
    if out_torch_dtype == torch.float8_e4m3fn and not kv_fp8:
        _fail("out_dtype", "a 16-bit output with a 16-bit KV cache (fp8 output needs an fp8 cache)",
              out_torch_dtype)
    if out is None:
        out = torch.empty(q.shape, dtype=out_torch_dtype, device=device)
    else:
        _check_tensor("out", out, device=device, dtypes=(out_torch_dtype,), ndims=(q.dim(),))
        if out.shape != q.shape:
            _fail("out", f"q's shape {tuple(q.shape)}", tuple(out.shape))
        if out.stride(-1) != 1 or out.data_ptr() % 16 or any(s % 8 for s in out.stride()[:-1]):
            _fail("out", "a contiguous head_dim, 16-byte aligned pointer and strides that are multiples of 8",
                  f"strides {out.stride()}")

    # ---- features ----
    features = set()
    if sinks is not None:
        _check_tensor("sinks", sinks, device=device, dtypes=(torch.float32,), ndims=(1, 2))
        if sinks.numel() != num_q_heads or not sinks.is_contiguous():
            _fail("sinks", f"a contiguous float32 tensor of shape [{num_kv_heads}, {group}]", tuple(sinks.shape))
        features.add("sinks")
    if not isinstance(sliding_window, int) or isinstance(sliding_window, bool) or sliding_window < 0:
        _fail("sliding_window", "an integer >= 0 (0: no window)", repr(sliding_window))
    if sliding_window > 0:
        features.add("sliding_window")
    mask_words = (q_seq_len + 31) // 32
    if q_seq_len > 1:
        if mask is None:
            _fail("mask", f"a packed speculative-decoding mask for q_seq_len = {q_seq_len}", None)
        _check_tensor("mask", mask, device=device, dtypes=(torch.int32, torch.uint32, torch.uint16), ndims=(3,))
        words = mask_words * (2 if mask.dtype == torch.uint16 else 1)
        if tuple(mask.shape) != (batch, q_seq_len, words) or not mask.is_contiguous():
            _fail("mask", f"a contiguous tensor of shape [{batch}, {q_seq_len}, {words}] ({mask.dtype})",
                  f"shape {tuple(mask.shape)}")
    elif mask is not None:
        _fail("mask", "None when q_seq_len == 1", f"a tensor of shape {tuple(mask.shape)}")

    q_scale_value, q_scale_ptr = _scale("q_scale", q_scale, device)
    kv_scale_value, kv_scale_ptr = _scale("kv_scale", kv_scale, device)
    if not isinstance(rcp_out_scale, (int, float)) or isinstance(rcp_out_scale, bool):
        raise TypeError(f"rcp_out_scale: expected a float, got {type(rcp_out_scale).__name__}")

    spec = KernelSpec(q_dtype=DTYPE_NAMES[q.dtype], kv_dtype=DTYPE_NAMES[k_cache.dtype],
                      out_dtype=DTYPE_NAMES[out_torch_dtype], head_dim=head_dim, group=group,
                      page_size=page_size, kv_layout=kv_layout, q_seq_len=q_seq_len,
                      features=frozenset(features), tile=tile)

    if not isinstance(enable_pdl, bool):
        _fail("enable_pdl", "a bool", repr(enable_pdl))
    if sm_count is not None and (not isinstance(sm_count, int) or isinstance(sm_count, bool) or sm_count < 1):
        _fail("sm_count", "None or an integer >= 1", repr(sm_count))
    if num_splits is not None and (not isinstance(num_splits, int) or isinstance(num_splits, bool) or num_splits < 1):
        _fail("num_splits", "None or an integer >= 1", repr(num_splits))
    if validate and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        _check_values(seq_lens, page_table, page_size, num_pages, q_seq_len)
    # Every argument is checked first, so that a CPU tensor reports its real mistakes too.
    if device.type != "cuda":
        _fail("q", "CUDA tensors (the kernels run on NVIDIA GPUs)", f"tensors on {device}")

    workspace = default_workspace(device) if workspace is None else workspace
    if enable_pdl and not supports_pdl(device):
        _fail("enable_pdl", "False on a GPU older than sm_90 (programmatic dependent launch needs sm_90+)",
              f"True on {torch.cuda.get_device_name(device)}")

    kv_len = kv_range(max_seq_len, sliding_window)
    if sm_count is None:
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    if tile is None:
        spec = choose_spec(spec, batch, num_kv_heads, kv_len, sm_count)
    kernel = get_kernel(spec, cache_dir=cache_dir)
    splits = num_splits
    if splits is None:
        splits = kernel.choose_splits(batch, num_kv_heads, kv_len, sm_count, workspace)
    elif splits > kernel.max_splits(batch, num_kv_heads, workspace):
        _fail("num_splits", f"at most {kernel.max_splits(batch, num_kv_heads, workspace)} "
              "for this workspace and grid", splits)
    params = KernelParams(
        q=q.data_ptr(), k=k_cache.data_ptr(), v=v_cache.data_ptr(), page_table=page_table.data_ptr(),
        seq_lens=seq_lens.data_ptr(), out=out.data_ptr(),
        sinks=sinks.data_ptr() if sinks is not None else 0,
        mask=mask.data_ptr() if mask is not None else 0,
        q_scale_ptr=q_scale_ptr, kv_scale_ptr=kv_scale_ptr,
        workspace=workspace.scratch.data_ptr(), semaphores=workspace.semaphores.data_ptr(),
        q_stride_batch=q.stride(0), q_stride_token=q.stride(2) if q.dim() == 5 else 0,
        q_stride_head=q.stride(-2),
        kv_stride_page=stride_page, kv_stride_token=stride_token, kv_stride_head=stride_head,
        out_stride_batch=out.stride(0), out_stride_token=out.stride(2) if out.dim() == 5 else 0,
        out_stride_head=out.stride(-2), page_table_stride=page_table.stride(0),
        q_scale=q_scale_value, kv_scale=kv_scale_value, rcp_out_scale=float(rcp_out_scale),
        seq_lens_stride=seq_lens.stride(0), mask_words_per_row=mask_words,
        window=sliding_window, num_splits=splits, num_kv_heads=num_kv_heads,
    )
    return DecodeCall(spec, kernel, splits, out,
                      kernel.bind(params, batch=batch, num_kv_heads=num_kv_heads, num_splits=splits, device=device,
                                  pdl=enable_pdl))


def _check_values(seq_lens, page_table, page_size, num_pages, q_seq_len) -> None:
    """Sequence lengths within the page table, and the pages they use inside the pool (one sync)."""
    lens = seq_lens.reshape(-1).to(torch.int64)
    max_pages = page_table.shape[1]
    used = (lens + page_size - 1) // page_size
    cols = torch.arange(max_pages, device=page_table.device)
    in_use = cols[None, :] < used[:, None]
    bad_page = in_use & ((page_table < 0) | (page_table >= num_pages))
    summary = torch.stack([lens.min(), lens.max(), bad_page.any().to(torch.int64)]).cpu()
    lo, hi, any_bad = (int(v) for v in summary)
    if lo < q_seq_len:
        _fail("seq_lens", f"every length >= q_seq_len = {q_seq_len} (lengths include the new tokens)", lo)
    if hi > max_pages * page_size:
        _fail("seq_lens", f"every length <= page_table.shape[1] * page_size = {max_pages * page_size}", hi)
    if any_bad:
        row, col = (int(v) for v in bad_page.nonzero()[0].cpu())
        _fail("page_table", f"page indices in [0, {num_pages}) for the pages a sequence uses",
              f"page_table[{row}, {col}] = {int(page_table[row, col])}")
