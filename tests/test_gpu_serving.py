"""The serving-engine surface on a GPU: the custom op under ``opcheck`` and ``torch.compile``, the
plan-once wrapper against ``xqa_decode``, CUDA-graph capture of its runs, and no host sync on any
hot path.  Skipped without a CUDA GPU."""

from __future__ import annotations

import math

import pytest
import torch

from xqagen import ops
from xqagen.api import prepare_decode, xqa_decode
from xqagen.flashinfer_compat import xqa, xqa_batch_decode_with_kv_cache
from xqagen.masks import as_flashinfer_mask, random_tree_mask
from xqagen.reference import FP8_VALUE_SCALE, make_paged_kv, relative_l2_error
from xqagen.runtime import Workspace
from xqagen.wrapper import DecodeWrapper

pytestmark = pytest.mark.gpu

# (KV dtype, q_seq_len, sinks, window, lengths): split-KV with sinks and a window; speculative
# decoding with a tree mask over fp8 KV.  Two KV heads of group 8, head_dim 128, pages of 64.
CASES = {
    "bf16-sinks-window-splits": (torch.bfloat16, 1, True, 700, (3000, 77, 9000)),
    "fp8-specdec-tree": (torch.float8_e4m3fn, 4, False, 0, (900, 33, 4000)),
}


def _case(name, seed=0):
    """q, k_cache, v_cache, page_table, seq_lens and xqa_decode's keyword arguments."""
    kv_dtype, q_seq_len, sinks, window, lens = CASES[name]
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    batch, num_kv_heads, group, head_dim = len(lens), 2, 8, 128
    k, v, pt = make_paged_kv(batch, lens, num_kv_heads, head_dim, 64, kv_dtype, generator=gen, device=device)
    shape = (batch, 1, num_kv_heads * group, head_dim) if q_seq_len == 1 else \
        (batch, 1, q_seq_len, num_kv_heads * group, head_dim)
    q = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    kwargs = dict(kv_layout="NHD", q_scale=0.7)
    if kv_dtype == torch.float8_e4m3fn:
        kwargs["kv_scale"] = 1.3 / FP8_VALUE_SCALE
    if sinks:
        kwargs["sinks"] = torch.randn(num_kv_heads, group, generator=gen, device=device)
    if window:
        kwargs["sliding_window"] = window
    if q_seq_len > 1:
        kwargs["mask"] = random_tree_mask(batch, q_seq_len, generator=torch.Generator().manual_seed(seed)).to(device)
    return q, k, v, pt, torch.tensor(lens, dtype=torch.int32, device=device), kwargs


def _layers(k, v, count=3):
    """Per-layer caches of the same geometry: the first layer's and perturbed copies."""
    return [(k, v)] + [((k.float() * (1 + i / 4)).to(k.dtype), (v.float() - i / 8).to(v.dtype))
                       for i in range(1, count)]


@pytest.mark.parametrize("name", CASES)
def test_opcheck(name):
    q, k, v, pt, lens, kwargs = _case(name)
    workspace = Workspace.allocate(q.device, 16 << 20, 1 << 12)
    kv_scale = kwargs.get("kv_scale", 1.0)
    args = (q, k, v, pt, lens, torch.empty_like(q), workspace.scratch, workspace.buffer, kwargs.get("sinks"),
            kwargs.get("mask"), None, torch.full((1,), kv_scale, device=q.device), kwargs["q_scale"], 1.0, 1.0,
            kwargs.get("sliding_window", 0), kwargs["kv_layout"], 3, 0, False)
    checks = None
    if k.dtype == torch.float8_e4m3fn:  # the schema check compares inputs with torch ops that have no fp8 kernels
        checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.xqagen.decode.default, args, test_utils=checks or
                          ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("name", CASES)
def test_op_matches_xqa_decode_eager_and_compiled(name):
    """ops.decode, eager and under torch.compile(fullgraph=True) with Inductor, gives xqa_decode's
    bytes (one kernel, same inputs)."""
    q, k, v, pt, lens, kwargs = _case(name, seed=1)
    expected = xqa_decode(q, k, v, pt, lens, num_splits=3, **kwargs)
    kv_scale = torch.full((1,), kwargs.pop("kv_scale", 1.0), device=q.device)

    def step(q, k, v, pt, lens, kv_scale):
        out = ops.decode(q, k, v, pt, lens, torch.empty_like(q), kv_scale=kv_scale, num_splits=3, **kwargs)
        return out.float() * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager = step(q, k, v, pt, lens, kv_scale)
    for _ in range(2):  # the second call runs the compiled graph from its cache
        assert torch.equal(compiled(q, k, v, pt, lens, kv_scale), eager)
    assert torch.equal(eager, expected.float() * 2)


