"""The reference against an independent per-token float64 implementation of the contract, plus
visibility probes, invariances, the helpers and argument validation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from xqagen.masks import causal_mask, pack_mask, random_tree_mask
from xqagen.reference import FP8_VALUE_SCALE, make_paged_kv, relative_l2_error, xqa_reference

FP8 = torch.float8_e4m3fn


def naive_attention(q, k_cache, v_cache, page_table, seq_lens, *, num_kv_heads, kv_layout, q_scale=1.0,
                    kv_scale=1.0, rcp_out_scale=1.0, sinks=None, sliding_window=0, mask=None, fp8_out=False):
    """The contract written out token by token in float64: [batch, q_seq_len, num_q_heads, head_dim]."""
    queries = q if q.dim() == 5 else q.unsqueeze(2)
    batch, _, q_seq_len, num_q_heads, head_dim = queries.shape
    group = num_q_heads // num_kv_heads
    fp8_kv = k_cache.dtype == FP8
    page_size = k_cache.shape[1] if kv_layout == "NHD" else k_cache.shape[2]
    score_scale = q_scale * (kv_scale if fp8_kv else 1.0) / math.sqrt(head_dim)
    out_scale = (kv_scale if fp8_kv else 1.0) * (rcp_out_scale if fp8_out else 1.0)
    sink_list = None if sinks is None else sinks.flatten().tolist()

    def token_heads(cache, b, pos):  # [num_kv_heads, head_dim] at KV position pos of request b
        page, row = int(page_table[b, pos // page_size]), pos % page_size
        return (cache[page, row] if kv_layout == "NHD" else cache[page, :, row]).double()

    def sees(b, i, pos, seq_len):
        first_new = seq_len - q_seq_len  # position of query token 0
        if mask is not None and pos >= first_new:
            bit = pos - first_new
            word = int(mask[b, i, bit // 32]) & 0xFFFFFFFF
            if not (word >> (bit % 32)) & 1:
                return False
        return not sliding_window or pos > first_new + i - sliding_window

    out = torch.zeros(batch, q_seq_len, num_q_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        seq_len = int(seq_lens.flatten()[b])
        if seq_len == 0:
            continue  # a padding row: zeros
        keys = torch.stack([token_heads(k_cache, b, pos) for pos in range(seq_len)])
        values = torch.stack([token_heads(v_cache, b, pos) for pos in range(seq_len)])
        for i in range(q_seq_len):
            visible = [pos for pos in range(seq_len) if sees(b, i, pos, seq_len)]
            if not visible:
                continue  # the documented zeros
            for h in range(num_q_heads):
                scores = score_scale * (keys[visible, h // group] @ queries[b, 0, i, h].double())
                sink = -math.inf if sink_list is None else sink_list[h]
                m = max(scores.max().item(), sink)
                weights = torch.exp(scores - m)
                denom = weights.sum() + math.exp(sink - m)
                out[b, i, h] = (weights @ values[visible, h // group]) / denom * out_scale
    return out


@dataclass
class Case:
    seq_lens: tuple
    q_dtype: torch.dtype = torch.bfloat16
    kv_dtype: torch.dtype | None = None  # None: q_dtype
    kv_layout: str = "NHD"
    strided: bool = False  # K and V as views of one [num_pages, 2, ...] tensor
    page_size: int = 16
    num_kv_heads: int = 2
    group: int = 1
    head_dim: int = 32
    q_seq_len: int = 1
    mask: str | None = None  # "causal" or "tree"
    sinks: bool = False
    sliding_window: int = 0
    fp8_out: bool = False
    rcp_out_scale: float = 1.0

    @property
    def fp8_kv(self):
        return self.kv_dtype == FP8


CASES = {
    "bf16_nhd_p16_batch1": Case((37,)),
    "fp16_hnd_p64_g8": Case((100, 1, 64, 130), q_dtype=torch.float16, kv_layout="HND", page_size=64,
                            num_kv_heads=1, group=8),
    "bf16_hnd_strided_g5": Case((45, 17), kv_layout="HND", strided=True, group=5),
    "fp16_nhd_strided_p64": Case((65, 150), q_dtype=torch.float16, strided=True, page_size=64, head_dim=64),
    "fp8_nhd_p64_g8": Case((70, 129, 3), kv_dtype=FP8, page_size=64, group=8),
    "fp8_hnd_p16_g5_fp16": Case((33, 50), q_dtype=torch.float16, kv_dtype=FP8, kv_layout="HND", group=5),
    "fp8_hnd_strided_d128": Case((90,), kv_dtype=FP8, kv_layout="HND", strided=True, head_dim=128, group=8),
    "s3_causal": Case((20, 50), q_seq_len=3, mask="causal", group=5),
    "s3_tree_no_history_hnd_p64": Case((3, 70), q_seq_len=3, mask="tree", kv_layout="HND", page_size=64, group=8),
    "s33_tree_fp8": Case((40, 90), q_seq_len=33, mask="tree", kv_dtype=FP8, num_kv_heads=1, group=2),
    "s33_causal": Case((33, 75), q_seq_len=33, mask="causal", num_kv_heads=1),
    "sinks": Case((50, 80), sinks=True, group=8),
    "window": Case((50, 80, 7), sliding_window=20),
    "window_longer_than_seq": Case((50, 12), sliding_window=60, kv_layout="HND"),
    "sinks_window_tree_fp8_hnd": Case((30, 61), q_seq_len=3, mask="tree", sinks=True, sliding_window=5,
                                      kv_dtype=FP8, kv_layout="HND", group=5),
    "sinks_window_tree_s33": Case((45, 100), q_seq_len=33, mask="tree", sinks=True, sliding_window=40,
                                  num_kv_heads=1, group=2),
    "fp8_out_half": Case((40, 77), kv_dtype=FP8, fp8_out=True, rcp_out_scale=0.5, group=8),
    "fp8_out_double_sinks_window": Case((40, 77), kv_dtype=FP8, fp8_out=True, rcp_out_scale=2.0, sinks=True,
                                        sliding_window=30, q_seq_len=3, mask="causal", group=8),
}


def make_inputs(case: Case, seed: int = 0) -> tuple[tuple, dict]:
    """Positional arguments and keyword arguments of xqa_reference (and naive_attention) for a case."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(case.seq_lens)
    kv_dtype = case.kv_dtype or case.q_dtype
    k_cache, v_cache, page_table = make_paged_kv(batch, case.seq_lens, case.num_kv_heads, case.head_dim,
                                                 case.page_size, kv_dtype, case.kv_layout, generator=generator)
    if case.strided:
        k_cache, v_cache = torch.stack([k_cache, v_cache], dim=1).unbind(1)
        assert not k_cache.is_contiguous()
    num_q_heads = case.num_kv_heads * case.group
    q_tokens = () if case.q_seq_len == 1 else (case.q_seq_len,)  # 4-d q for single-token decode
    q_shape = (batch, 1, *q_tokens, num_q_heads, case.head_dim)
    q = torch.randn(q_shape, generator=generator).to(case.q_dtype)
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32)
    kwargs = dict(num_kv_heads=case.num_kv_heads, kv_layout=case.kv_layout, q_scale=0.7,
                  kv_scale=1.3 / FP8_VALUE_SCALE if case.fp8_kv else 1.3, rcp_out_scale=case.rcp_out_scale,
                  sliding_window=case.sliding_window)
    if case.sinks:
        kwargs["sinks"] = torch.randn(case.num_kv_heads, case.group, generator=generator) * 3
    if case.mask == "causal":
        kwargs["mask"] = causal_mask(batch, case.q_seq_len)
    elif case.mask == "tree":
        kwargs["mask"] = random_tree_mask(batch, case.q_seq_len, generator)
    return (q, k_cache, v_cache, page_table, seq_lens), kwargs


