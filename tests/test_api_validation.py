"""Argument validation of the user-facing calls, before any launch (runs on CPU tensors: every
check happens before the one that asks for a GPU)."""

from __future__ import annotations

import pytest
import torch

from xqagen.api import prepare_decode, xqa_decode
from xqagen.flashinfer_compat import xqa, xqa_batch_decode_with_kv_cache
from xqagen.masks import as_flashinfer_mask, causal_mask
from xqagen.reference import make_paged_kv

NOT_ON_GPU = "expected CUDA tensors"


def _args(q_seq_len=1, layout="NHD", kv_dtype=torch.bfloat16, lens=(100, 37)):
    gen = torch.Generator().manual_seed(0)
    k, v, pt = make_paged_kv(len(lens), lens, 2, 128, 16, kv_dtype, layout, generator=gen)
    shape = (len(lens), 1, 16, 128) if q_seq_len == 1 else (len(lens), 1, q_seq_len, 16, 128)
    q = torch.randn(shape, generator=gen).to(torch.bfloat16)
    kwargs = dict(kv_layout=layout)
    if q_seq_len > 1:
        kwargs["mask"] = causal_mask(len(lens), q_seq_len)
    return [q, k, v, pt, torch.tensor(lens, dtype=torch.int32)], kwargs


def _error(args, kwargs, exc=ValueError) -> str:
    with pytest.raises(exc) as err:
        prepare_decode(*args, **kwargs)
    return str(err.value)


@pytest.mark.parametrize("q_seq_len, layout, kv_dtype", [(1, "NHD", torch.bfloat16), (4, "HND", torch.float8_e4m3fn)])
def test_valid_arguments_only_lack_a_gpu(q_seq_len, layout, kv_dtype):
    args, kwargs = _args(q_seq_len, layout, kv_dtype)
    assert NOT_ON_GPU in _error(args, kwargs)


def _replace(index, value):
    def change(args, kwargs):
        args[index] = value(args[index]) if callable(value) else value
    return change


def _set(key, value):
    def change(args, kwargs):
        kwargs[key] = value(kwargs.get(key)) if callable(value) else value
    return change


