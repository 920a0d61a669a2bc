"""The serving-engine surface without a GPU: the custom op's schema and fake implementation, graphs
without breaks under torch.compile (traced on meta tensors), the per-geometry launch cache, the
pointer and launch-configuration layouts, the wrapper's workspace sizing, and which tensor
operations the FlashInfer batch API's scale mapping costs."""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from xqagen import api, ops  # noqa: F401  (ops registers torch.ops.xqagen.decode)
from xqagen.emitters import LaunchShape, WorkspaceSize
from xqagen.emitters.params import KernelParams
from xqagen.flashinfer_compat import SEMAPHORE_BYTES, xqa, xqa_batch_decode_with_kv_cache
from xqagen.plan import plan_launch
from xqagen.runtime import POINTER_FIELDS, POINTER_WORDS, _LaunchAttribute, _LaunchConfig
from xqagen.spec import KernelSpec
from xqagen.wrapper import DecodeWrapper

OP = torch.ops.xqagen.decode.default


def _tensors(device, *, batch=2, q_seq_len=1):
    shape = (batch, 1, 16, 128) if q_seq_len == 1 else (batch, 1, q_seq_len, 16, 128)
    q = torch.empty(shape, dtype=torch.bfloat16, device=device)
    k = torch.empty(10, 16, 2, 128, dtype=torch.bfloat16, device=device)
    return q, k, torch.empty_like(k), torch.zeros(batch, 4, dtype=torch.int32, device=device), \
        torch.ones(batch, dtype=torch.int32, device=device)


def _op_args(q, k, v, pt, lens, out, **overrides):
    args = dict(workspace=None, semaphores=None, sinks=None, mask=None, q_scale_tensor=None, kv_scale_tensor=None,
                q_scale=1.0, kv_scale=1.0, rcp_out_scale=1.0, sliding_window=0, kv_layout="NHD", num_splits=0,
                sm_count=0, enable_pdl=False)
    args.update(overrides)
    return (q, k, v, pt, lens, out, *args.values())


def test_op_schema_declares_what_it_writes():
    schema = OP._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"out", "workspace", "semaphores"}
    optional = {a.name for a in schema.arguments if isinstance(a.type, torch.OptionalType)}
    assert optional == {"workspace", "semaphores", "sinks", "mask", "q_scale_tensor", "kv_scale_tensor",
                        "q_cu_seq_lens"}
    assert not schema.returns


def test_fake_implementation_on_fake_cuda_tensors():
    with FakeTensorMode():
        q, k, v, pt, lens = _tensors("cuda")
        assert OP(*_op_args(q, k, v, pt, lens, torch.empty_like(q))) is None
        with pytest.raises(ValueError, match="out: expected q's shape"):
            OP(*_op_args(q, k, v, pt, lens, torch.empty(2, 1, 16, 64, dtype=q.dtype, device="cuda")))