def _op_args(q, k, v, pt, lens, out, workspace, kwargs) -> tuple:
    """torch.ops.xqagen.decode's positional arguments for xqa_decode's keyword arguments."""
    scratch, semaphores = (None, None) if workspace is None else (workspace.scratch, workspace.buffer)
    return (q, k, v, pt, lens, out, scratch, semaphores, kwargs.get("sinks"), kwargs.get("mask"), None, None,
            kwargs.get("q_scale", 1.0), kwargs.get("kv_scale", 1.0), 1.0, kwargs.get("sliding_window", 0),
            kwargs.get("kv_layout", "NHD"), 0, 0, False, None, 0)


@pytest.mark.parametrize("name", CASES)
def test_native_op_relaunches_every_layer_like_xqa_decode(name):
    """The op's C++ kernel launches a geometry it has bound without Python: new queries, caches (a
    Hopper launch's tensor maps retargeted), lengths and outputs on every call, with the default
    workspace and with the caller's, whose fault word it points at."""
    from xqagen.emitters.params import FAULT_PAGE

    from xqagen import native

    if native.setting() == "0":
        pytest.skip("XQAGEN_NATIVE_OP=0: the op runs its Python kernel")
    assert ops.NATIVE, "the op's C++ kernel was not built"
    q, k, v, pt, lens, kwargs = _case(name, seed=8)
    for workspace in (None, Workspace.allocate(q.device), Workspace.allocate(q.device)):
        for i, (k_layer, v_layer) in enumerate(_layers(k, v)):
            query = torch.randn_like(q, dtype=torch.float32).to(q.dtype)
            other_lens = (lens - i * torch.arange(lens.numel(), device=lens.device, dtype=lens.dtype)).clamp(min=4)
            out = torch.full_like(q, float("nan"))
            torch.ops.xqagen.decode.default(*_op_args(query, k_layer, v_layer, pt, other_lens, out, workspace, kwargs))
            assert torch.equal(out, xqa_decode(query, k_layer, v_layer, pt, other_lens, **kwargs))
        if workspace is not None:  # a page outside the pool: zero-filled, and recorded in this workspace
            bad_table = pt.clone()
            bad_table[0, (int(lens[0]) - 1) // k.shape[1]] = k.shape[0] + 5  # the last page, inside any window
            workspace.clear_faults()
            torch.ops.xqagen.decode.default(*_op_args(q, k, v, bad_table, lens, torch.empty_like(q), workspace, kwargs))
            assert workspace.fault_bits() == FAULT_PAGE
    misaligned = torch.empty(q.numel() + 4, dtype=q.dtype, device=q.device)[4:].view(q.shape)
    with pytest.raises(ValueError, match="q"):  # the bound geometry, a pointer the checks see again
        torch.ops.xqagen.decode.default(*_op_args(misaligned, k, v, pt, lens, torch.empty_like(q), None, kwargs))


def test_compat_entry_points_compile_and_match_eager():
    q, k, v, pt, lens, kwargs = _case("bf16-sinks-window-splits", seed=2)
    num_kv_heads, page_size = k.shape[2], k.shape[1]
    # xqa's scratch and the batch API's semaphores must not share memory: separate buffers.
    workspace = torch.zeros(64 << 20, dtype=torch.uint8, device=q.device)
    semaphores = torch.zeros(1 << 16, dtype=torch.uint32, device=q.device)
    batch_workspace = torch.zeros(64 << 20, dtype=torch.uint8, device=q.device)
    sinks, window = kwargs["sinks"], kwargs["sliding_window"]
    head_dim = q.shape[-1]

    def step(q, k, v, pt, lens, bmm1):
        out = torch.empty_like(q)
        xqa(q, k, v, pt, lens, out, workspace, semaphores, num_kv_heads, page_size, sinks=sinks, q_scale=0.7,
            sliding_win_size=window)
        batch_out = xqa_batch_decode_with_kv_cache(q.squeeze(1), (k, v), batch_workspace, pt, lens, 0,
                                                   bmm1_scale=bmm1, window_left=window - 1, sinks=sinks.reshape(-1))
        return torch.stack([out.squeeze(1), batch_out])

    bmm1 = torch.full((1,), 0.7 / math.sqrt(head_dim), device=q.device)
    eager = step(q, k, v, pt, lens, bmm1)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(q, k, v, pt, lens, bmm1), eager)
    # The op's writes to the workspace happen in place: a functionalised copy would allocate 64 MiB.
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    assert torch.equal(compiled(q, k, v, pt, lens, bmm1), eager)
    assert torch.cuda.max_memory_allocated() - before < 8 << 20
    reference = xqa_decode(q, k, v, pt, lens, **kwargs)
    assert torch.equal(eager[0], reference.squeeze(1))
    # The batch API's q_scale is computed from bmm1_scale on the device: it may round differently.
    assert relative_l2_error(eager[1].float(), reference.squeeze(1).float()) < 1e-3