@pytest.mark.parametrize("name", CASES)
def test_matches_naive_implementation(name):
    case = CASES[name]
    args, kwargs = make_inputs(case)
    expected = naive_attention(*args, **kwargs, fp8_out=case.fp8_out)
    q_shape = args[0].shape
    if case.fp8_out:
        out = xqa_reference(*args, **kwargs, out_dtype=FP8, compute_dtype=torch.float64)
        assert out.dtype == FP8 and out.shape == q_shape
        # Computed in float64 on both sides, the only difference left is e4m3 rounding of equal values.
        assert torch.equal(out.double(), expected.reshape(q_shape).clamp(-448, 448).to(FP8).double())
        assert out.double().unique().numel() > 50, "the check needs many distinct e4m3 values"
        return
    exact = xqa_reference(*args, **kwargs, out_dtype=torch.float64, compute_dtype=torch.float64)
    assert exact.shape == q_shape
    assert relative_l2_error(exact, expected.reshape(q_shape)) < 1e-12
    fp32 = xqa_reference(*args, **kwargs, out_dtype=torch.float32)
    assert relative_l2_error(fp32, exact) < 1e-5
    rounded = xqa_reference(*args, **kwargs)
    assert rounded.dtype == case.q_dtype and rounded.shape == q_shape
    assert relative_l2_error(rounded, exact) < 1e-2