def test_opcheck_schema_and_fake_on_meta_tensors():
    q, k, v, pt, lens = _tensors("meta")
    ws = torch.empty(1 << 20, dtype=torch.uint8, device="meta")
    sem = torch.empty(64, dtype=torch.int32, device="meta")
    torch.library.opcheck(OP, _op_args(q, k, v, pt, lens, torch.empty_like(q), workspace=ws, semaphores=sem,
                                       q_scale_tensor=torch.ones(1, device="meta")),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_op_reports_bad_arguments_on_cpu_tensors():
    q, k, v, pt, lens = _tensors("cpu")
    with pytest.raises(ValueError, match="expected CUDA tensors"):
        OP(*_op_args(q, k, v, pt, lens, torch.empty_like(q)))
    with pytest.raises(ValueError, match="k_cache: expected dtype in"):
        OP(*_op_args(q, k.half(), v.half(), pt, lens, torch.empty_like(q)))


class _Graphs:
    """A torch.compile backend that keeps each graph it is given and runs it as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def ops(self) -> list[str]:
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("backend", ["graphs", "aot_eager"])
def test_compat_entry_points_compile_into_one_graph(backend):
    """fullgraph=True fails on any graph break; aot_eager also functionalises the op's writes."""
    torch._dynamo.reset()
    graphs = _Graphs()
    q, k, v, pt, lens = _tensors("meta")
    ws = torch.empty(16 << 20, dtype=torch.uint8, device="meta")
    sem = torch.empty(64, dtype=torch.uint32, device="meta")
    sinks = torch.empty(2, 8, device="meta")

    def step(q, k, v, pt, lens, ws, sem, bmm1, sinks):
        out = torch.empty_like(q)
        xqa(q, k, v, pt, lens, out, ws, sem, 2, 16, sinks=sinks, kv_scale=0.5)
        batch_out = xqa_batch_decode_with_kv_cache(q.view(2, 16, 128), (k, v), ws, pt, lens, 64, bmm1_scale=bmm1,
                                                   bmm2_scale=0.5, sinks=sinks.view(-1))
        return out.float() + batch_out.unsqueeze(1).float()

    compiled = torch.compile(step, backend=graphs if backend == "graphs" else backend, fullgraph=True)
    result = compiled(q, k, v, pt, lens, ws, sem, torch.ones(1, device="meta"), sinks)
    assert result.shape == q.shape
    if backend == "graphs":
        assert len(graphs.graphs) == 1
        assert graphs.ops().count("xqagen.decode.default") == 2


def test_ops_decode_compiles_with_tensor_scales():
    torch._dynamo.reset()
    graphs = _Graphs()
    q, k, v, pt, lens = _tensors("meta", q_seq_len=4)
    mask = torch.empty(2, 4, 1, dtype=torch.int32, device="meta")

    def step(q, k, v, pt, lens, mask, q_scale):
        return ops.decode(q, k, v, pt, lens, torch.empty_like(q), q_scale=q_scale, kv_scale=0.25, mask=mask,
                          sliding_window=64, num_splits=2)

    out = torch.compile(step, backend=graphs, fullgraph=True)(q, k, v, pt, lens, mask, torch.ones(1, device="meta"))
    assert out.shape == q.shape and graphs.ops().count("xqagen.decode.default") == 1


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


ARITHMETIC = {"mul", "div", "add", "sub", "reciprocal", "_to_copy", "copy_"}


@pytest.mark.parametrize("bmm1, bmm2, o_scale, kernels", [
    (0.1, 0.5, 1.0, 0),   # float scales: no tensor arithmetic at all
    ("tensor", 0.5, 1.0, 1),  # q_scale = bmm1 * const
    (0.1, "tensor", 1.0, 2),  # q_scale = const / bmm2 (reciprocal, mul); kv_scale is bmm2 itself
    (0.1, "tensor", 2.0, 3),  # kv_scale = bmm2 * o_scale too
    ("tensor", "tensor", 1.0, 2),  # q_scale = bmm1 * const / bmm2
])
def test_batch_api_scale_mapping_costs(bmm1, bmm2, o_scale, kernels):
    """What the batch API's scale mapping launches per call (each arithmetic op is one elementwise
    kernel on a GPU; nothing reads a value back to the host)."""
    q, k, v, pt, lens = _tensors("meta")
    ws = torch.empty(16 << 20, dtype=torch.uint8, device="meta")
    scale = lambda s: torch.full((1,), 0.3, device="meta") if s == "tensor" else s  # noqa: E731
    bmm1, bmm2 = scale(bmm1), scale(bmm2)
    with _AtenOps() as seen:
        xqa_batch_decode_with_kv_cache(q.view(2, 16, 128), (k, v), ws, pt, lens, 64, bmm1_scale=bmm1,
                                       bmm2_scale=bmm2, o_scale=o_scale, out=torch.empty(2, 16, 128, dtype=q.dtype,
                                                                                         device="meta"))
    assert sum(op in ARITHMETIC for op in seen.ops) == kernels, seen.ops
    assert "item" not in seen.ops and "_local_scalar_dense" not in seen.ops
    assert seen.ops.count("decode") == 1


class _StubLaunch:
    """Stands in for a bound launch: its struct's words a list; the pointers of each refresh and each
    launch recorded."""

    def __init__(self, pointers=None):
        self.words = [0] * (max(POINTER_WORDS.values()) + 1)
        for name, value in (pointers or {}).items():
            self.words[POINTER_WORDS[name]] = value
        self.refreshed = []
        self.launched = []

    def _pointers(self):
        return {name: self.words[POINTER_WORDS[name]] for name in POINTER_FIELDS}

    def refresh(self):
        self.refreshed.append(self._pointers())

    def __call__(self):
        self.launched.append(self._pointers())


def test_launch_cache_binds_once_per_geometry_and_rewrites_pointers(monkeypatch):
    binds = []

    def bind(q, k, v, pt, lens, out, scratch, semaphores, sinks, mask, *rest):
        pointers = {name: t.data_ptr() if t is not None else 0 for name, t in (
            ("q", q), ("k", k), ("v", v), ("page_table", pt), ("seq_lens", lens), ("out", out), ("sinks", sinks))}
        binds.append(_StubLaunch({**pointers, "workspace": 4096}))  # the default workspace's, kept on later calls
        return binds[-1]

    monkeypatch.setattr(api, "_bind", bind)
    monkeypatch.setattr(api, "_launches", api._LaunchCache())
    sinks = torch.zeros(2, 8)

    def call(q, k, v, pt, lens, out, **overrides):
        api.launch_decode(*_op_args(q, k, v, pt, lens, out, **{"sinks": sinks, **overrides}))

    layers = [_tensors("cpu") for _ in range(3)]
    outs = [torch.empty_like(layer[0]) for layer in layers]
    for layer, out in zip(layers, outs):
        call(*layer, out)
    assert len(binds) == 1  # one geometry
    launched = binds[0].launched
    assert binds[0].refreshed == launched[1:]  # each repeat refreshes after writing its pointers
    for (q, k, v, pt, lens), out, seen in zip(layers, outs, launched):
        assert seen == {**seen, "q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr(), "page_table": pt.data_ptr(),
                        "seq_lens": lens.data_ptr(), "out": out.data_ptr(), "sinks": sinks.data_ptr(),
                        "workspace": 4096}
    call(*layers[0], outs[0], kv_scale=0.5)  # another option value: another plan
    q, k, v, pt, lens = layers[0]
    call(q[:1], k, v, pt[:1], lens[:1], outs[0][:1])  # another batch: another plan
    assert len(binds) == 3
    misaligned = torch.empty(q.numel() + 4, dtype=q.dtype)[4:].view(q.shape)  # 8 bytes off
    assert misaligned.data_ptr() % 16
    call(misaligned, k, v, pt, lens, outs[0])  # the cached geometry, a pointer to check again
    assert len(binds) == 4


# launch_decode's arguments with every optional tensor given, so that each can differ on its own.
_GEOMETRY_TENSORS = ("q", "k_cache", "v_cache", "page_table", "seq_lens", "out", "workspace", "semaphores", "sinks",
                     "mask", "q_scale_tensor", "kv_scale_tensor", "q_cu_seq_lens")
_GEOMETRY_OPTIONS = dict(q_scale=0.5, kv_scale=0.25, rcp_out_scale=2.0, sliding_window=64, kv_layout="HND",
                         num_splits=2, sm_count=8, enable_pdl=True, q_seq_len=4)
_GEOMETRY_KEYWORDS = dict(tile="split", path="generic", cache_dir="elsewhere")


def _full_geometry():
    q, k, v, pt, lens = _tensors("cpu")
    tensors = dict(q=q, k_cache=k, v_cache=v, page_table=pt, seq_lens=lens, out=torch.empty_like(q),
                   workspace=torch.empty(1024), semaphores=torch.zeros(64, dtype=torch.int32),
                   sinks=torch.zeros(2, 8), mask=torch.zeros(2, 1, 1, dtype=torch.int32), q_scale_tensor=torch.ones(1),
                   kv_scale_tensor=torch.ones(1), q_cu_seq_lens=torch.zeros(3, dtype=torch.int32))
    return tensors, dict(q_scale=1.0, kv_scale=1.0, rcp_out_scale=1.0, sliding_window=0, kv_layout="NHD",
                         num_splits=0, sm_count=0, enable_pdl=False, q_seq_len=0), {}


def _launch_geometry(tensors, options, keywords):
    t = tensors
    api.launch_decode(t["q"], t["k_cache"], t["v_cache"], t["page_table"], t["seq_lens"], t["out"], t["workspace"],
                      t["semaphores"], t["sinks"], t["mask"], t["q_scale_tensor"], t["kv_scale_tensor"],
                      options["q_scale"], options["kv_scale"], options["rcp_out_scale"], options["sliding_window"],
                      options["kv_layout"], options["num_splits"], options["sm_count"], options["enable_pdl"],
                      t["q_cu_seq_lens"], options["q_seq_len"], **keywords)


def _geometry_changes():
    """(what changed, a function of the base call's tensors, options and keywords giving the changed
    ones): every field of a bound launch's geometry on its own."""
    def tensor(name, make):
        return lambda t, o, k: ({**t, name: make(t[name])}, o, k)

    changes = []
    for name in _GEOMETRY_TENSORS:
        changes += [
            (f"{name} shape", tensor(name, lambda x: torch.empty((x.shape[0] + 1, *x.shape[1:]), dtype=x.dtype))),
            (f"{name} strides", tensor(name, lambda x: torch.empty(2 * x.numel(), dtype=x.dtype).as_strided(
                x.shape, tuple(2 * s for s in x.stride())))),
            (f"{name} dtype", tensor(name, lambda x: torch.empty_like(
                x, dtype=torch.float16 if x.dtype != torch.float16 else torch.bfloat16))),
        ]
        if name not in _GEOMETRY_TENSORS[:6]:
            changes.append((f"{name} None", tensor(name, lambda x: None)))
    changes.append(("q device", tensor("q", lambda x: x.to("meta"))))
    changes += [(name, lambda t, o, k, name=name, value=value: (t, {**o, name: value}, k))
                for name, value in _GEOMETRY_OPTIONS.items()]
    changes += [(name, lambda t, o, k, name=name, value=value: (t, o, {**k, name: value}))
                for name, value in _GEOMETRY_KEYWORDS.items()]
    return changes


def test_launch_cache_keys_every_field_of_the_geometry(monkeypatch):
    """A call that differs from a bound geometry in any one shape, stride, dtype, device or option
    binds anew; the bound geometry's next call launches its own launch again."""
    binds = []

    def bind(*args):
        binds.append(_StubLaunch())
        return binds[-1]

    monkeypatch.setattr(api, "_bind", bind)
    monkeypatch.setattr(api, "_launches", api._LaunchCache())
    base = _full_geometry()
    _launch_geometry(*base)
    changes = _geometry_changes()
    assert len(changes) == 3 * len(_GEOMETRY_TENSORS) + len(_GEOMETRY_TENSORS) - 6 + 1 + len(_GEOMETRY_OPTIONS) + \
        len(_GEOMETRY_KEYWORDS)
    for number, (what, change) in enumerate(changes, start=1):
        _launch_geometry(*change(*base))
        assert len(binds) == 1 + number, f"a call with another {what} reused a bound launch"
        _launch_geometry(*base)
        assert len(binds) == 1 + number and len(binds[0].launched) == 1 + number, what


def test_launch_cache_rewrites_the_callers_workspace_and_fault_word(monkeypatch):
    bound = _StubLaunch()
    monkeypatch.setattr(api, "_bind", lambda *args: bound)
    monkeypatch.setattr(api, "_launches", api._LaunchCache())
    tensors, options, keywords = _full_geometry()
    _launch_geometry(tensors, options, keywords)
    for semaphores in (torch.zeros(64, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)):
        workspace = torch.empty(1024)
        for _ in range(2):  # bound, then from the cache
            _launch_geometry({**tensors, "workspace": workspace, "semaphores": semaphores}, options, keywords)
        faults = semaphores.data_ptr() + 4 * 63 if semaphores.numel() else 0
        assert bound.launched[-1] == {**bound.launched[-1], "workspace": workspace.data_ptr(),
                                      "semaphores": semaphores.data_ptr(), "faults": faults}


def test_pointer_fields_are_written_where_the_struct_declares_them():
    """A bound launch's words (the struct as 64-bit words) at POINTER_WORDS are the pointer fields."""
    params = KernelParams(q_stride_batch=7, kv_scale=0.5, num_kv_heads=3)
    words = memoryview(params).cast("B").cast("Q")
    values = {name: (1 << 40) + 16 * i for i, name in enumerate(POINTER_FIELDS)}
    for name, value in values.items():
        words[POINTER_WORDS[name]] = value
    assert {name: getattr(params, name) for name in POINTER_FIELDS} == values
    assert (params.q_stride_batch, params.kv_scale, params.num_kv_heads) == (7, 0.5, 3)


def test_launch_config_matches_cuda_h(tmp_path):
    """The ctypes launch configuration has cuda.h's layout (compiled with the host C compiler)."""
    from cuda.pathfinder import find_nvidia_header_directory

    compiler = shutil.which("cc") or shutil.which("gcc")
    include = find_nvidia_header_directory("cudart")
    if compiler is None or include is None:
        pytest.skip("needs a C compiler and cuda.h")
    source = tmp_path / "layout.c"
    source.write_text("#include <cuda.h>\n#include <stddef.h>\n#include <stdio.h>\nint main(void) {\n"
                      '  printf("%zu %zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUlaunchConfig),\n'
                      "    offsetof(CUlaunchConfig, sharedMemBytes), offsetof(CUlaunchConfig, hStream),\n"
                      "    offsetof(CUlaunchConfig, attrs), offsetof(CUlaunchConfig, numAttrs),\n"
                      "    sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value),\n"
                      "    (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);\n  return 0;\n}\n")
    binary = tmp_path / "layout"
    subprocess.run([compiler, f"-I{include}", str(source), "-o", str(binary)], check=True)
    printed = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    expected = [int(x) for x in printed.split()]
    from xqagen.runtime import _PROGRAMMATIC_STREAM_SERIALIZATION

    ours = [ctypes.sizeof(_LaunchConfig), _LaunchConfig.shared_mem_bytes.offset, _LaunchConfig.stream.offset,
            _LaunchConfig.attrs.offset, _LaunchConfig.num_attrs.offset, ctypes.sizeof(_LaunchAttribute),
            _LaunchAttribute.value.offset, _PROGRAMMATIC_STREAM_SERIALIZATION]
    assert ours == expected


@pytest.mark.parametrize("kv_dtype, page_size, q_seq_len, sm_count", [
    (torch.float8_e4m3fn, 64, 1, 132), (torch.bfloat16, 16, 4, 78), (torch.bfloat16, 64, 1, 8)])
def test_workspace_bytes_covers_every_step(kv_dtype, page_size, q_seq_len, sm_count):
    """Against every batch and every KV length in pages: each plan fits, and the bound is reached."""
    kwargs = dict(num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=page_size, q_dtype=torch.bfloat16,
                  kv_dtype=kv_dtype, q_seq_len=q_seq_len)
    max_batch, max_kv_len = 6, 20000
    scratch, semaphores = DecodeWrapper.workspace_bytes(max_batch=max_batch, max_kv_len=max_kv_len,
                                                        sm_count=sm_count, **kwargs)
    spec = KernelSpec(q_dtype="bf16", kv_dtype="e4m3" if kv_dtype == torch.float8_e4m3fn else "bf16", head_dim=128,
                      group=4, page_size=page_size, q_seq_len=q_seq_len)
    unbounded, largest = WorkspaceSize(1 << 62, 1 << 62), WorkspaceSize(0, 0)
    for batch in range(1, max_batch + 1):
        for kv_len in range(page_size, max_kv_len + page_size, page_size):
            plan = plan_launch(spec, LaunchShape(batch, 8, kv_len, sm_count), workspace=unbounded)
            need = plan.path.workspace_need(plan.spec, batch, 8, plan.num_splits)
            largest = WorkspaceSize(max(largest.floats, need.floats), max(largest.semaphores, need.semaphores))
            fits = WorkspaceSize(scratch // 4, semaphores - 1)  # the last word is the fault word
            assert plan_launch(spec, LaunchShape(batch, 8, kv_len, sm_count), workspace=fits) == plan
    assert (4 * largest.floats, largest.semaphores + 1) == (scratch, semaphores)


def test_wrapper_needs_a_plan_on_a_gpu():
    q, k, v, pt, lens = _tensors("cpu")
    wrapper = DecodeWrapper()
    with pytest.raises(RuntimeError, match="call plan"):
        wrapper.run(q, k, v, torch.empty_like(q))
    with pytest.raises(ValueError, match="page_table: expected a CUDA tensor"):
        wrapper.plan(pt, lens, k, num_q_heads=16, q_dtype=torch.bfloat16)


def test_batch_api_workspace_split_is_flashinfers():
    assert SEMAPHORE_BYTES == 8 << 20


def test_wrapper_describes_a_step_from_shapes_and_one_layers_cache():
    """plan()'s checks: the layer tensors described by shape alone, the step's tensors as given."""
    from xqagen.reference import make_paged_kv
    from xqagen.wrapper import _describe_step

    k, _, pt = make_paged_kv(3, [100, 40, 7], 2, 64, 16, torch.float8_e4m3fn, "HND")
    step = dict(num_q_heads=10, q_dtype=torch.float16, out_dtype=None, q_seq_len=4, kv_layout="HND", q_strides=None,
                out_strides=None, mask=torch.zeros(3, 4, 1, dtype=torch.int32), sinks=torch.zeros(2, 5),
                sliding_window=50, q_scale=0.5, kv_scale=torch.ones(1), rcp_out_scale=1.0)
    lens = torch.tensor([100, 40, 7], dtype=torch.int32)
    problem = _describe_step(pt, lens, k, **step)
    assert (problem.batch, problem.num_kv_heads, problem.group, problem.head_dim, problem.q_seq_len,
            problem.page_size) == (3, 2, 5, 64, 4, 16)
    assert problem.spec() == KernelSpec(q_dtype="fp16", kv_dtype="e4m3", head_dim=64, group=5, page_size=16,
                                        q_seq_len=4, features=frozenset({"sinks", "sliding_window"}))
    params = problem.params()
    assert (params["kv_stride_page"], params["kv_stride_head"], params["kv_stride_token"]) == k.stride()[:3]
    assert (params["q_stride_batch"], params["q_stride_token"], params["q_stride_head"]) == (4 * 10 * 64, 10 * 64, 64)
    assert params["q_scale"] == 0.5 and params["kv_scale"] == 1.0  # a tensor scale is read through its pointer
    strided = _describe_step(pt, lens, k, **{**step, "q_strides": (4 * 30 * 64, 0, 30 * 64, 64, 1)})
    assert strided.params()["q_stride_batch"] == 4 * 30 * 64
    for change, message in [(dict(num_q_heads=9), "dividing num_q_heads = 9"),
                            (dict(q_dtype=torch.float32), "q: expected dtype in"),
                            (dict(mask=None), "mask: expected a packed speculative-decoding mask"),
                            (dict(sinks=torch.zeros(3, 5)), "sinks: expected a contiguous float32 tensor"),
                            (dict(q_strides=(1, 1, 1, 1, 2)), "q: expected a contiguous last")]:
        with pytest.raises(ValueError, match=message):
            _describe_step(pt, lens, k, **{**step, **change})
    with pytest.raises(ValueError, match="kv_cache: expected a 4-D page pool"):
        _describe_step(pt, lens, k[0], **step)


def test_validate_false_still_names_bad_arguments():
    q, k, v, pt, lens = _tensors("cpu")
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        api.xqa_decode(None, k, v, pt, lens, validate=False)
    with pytest.raises(ValueError, match="expected CUDA tensors"):
        api.xqa_decode(q, k, v, pt, lens, validate=False)
    with pytest.raises(ValueError, match="sliding_window: expected an integer >= 0"):
        api.xqa_decode(q, k, v, pt, lens, sliding_window=-1, validate=False)


def test_every_pointer_field_is_rewritten():
    """A pointer field added to the parameter struct must be rewritten per call by the launch cache
    and per layer or step by the wrapper; a stand-in's null would otherwise reach the kernel."""
    from xqagen import wrapper

    assert sorted(api.REWRITTEN_POINTERS) == sorted(POINTER_FIELDS)
    planned = wrapper.LAYER_POINTERS + wrapper.STEP_POINTERS + ("workspace", "semaphores", "faults")
    assert sorted(planned) == sorted(POINTER_FIELDS)