@pytest.mark.parametrize("name", CASES)
def test_wrapper_runs_every_layer_like_xqa_decode(name):
    q, k, v, pt, lens, kwargs = _case(name, seed=3)
    layers = _layers(k, v)
    queries = [q] + [torch.randn_like(q, dtype=torch.float32).to(q.dtype) for _ in layers[1:]]
    shape = dict(num_q_heads=q.shape[-2], q_dtype=q.dtype, q_seq_len=CASES[name][1],
                 kv_layout=kwargs["kv_layout"])
    need = DecodeWrapper.workspace_bytes(max_batch=q.shape[0], num_kv_heads=k.shape[2], head_dim=k.shape[-1],
                                         page_size=k.shape[1], kv_dtype=k.dtype, max_kv_len=pt.shape[1] * k.shape[1],
                                         sm_count=torch.cuda.get_device_properties(q.device).multi_processor_count,
                                         sinks="sinks" in kwargs, sliding_window="sliding_window" in kwargs,
                                         **{n: shape[n] for n in ("num_q_heads", "q_dtype", "q_seq_len")})
    wrapper = DecodeWrapper(Workspace.allocate(q.device, *need))
    wrapper.plan(pt, lens, k, **shape, mask=kwargs.get("mask"), sinks=kwargs.get("sinks"),
                 sliding_window=kwargs.get("sliding_window", 0), q_scale=kwargs["q_scale"],
                 kv_scale=kwargs.get("kv_scale", 1.0))
    default = prepare_decode(q, k, v, pt, lens, **kwargs)
    assert wrapper.plan_info == default.plan  # the engine's workspace holds what the default plan splits into
    outs = [torch.full_like(q, float("nan")) for _ in layers]
    for query, (k_layer, v_layer), out in zip(queries, layers, outs):
        wrapper.run(query, k_layer, v_layer, out)
    for query, (k_layer, v_layer), out in zip(queries, layers, outs):
        assert torch.equal(out, xqa_decode(query, k_layer, v_layer, pt, lens, **kwargs))