def visible_positions(seq_len, q_seq_len, *, mask=None, sliding_window=0):
    """Which KV positions each query token sees, read off the reference's output.

    With q = 0 every visible score is 0, so the output is the mean of the visible values; value
    vectors that are one-hot in their position make that mean nonzero exactly at the visible ones.
    """
    head_dim = 64
    assert seq_len <= head_dim
    page_table = torch.arange(-(-seq_len // 16), dtype=torch.int32)[None]
    v_cache = torch.eye(head_dim)[:page_table.shape[1] * 16].view(-1, 16, 1, head_dim).to(torch.bfloat16)
    k_cache = torch.randn(v_cache.shape).to(torch.bfloat16)
    q = torch.zeros(1, 1, q_seq_len, 1, head_dim, dtype=torch.bfloat16)
    out = xqa_reference(q, k_cache, v_cache, page_table, torch.tensor([seq_len]), num_kv_heads=1, mask=mask,
                        sliding_window=sliding_window, out_dtype=torch.float64)
    return [row.nonzero().flatten().tolist() for row in out[0, 0, :, 0]]


def test_hand_built_mask_word_selects_positions():
    # 40 new tokens after 10 of history; query token 0 sees new tokens 0, 3 and 33, token 1 only 31.
    words = torch.zeros(1, 40, 2, dtype=torch.int32)
    words[0, 0] = torch.tensor([0b1001, 0b10])
    words[0, 1, 0] = -2**31
    rows = visible_positions(50, 40, mask=words)
    history = list(range(10))
    assert rows[0] == history + [10, 13, 43]
    assert rows[1] == history + [41]
    assert rows[2] == history


def test_causal_mask_visibility():
    rows = visible_positions(20, 3, mask=causal_mask(1, 3))
    assert rows == [list(range(18)), list(range(19)), list(range(20))]


def test_sliding_window_single_token():
    assert visible_positions(30, 1, sliding_window=7) == [list(range(23, 30))]  # (p - W, p], p = 29
    assert visible_positions(30, 1, sliding_window=1) == [[29]]
    assert visible_positions(30, 1, sliding_window=30) == visible_positions(30, 1) == [list(range(30))]


def test_each_draft_token_has_its_own_window():
    # tokens at p = 17, 18, 19 see (p - 4, p]: FlashInfer 0.7.2's semantics
    rows = visible_positions(20, 3, mask=causal_mask(1, 3), sliding_window=4)
    assert rows == [[14, 15, 16, 17], [15, 16, 17, 18], [16, 17, 18, 19]]


def test_requests_shorter_than_q_seq_len():
    """A request with fewer positions than query tokens: token i sits at p = L - q_seq_len + i,
    mask bits before position 0 are ignored, tokens that see nothing get zeros; L = 0 gives zeros."""
    assert visible_positions(2, 4, mask=causal_mask(1, 4)) == [[], [], [0], [0, 1]]
    assert visible_positions(2, 4, mask=causal_mask(1, 4), sliding_window=1) == [[], [], [0], [1]]
    assert visible_positions(0, 3, mask=causal_mask(1, 3)) == [[], [], []]


def test_rows_with_nothing_visible_are_zero():
    q_seq_len = 3
    hidden = torch.tensor([[[True, False, False], [False, False, False], [False, False, True]]])
    generator = torch.Generator().manual_seed(3)
    k_cache, v_cache, page_table = make_paged_kv(1, [q_seq_len], 2, 32, 16, torch.bfloat16, generator=generator)
    q = torch.randn(1, 1, q_seq_len, 4, 32, generator=generator).to(torch.bfloat16)
    args = (q, k_cache, v_cache, page_table, torch.tensor([q_seq_len]))
    for sinks in (None, torch.zeros(4)):
        out = xqa_reference(*args, num_kv_heads=2, mask=pack_mask(hidden), sinks=sinks, out_dtype=torch.float64)
        assert torch.equal(out[0, 0, 1], torch.zeros(4, 32, dtype=torch.float64))
        assert out[0, 0, 0].abs().min() > 0 and out[0, 0, 2].abs().min() > 0
    # With history, a window that leaves only new tokens the mask hides empties the row too.
    only_self = pack_mask(torch.eye(3, dtype=torch.bool)[None])
    assert visible_positions(10, 3, mask=only_self, sliding_window=1) == [[7], [8], [9]]
    no_self = pack_mask(~torch.eye(3, dtype=torch.bool)[None] & torch.ones(3, 3, dtype=torch.bool).tril()[None])
    assert visible_positions(10, 3, mask=no_self, sliding_window=1) == [[], [], []]


def test_sink_adds_to_the_denominator_only():
    args, kwargs = make_inputs(CASES["bf16_nhd_p16_batch1"])
    plain = xqa_reference(*args, **kwargs, out_dtype=torch.float64, compute_dtype=torch.float64)
    with_sink = xqa_reference(*args, **kwargs, sinks=torch.full((2, 1), 1.5), out_dtype=torch.float64,
                              compute_dtype=torch.float64)
    # Per head, o_sink = o * Z / (Z + exp(sink)) with Z = sum_j exp(s_j): a scaling in (0, 1).
    ratio = with_sink / plain
    per_head = ratio[0, 0, :, :1]
    assert torch.allclose(ratio, per_head.expand_as(ratio[0, 0])[None, None], rtol=1e-9)
    assert ((per_head > 0) & (per_head < 1)).all()
    tiny_sink = xqa_reference(*args, **kwargs, sinks=torch.full((2,), -1e4), out_dtype=torch.float64,
                              compute_dtype=torch.float64)
    assert torch.equal(tiny_sink, plain)


def test_sixteen_bit_kv_ignores_kv_scale_and_rcp_out_scale():
    args, kwargs = make_inputs(CASES["fp16_hnd_p64_g8"])
    base = xqa_reference(*args, **{**kwargs, "kv_scale": 1.0, "rcp_out_scale": 1.0})
    assert torch.equal(xqa_reference(*args, **{**kwargs, "kv_scale": 3.0, "rcp_out_scale": 0.25}), base)


def test_fp8_kv_scale_scales_scores_and_output():
    args, kwargs = make_inputs(CASES["fp8_nhd_p64_g8"])
    kwargs.update(out_dtype=torch.float64, compute_dtype=torch.float64)
    base = xqa_reference(*args, **{**kwargs, "q_scale": 0.6, "kv_scale": 0.05})
    # Moving a factor 2 from q_scale into kv_scale keeps the scores and doubles the output.
    moved = xqa_reference(*args, **{**kwargs, "q_scale": 0.3, "kv_scale": 0.1})
    assert relative_l2_error(moved, 2 * base) < 1e-12


def test_fp8_output_saturates():
    args, kwargs = make_inputs(CASES["fp8_out_half"])
    out = xqa_reference(*args, **{**kwargs, "rcp_out_scale": 1e6}, out_dtype=FP8)
    assert not out.float().isnan().any()
    assert out.float().abs().max() == 448


def test_scales_as_one_element_tensors():
    args, kwargs = make_inputs(CASES["fp8_hnd_p16_g5_fp16"])
    as_floats = xqa_reference(*args, **kwargs)
    as_tensors = xqa_reference(*args, **{**kwargs, "q_scale": torch.tensor([kwargs["q_scale"]]),
                                         "kv_scale": torch.tensor(kwargs["kv_scale"], dtype=torch.float64)})
    assert torch.equal(as_tensors, as_floats)


def test_flat_sinks_and_column_seq_lens():
    args, kwargs = make_inputs(CASES["sinks"])
    q, k_cache, v_cache, page_table, seq_lens = args
    base = xqa_reference(*args, **kwargs)
    kwargs_flat = {**kwargs, "sinks": kwargs["sinks"].flatten()}
    flat = xqa_reference(q, k_cache, v_cache, page_table, seq_lens[:, None], **kwargs_flat)
    assert torch.equal(flat, base)


def test_single_token_q_in_both_shapes():
    args, kwargs = make_inputs(CASES["window"])
    q = args[0]
    base = xqa_reference(*args, **kwargs)
    five_dim = xqa_reference(q.unsqueeze(2), *args[1:], **kwargs)
    assert five_dim.shape == (q.shape[0], 1, 1, *q.shape[2:])
    assert torch.equal(five_dim.squeeze(2), base)


def test_page_order_does_not_matter_and_unused_entries_are_not_read():
    case = Case((50, 20, 33), page_size=16, kv_dtype=FP8, q_seq_len=3, mask="tree", group=5)
    args, kwargs = make_inputs(case)
    q, k_cache, v_cache, page_table, seq_lens = args
    base = xqa_reference(*args, **kwargs)
    perm = torch.randperm(k_cache.shape[0], generator=torch.Generator().manual_seed(9))
    moved_k, moved_v = torch.empty_like(k_cache), torch.empty_like(v_cache)
    moved_k[perm], moved_v[perm] = k_cache, v_cache
    moved_table = perm[page_table.long().clamp_min(0)].to(torch.int32)
    moved_table[page_table < 0] = 2**30  # far outside the pool: reading one would fail
    assert (moved_table == 2**30).any()
    assert torch.equal(xqa_reference(q, moved_k, moved_v, moved_table, seq_lens, **kwargs), base)


def test_make_paged_kv():
    generator = torch.Generator().manual_seed(0)
    seq_lens = [17, 64, 1]
    k_cache, v_cache, page_table = make_paged_kv(3, seq_lens, 2, 32, 16, FP8, "HND", generator=generator,
                                                 extra_pages=4)
    assert k_cache.shape == v_cache.shape == (2 + 4 + 1 + 4, 2, 16, 32) and k_cache.dtype == FP8
    assert page_table.dtype == torch.int32 and page_table.shape == (3, 4)
    used = page_table[page_table >= 0]
    assert used.numel() == 7 and used.unique().numel() == 7 and used.max() < k_cache.shape[0]
    assert page_table[0, 2:].tolist() == [-1, -1] and page_table[2, 1:].tolist() == [-1, -1, -1]
    for cache in (k_cache, v_cache):
        values = cache.float()
        assert values.abs().max() <= 448 and values.std() > FP8_VALUE_SCALE / 2
        assert (values != 0).float().mean() > 0.99
    assert not torch.equal(k_cache, v_cache)
    _, _, ordered = make_paged_kv(3, seq_lens, 2, 32, 16, torch.bfloat16, generator=generator, shuffle=False)
    assert ordered.tolist() == [[0, 1, -1, -1], [2, 3, 4, 5], [6, -1, -1, -1]]


def test_relative_l2_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_l2_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert relative_l2_error(ref.to(torch.bfloat16), ref) == 0.0
    assert relative_l2_error(torch.tensor([float("nan"), 4.0]), ref) == math.inf
    assert relative_l2_error(ref, torch.tensor([3.0, float("nan")])) == math.inf
    assert relative_l2_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_l2_error(ref, torch.zeros(2)) == math.inf
    with pytest.raises(ValueError, match="same shape"):
        relative_l2_error(ref, ref[:1])


def _with(index, value):
    def edit(args, kwargs):
        args = list(args)
        args[index] = value(args[index]) if callable(value) else value
        return args, kwargs
    return edit


def _kw(**changes):
    return lambda args, kwargs: (args, {**kwargs, **changes})


def _set_entry(table):
    table = table.clone()
    table[0, 1] = 99
    return table


INVALID = {
    "q_dtype": (_with(0, lambda q: q.float()), TypeError, "q must be a tensor of dtype"),
    "q_shape": (_with(0, lambda q: q[:, 0]), ValueError, r"q must have shape \[batch, 1, num_q_heads"),
    "q_beam": (_with(0, lambda q: q.expand(-1, 2, -1, -1, -1)), ValueError, "q must have shape"),
    "group": (_kw(num_kv_heads=3), ValueError, "num_q_heads = 10 .* multiple of num_kv_heads = 3"),
    "kv_layout": (_kw(kv_layout="NDH"), ValueError, "kv_layout: expected .NHD. or .HND."),
    "k_cache_heads": (_with(1, lambda k: k[:, :, :1]), ValueError, r"k_cache must have shape \[num_pages, page_size"),
    "k_cache_dtype": (_with(1, lambda k: k.float()), TypeError, "k_cache must be a tensor of dtype"),
    "v_cache_dtype": (_with(2, lambda v: v.to(FP8)), ValueError, "v_cache must match k_cache"),
    "page_table_dtype": (_with(3, lambda t: t.long()), TypeError, "page_table must be a tensor of dtype torch.int32"),
    "page_table_batch": (_with(3, lambda t: t[:1]), ValueError, r"page_table must have shape \[batch"),
    "page_table_entry": (_with(3, _set_entry), ValueError, r"page_table\[0, 1\] = 99 is not a page"),
    "seq_lens_shape": (_with(4, lambda s: s[None]), ValueError, r"seq_lens must have shape \[batch\]"),
    "seq_lens_dtype": (_with(4, lambda s: s.float()), TypeError, "seq_lens must be an integer tensor"),
    "seq_lens_too_long": (_with(4, torch.tensor([50, 81], dtype=torch.int32)), ValueError, r"seq_lens\[1\] = 81"),
    "seq_lens_negative": (_with(4, torch.tensor([-1, 80], dtype=torch.int32)), ValueError, r"seq_lens\[0\] = -1"),
    "mask_missing": (_kw(mask=None), ValueError, "mask is required when q_seq_len > 1"),
    "mask_shape": (_kw(mask=causal_mask(2, 4)), ValueError, r"mask must have shape .* = \[2, 3, 1\]"),
    "mask_dtype": (_kw(mask=causal_mask(2, 3).long()), TypeError, "mask must be an int32 or uint32 tensor"),
    "sinks_shape": (_kw(sinks=torch.zeros(5, 2)), ValueError, r"sinks must have shape \[num_kv_heads, group\]"),
    "sinks_dtype": (_kw(sinks=torch.zeros(2, 5, dtype=torch.float16)), TypeError, "sinks must be a tensor"),
    "window": (_kw(sliding_window=-1), ValueError, "sliding_window must be an integer >= 0"),
    "q_scale_tensor": (_kw(q_scale=torch.ones(2)), ValueError, "q_scale must be a python number or a one-element"),
    "kv_scale_type": (_kw(kv_scale="1"), TypeError, "kv_scale must be a python number"),
    "fp8_out_16bit_kv": (_kw(out_dtype=FP8), ValueError, "out_dtype = torch.float8_e4m3fn needs"),
    "out_dtype": (_kw(out_dtype=torch.int8), TypeError, "out_dtype must be one of"),
    "compute_dtype": (_kw(compute_dtype=torch.float16), TypeError, "compute_dtype must be one of"),
}


@pytest.mark.parametrize("name", INVALID)
def test_argument_validation(name):
    edit, error, message = INVALID[name]
    args, kwargs = make_inputs(Case((50, 80), q_seq_len=3, mask="causal", group=5, sliding_window=8, sinks=True))
    args, kwargs = edit(args, kwargs)
    with pytest.raises(error, match=message):
        xqa_reference(*args, **kwargs)