CASES = {
    "q dtype": (_replace(0, lambda q: q.float()), "q: expected dtype in"),
    "q beam": (_replace(0, lambda q: q.expand(2, 2, 16, 128)), "beam width 1"),
    "q head_dim": (_replace(0, lambda q: q[..., :40]), "q: expected head_dim (last dimension) a multiple of 16"),
    "q misaligned": (_replace(0, lambda q: torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)),
                     "q: expected a 16-byte aligned data pointer"),
    "q strided head_dim": (_replace(0, lambda q: q.transpose(2, 3).contiguous().transpose(2, 3)),
                           "contiguous last (head_dim) dimension"),
    "kv dtype": (_replace(1, lambda k: k.half()), "k_cache: expected dtype in"),
    "v differs": (_replace(2, lambda v: v[:-1]), "v_cache: expected the dtype, shape and strides of k_cache"),
    "bad layout": (_set("kv_layout", "NDH"), "kv_layout: expected 'NHD' or 'HND'"),
    "page size": (lambda a, k: (a.__setitem__(1, a[1][:, :12]), a.__setitem__(2, a[2][:, :12])),
                  "k_cache: expected a page size in"),
    "heads do not divide": (lambda a, k: (a.__setitem__(1, a[1][:, :, :1].expand(-1, -1, 3, -1)),
                                          a.__setitem__(2, a[2][:, :, :1].expand(-1, -1, 3, -1))),
                            "k_cache: expected a number of KV heads dividing num_q_heads = 16"),
    "page table dtype": (_replace(3, lambda pt: pt.long()), "page_table: expected dtype in"),
    "page table batch": (_replace(3, lambda pt: pt[:1]), "page_table: expected shape [2, max_pages]"),
    "seq_lens dtype": (_replace(4, lambda s: s.float()), "seq_lens: expected dtype in"),
    "seq_lens shape": (_replace(4, lambda s: s[:, None].expand(2, 2)), "seq_lens: expected shape [2] or [2, 1]"),
    "seq_lens beyond table": (_replace(4, torch.tensor([100, 10_000], dtype=torch.int32)),
                              "seq_lens: expected every length <= page_table.shape[1] * page_size"),
    "seq_lens negative": (_replace(4, torch.tensor([100, -1], dtype=torch.int32)), "seq_lens: expected every length >= 0"),
    "page out of pool": (lambda a, k: a[3].__setitem__((1, 0), 10_000), "page_table: expected page indices in [0,"),
    "negative page": (lambda a, k: a[3].__setitem__((0, 3), -1), "page_table[0, 3] = -1"),
    "out dtype": (_set("out_dtype", torch.float16), "out_dtype: expected torch.bfloat16 or torch.float8_e4m3fn"),
    "fp8 out with 16-bit kv": (_set("out_dtype", torch.float8_e4m3fn), "fp8 output needs an fp8 cache"),
    "out shape": (_set("out", torch.empty(2, 1, 16, 64, dtype=torch.bfloat16)), "out: expected q's shape"),
    "sinks dtype": (_set("sinks", torch.zeros(2, 8, dtype=torch.float16)), "sinks: expected dtype in"),
    "sinks shape": (_set("sinks", torch.zeros(2, 7)), "sinks: expected a contiguous float32 tensor of shape [2, 8]"),
    "window": (_set("sliding_window", -5), "sliding_window: expected an integer >= 0"),
    "mask for decode": (_set("mask", causal_mask(2, 1)), "mask: expected None when q_seq_len == 1"),
    "q_scale tensor": (_set("q_scale", torch.ones(2)), "q_scale: expected a float or a one-element float32 tensor"),
    "num_splits": (_set("num_splits", 0), "num_splits: expected None or an integer >= 1"),
    "sm_count": (_set("sm_count", 0), "sm_count: expected None or an integer >= 1"),
    "enable_pdl": (_set("enable_pdl", None), "enable_pdl: expected a bool"),
    "fp8_mma": (_set("fp8_mma", 1), "fp8_mma: expected a bool"),
    "fp8_mma with 16-bit kv": (_set("fp8_mma", True), "fp8_mma: expected False with a 16-bit KV cache"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_argument_is_named(name):
    change, message = CASES[name]
    args, kwargs = _args()
    change(args, kwargs)
    text = _error(args, kwargs)
    assert message in text, text


@pytest.mark.parametrize("mask, message", [
    (None, "mask: expected a packed speculative-decoding mask for q_seq_len = 4"),
    (lambda m: m.float(), "mask: expected dtype in"),
    (lambda m: m[:, :3], "mask: expected a contiguous tensor of shape [2, 4, 1]"),
    (lambda m: as_flashinfer_mask(m)[..., :1], "mask: expected a contiguous tensor of shape [2, 4, 2]"),
])
def test_bad_speculative_decoding_mask(mask, message):
    args, kwargs = _args(q_seq_len=4)
    kwargs["mask"] = mask(kwargs["mask"]) if mask else None
    assert message in _error(args, kwargs)


def test_flashinfer_uint16_mask_and_uint32_seq_lens_are_accepted():
    args, kwargs = _args(q_seq_len=4)
    kwargs["mask"] = as_flashinfer_mask(kwargs["mask"])
    args[4] = args[4].to(torch.uint32)[:, None]
    assert NOT_ON_GPU in _error(args, kwargs)


def test_flashinfer_xqa_checks_its_redundant_arguments():
    (q, k, v, pt, lens), _ = _args()
    buffers = (torch.empty_like(q), torch.zeros(1 << 20, dtype=torch.uint8), torch.zeros(64, dtype=torch.uint32))
    with pytest.raises(ValueError, match="page_size: expected 16"):
        xqa(q, k, v, pt, lens, *buffers, num_kv_heads=2, page_size=64)
    with pytest.raises(ValueError, match="num_kv_heads: expected 2"):
        xqa(q, k, v, pt, lens, *buffers, num_kv_heads=4, page_size=16)
    with pytest.raises(ValueError, match="q_seq_len: expected 1"):
        xqa(q, k, v, pt, lens, *buffers, num_kv_heads=2, page_size=16, q_seq_len=4)


def test_flashinfer_batch_decode_checks_its_arguments():
    (q, k, v, pt, lens), _ = _args()
    query = q.reshape(2, 16, 128)
    workspace = torch.zeros(16 << 20, dtype=torch.uint8)
    with pytest.raises(ValueError, match="kv_cache: expected a"):
        xqa_batch_decode_with_kv_cache(query, k, workspace, pt, lens, 512)
    with pytest.raises(ValueError, match="not a multiple of q_len_per_req = 3"):
        xqa_batch_decode_with_kv_cache(query[:1].expand(4, -1, -1), (k, v), workspace, pt, lens, 512, q_len_per_req=3)
    with pytest.raises(ValueError, match="workspace_buffer: expected a tensor of more than"):
        xqa_batch_decode_with_kv_cache(query, (k, v), workspace[:100], pt, lens, 512)
    with pytest.raises(ValueError, match="out: expected shape"):
        xqa_batch_decode_with_kv_cache(query, (k, v), workspace, pt, lens, 512, out=torch.empty(2, 16, 64))


def test_the_problem_describes_either_layout_to_the_same_kernel():
    """NHD and HND pools are one kernel variant: the layout only changes the strides packed."""
    from xqagen.problem import describe

    problems = {}
    for layout in ("NHD", "HND"):
        args, kwargs = _args(layout=layout)
        problems[layout] = describe(*args, **kwargs)
    nhd, hnd = problems["NHD"], problems["HND"]
    assert nhd.spec() == hnd.spec() and "kv_layout" not in nhd.spec().to_dict()
    assert (nhd.page_size, nhd.num_kv_heads, hnd.page_size, hnd.num_kv_heads) == (16, 2, 16, 2)
    page, token, head = nhd.k_cache.stride()[:3]
    assert (nhd.params()["kv_stride_token"], nhd.params()["kv_stride_head"]) == (token, head)
    page, head, token = hnd.k_cache.stride()[:3]
    assert (hnd.params()["kv_stride_token"], hnd.params()["kv_stride_head"]) == (token, head)


def test_the_kv_range_a_cta_walks_is_the_window_when_there_is_one():
    from xqagen.problem import describe

    args, kwargs = _args(lens=(100, 37))  # page table of 7 pages of 16 tokens
    assert describe(*args, **kwargs).kv_len == 112
    assert describe(*args, **kwargs, sliding_window=40).kv_len == 40
    assert describe(*args, **kwargs, sliding_window=500).kv_len == 112


def test_padding_rows_and_short_requests_are_valid():
    """Length 0 (a padding row) and lengths below q_seq_len pass validation: only the GPU is missing."""
    args, kwargs = _args(q_seq_len=4)
    args[4] = torch.tensor([0, 3], dtype=torch.int32)
    assert NOT_ON_GPU in _error(args, kwargs)


def _ragged_args(counts=(3, 0), q_seq_len=4):
    args, kwargs = _args(q_seq_len=q_seq_len)
    total = sum(counts)
    args[0] = torch.randn(total, 16, 128).to(torch.bfloat16)
    kwargs.update(q_cu_seq_lens=torch.tensor([0, counts[0], total], dtype=torch.int32), q_seq_len=q_seq_len,
                  mask=causal_mask(1, q_seq_len)[0, :total] if total <= q_seq_len else None)
    return args, kwargs


def test_ragged_arguments_only_lack_a_gpu():
    args, kwargs = _ragged_args()
    assert NOT_ON_GPU in _error(args, kwargs)
    with pytest.raises(ValueError, match=NOT_ON_GPU):  # the per-geometry path passes them on too
        xqa_decode(*args, validate=False, **kwargs)


@pytest.mark.parametrize("change, message", [
    (lambda a, k: k.pop("q_seq_len"), "q_seq_len: expected the largest number of query tokens"),
    (lambda a, k: k.update(q_seq_len=2), "q_cu_seq_lens: expected between 0 and q_seq_len = 2 tokens"),
    (lambda a, k: k.update(q_cu_seq_lens=torch.tensor([0, 4, 3], dtype=torch.int32)),
     "q_cu_seq_lens: expected between 0 and q_seq_len = 4 tokens per request, got -1 .. 4"),
    (lambda a, k: k.update(q_cu_seq_lens=torch.tensor([1, 3, 3], dtype=torch.int32)),
     "q_cu_seq_lens: expected offsets from 0 to q.shape\\[0\\] = 3"),
    (lambda a, k: k.update(q_cu_seq_lens=torch.tensor([0, 3], dtype=torch.int32)), "page_table: expected shape \\[1,"),
    (lambda a, k: k.update(mask=k["mask"][None]), "mask: expected 2 dimensions"),
    (lambda a, k: a.__setitem__(0, a[0][None]), "q: expected 3 dimensions"),
])
def test_bad_ragged_argument_is_named(change, message):
    args, kwargs = _ragged_args()
    change(args, kwargs)
    with pytest.raises(ValueError, match=message):
        prepare_decode(*args, **kwargs)