def test_wrapper_runs_replay_in_a_cuda_graph_on_new_step_values():
    q, k, v, pt, lens, kwargs = _case("bf16-sinks-window-splits", seed=4)
    layers = _layers(k, v, 2)
    wrapper = DecodeWrapper(Workspace.allocate(q.device))
    wrapper.plan(pt, lens, k, num_q_heads=q.shape[-2], q_dtype=q.dtype, sinks=kwargs["sinks"],
                 sliding_window=kwargs["sliding_window"], q_scale=kwargs["q_scale"])
    outs = [torch.empty_like(q) for _ in layers]
    for (k_layer, v_layer), out in zip(layers, outs):  # loads the kernel outside the capture
        wrapper.run(q, k_layer, v_layer, out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for (k_layer, v_layer), out in zip(layers, outs):
            wrapper.run(q, k_layer, v_layer, out)
    for trial in range(2):
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(q.dtype))
        lens.sub_(lens // 3)  # the step's lengths change in place (within each request's pages)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        for (k_layer, v_layer), out in zip(layers, outs):
            assert torch.equal(out, xqa_decode(q, k_layer, v_layer, pt, lens, **kwargs)), f"replay {trial}"


def test_hot_paths_never_synchronise():
    """100 calls of each hot-path entry point under torch's sync debug mode "error" (first calls,
    which load the kernels and plan each geometry, run before)."""
    q, k, v, pt, lens, kwargs = _case("fp8-specdec-tree", seed=5)
    num_kv_heads, page_size, head_dim = k.shape[2], k.shape[1], q.shape[-1]
    mask, kv_scale = kwargs["mask"], kwargs["kv_scale"]
    kv_scale_tensor = torch.full((1,), kv_scale, device=q.device)
    out = torch.empty_like(q)
    workspace = Workspace.allocate(q.device)
    fi_workspace = torch.zeros(128 << 20, dtype=torch.uint8, device=q.device)
    fi_semaphores = torch.zeros(1 << 16, dtype=torch.uint32, device=q.device)
    batch_workspace = torch.zeros(128 << 20, dtype=torch.uint8, device=q.device)  # semaphores first: its own
    wrapper = DecodeWrapper(workspace)
    wrapper.plan(pt, lens, k, num_q_heads=q.shape[-2], q_dtype=q.dtype, q_seq_len=4, mask=mask,
                 q_scale=kwargs["q_scale"], kv_scale=kv_scale_tensor)
    query = q.view(-1, q.shape[-2], head_dim)
    batch_out = torch.empty(q.shape[0], 4, q.shape[-2], head_dim, dtype=q.dtype, device=q.device)
    fi_mask = as_flashinfer_mask(mask)
    bmm1 = torch.full((1,), kwargs["q_scale"] * kv_scale / math.sqrt(head_dim), device=q.device)
    entries = {
        "run": lambda: wrapper.run(q, k, v, out),
        "op": lambda: ops.decode(q, k, v, pt, lens, out, workspace=workspace, mask=mask, q_scale=kwargs["q_scale"],
                                 kv_scale=kv_scale_tensor),
        "xqa": lambda: xqa(q, k, v, pt, lens, out, fi_workspace, fi_semaphores, num_kv_heads, page_size,
                           q_scale=kwargs["q_scale"], kv_scale=kv_scale_tensor, q_seq_len=4, mask=fi_mask),
        "batch, float scales": lambda: xqa_batch_decode_with_kv_cache(
            query, (k, v), batch_workspace, pt, lens, 0,
            bmm1_scale=kwargs["q_scale"] * kv_scale / math.sqrt(head_dim),
            bmm2_scale=kv_scale, out=batch_out, q_len_per_req=4, mask=fi_mask),
        "batch, tensor scales": lambda: xqa_batch_decode_with_kv_cache(
            query, (k, v), batch_workspace, pt, lens, 0, bmm1_scale=bmm1, bmm2_scale=kv_scale_tensor, out=batch_out,
            q_len_per_req=4, mask=fi_mask),
        "xqa_decode": lambda: xqa_decode(q, k, v, pt, lens, out=out, workspace=workspace, validate=False, **kwargs),
    }
    for fn in entries.values():
        fn()
    torch.cuda.synchronize()
    for name, fn in entries.items():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(100):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    reference = xqa_decode(q, k, v, pt, lens, **kwargs)
    assert torch.equal(out, reference)
    assert relative_l2_error(batch_out.float(), reference.view(batch_out.shape).float()) < 1e-3


def test_validate_false_relaunches_with_new_pointers():
    """The per-geometry cache rewrites every pointer: other queries, caches and lengths of the same
    shape give their own results."""
    q, k, v, pt, lens, kwargs = _case("bf16-sinks-window-splits", seed=6)
    results = []
    for (k_layer, v_layer) in _layers(k, v):
        query = torch.randn_like(q, dtype=torch.float32).to(q.dtype)
        other_lens = (lens - torch.arange(lens.numel(), device=lens.device, dtype=lens.dtype)).clamp(min=1)
        out = xqa_decode(query, k_layer, v_layer, pt, other_lens, validate=False, **kwargs)
        results.append((out, xqa_decode(query, k_layer, v_layer, pt, other_lens, **kwargs)))
    for out, expected in results:
        assert torch.equal(out, expected)


def test_fp8_mma_reaches_the_kernel_through_every_entry_point():
    """fp8_mma=True runs the fp8 MMA variant (other bytes than the default's) alike through
    xqa_decode, its per-geometry path, the op (C++ kernel or Python) and the wrapper; the default
    launched in between, same geometry, is not confused with it."""
    from xqagen.emitters import PATHS
    from xqagen.runtime import device_arch

    if PATHS["hopper"].target_arch(device_arch(torch.device("cuda"))) is None:
        pytest.skip("the fp8 MMA mode runs on the Hopper path (sm_90)")
    q, k, v, pt, lens, kwargs = _case("fp8-specdec-tree", seed=4)
    fast = xqa_decode(q, k, v, pt, lens, fp8_mma=True, **kwargs)
    exact = xqa_decode(q, k, v, pt, lens, **kwargs)
    assert not torch.equal(fast, exact) and relative_l2_error(fast.float(), exact.float()) < 5e-2
    for _ in range(2):  # the per-geometry path: bound once, then relaunched, each mode its own entry
        assert torch.equal(xqa_decode(q, k, v, pt, lens, fp8_mma=True, validate=False, **kwargs), fast)
        assert torch.equal(xqa_decode(q, k, v, pt, lens, validate=False, **kwargs), exact)
        assert torch.equal(ops.decode(q, k, v, pt, lens, torch.empty_like(q), fp8_mma=True, **kwargs), fast)
        assert torch.equal(ops.decode(q, k, v, pt, lens, torch.empty_like(q), **kwargs), exact)
    wrapper = DecodeWrapper()
    wrapper.plan(pt, lens, k, num_q_heads=q.shape[-2], q_dtype=q.dtype, q_seq_len=q.shape[2], mask=kwargs["mask"],
                 q_scale=kwargs["q_scale"], kv_scale=kwargs["kv_scale"], fp8_mma=True)
    assert "fp8_mma" in wrapper.plan_info.spec.features
    out = torch.full_like(q, float("nan"))
    wrapper.run(q, k, v, out)
    assert torch.equal(out, xqa_decode(q, k, v, pt, lens, fp8_mma=True, num_splits=wrapper.plan_info.num_splits,
                                       **kwargs))
