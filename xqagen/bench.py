"""`xqagen bench`: time xqagen's kernels against a device-to-device copy and, when installed,
FlashInfer's XQA on the same inputs in the same process.

Each case is timed two ways, both sides alike: replays of a CUDA graph of 20 launches (the GPU's
time per launch, as a serving engine's captured decode step sees it; the headline number), and
CUDA events around single eager launches (which also count any host launch time the GPU waits
for).  When a case's KV cache is small enough to stay in L2, launches rotate over several input
copies.  Reported: milliseconds, KV bandwidth (KV bytes read / time) against the copy bandwidth
(bytes read + written / time of a large ``copy_``) and the streaming-read bandwidth (a plain
read kernel over 1 GiB), and speed ratios (FlashInfer time / ours) for both timings.  FlashInfer is
timed on each kernel path the case names, forced through its module API, and through its public
``xqa``, which picks the path itself as it would in an engine.  Both libraries launch without
programmatic dependent launch, or both with it (``--pdl``, sm_90+).

``--host-time`` measures the host instead: the median wall-clock microseconds of one eager call of
each entry point (:func:`host_time_us`), FlashInfer's ``xqa`` and batch API beside ours.  Columns:
``run`` (:meth:`DecodeWrapper.run`, planned once), ``op`` (``torch.ops.xqagen.decode``), ``xqa`` and
``batch`` (the FlashInfer-compatible entry points), ``decode`` (``xqa_decode(validate=False)``),
``launch`` (a prepared :class:`~xqagen.api.DecodeCall`), ``FI xqa`` and ``FI batch`` (FlashInfer's).
A serving engine that runs attention outside CUDA graphs (vLLM's piecewise graphs, eager mode)
pays this per layer and step; it is hidden only while the GPU is slower than the host.

``--pdl-gemm`` times a serving step's shape of work: a GEMM producing the query (``[tokens,
hidden] x [hidden, hidden]``, ``hidden = num_q_heads x head_dim``), the decode, and a GEMM reading
its output, for both libraries, programmatic dependent launch off and on.  Per step: ``gemms``
(the two GEMMs alone), then per library and PDL setting the step time from CUDA-graph replays and
from eager launches between events.  ``step - gemms`` is what the decode adds to a step; PDL helps
where it shrinks that (the decode's launch and prologue overlap the first GEMM's tail), and the
graph column is what a captured decode step sees.

``--json FILE`` writes one JSON object per line: a header (the device, PDL, the versions the run
used: :func:`run_versions`; for the kernel bench also the copy and streaming-read bandwidths),
then one record per case.  ``--plot FILE`` draws each case's KV bandwidth for xqagen, each
FlashInfer path and FlashInfer's ``xqa`` against those two ceilings (matplotlib, the ``plot``
extra); with ``--from JSON`` it draws a recorded run and runs nothing (records of runs before the
``xqa`` column draw without it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xqagen

from ._torch import torch

from .api import TORCH_DTYPES, prepare_decode, xqa_decode
from .masks import as_flashinfer_mask, causal_mask
from .reference import FP8_VALUE_SCALE, make_paged_kv, relative_l2_error


@dataclass(frozen=True)
class BenchCase:
    name: str
    batch: int
    seq_len: int
    num_q_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 128
    page_size: int = 64
    kv_dtype: str = "bf16"
    q_dtype: str = "bf16"
    q_seq_len: int = 1
    sinks: bool = False
    window: int = 0
    flashinfer_paths: tuple[str, ...] = ("generic",)  # FlashInfer paths to compare with
    fp8_mma: bool = False  # xqagen's opt-in fp8 MMA mode (Q and P in e4m3, as FlashInfer's sm90 kernel)
    shuffled_pages: bool = True  # each request's pages a random permutation of the pool, else consecutive

    @property
    def visible_tokens(self) -> int:
        """The KV tokens of one request that some query row sees: under a sliding window, the last
        window + q_seq_len - 1 (each draft row sees its own last `window` positions)."""
        return min(self.seq_len, self.window + self.q_seq_len - 1) if self.window else self.seq_len

    @property
    def token_bytes(self) -> int:
        """The K and V bytes of one token (every KV head)."""
        return 2 * self.num_kv_heads * self.head_dim * TORCH_DTYPES[self.kv_dtype].itemsize

    @property
    def page_bytes(self) -> int:
        """The K and V bytes of one page of the pool."""
        return self.page_size * self.token_bytes

    @property
    def kv_bytes(self) -> int:
        """The K and V bytes a launch must read: the visible tokens of every request."""
        return self.batch * self.visible_tokens * self.token_bytes


# The rows of the design document's baseline table (H100, FlashInfer 0.6.0).
DESIGN_CASES: tuple[BenchCase, ...] = (
    BenchCase("llama70b_fp8_b64_s8k", 64, 8192, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
    BenchCase("llama70b_bf16_b64_s8k", 64, 8192),
    BenchCase("llama70b_fp8_b8_s32k", 8, 32768, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
    BenchCase("llama70b_fp8_b1_s32k", 1, 32768, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
    BenchCase("specdec4_fp8_b64_s8k", 64, 8192, kv_dtype="e4m3", q_seq_len=4, flashinfer_paths=("generic", "sm90")),
    BenchCase("specdec8_bf16_b32_s8k", 32, 8192, q_seq_len=8),
    BenchCase("specdec8_fp8_b32_s8k", 32, 8192, kv_dtype="e4m3", q_seq_len=8, flashinfer_paths=("generic", "sm90")),
    BenchCase("gptoss_sinks_bf16_b64_s8k", 64, 8192, head_dim=64, sinks=True),
    BenchCase("gptoss_window_bf16_b64_s8k", 64, 8192, head_dim=64, sinks=True, window=128),
    BenchCase("gptoss_specdec4_bf16_b64_s8k", 64, 8192, head_dim=64, sinks=True, q_seq_len=4),
    BenchCase("gptoss_specdec4_window_bf16_b64_s8k", 64, 8192, head_dim=64, sinks=True, window=128, q_seq_len=4),
    BenchCase("llama8b_bf16_p16_b128_s4k", 128, 4096, num_q_heads=32, page_size=16),
    BenchCase("llama8b_fp8_p16_b128_s4k", 128, 4096, num_q_heads=32, page_size=16, kv_dtype="e4m3",
              flashinfer_paths=("generic", "sm90")),
    BenchCase("llama70b_fp8_b256_s2k", 256, 2048, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
    # the opt-in fp8 MMA mode beside FlashInfer's sm90 kernel, which also multiplies e4m3 Q and P
    BenchCase("specdec4_fp8mma_b64_s8k", 64, 8192, kv_dtype="e4m3", q_seq_len=4, flashinfer_paths=("sm90",),
              fp8_mma=True),
    BenchCase("specdec8_fp8mma_b32_s8k", 32, 8192, kv_dtype="e4m3", q_seq_len=8, flashinfer_paths=("sm90",),
              fp8_mma=True),
)


# Small work to large (--sweep): Llama 70B heads, d128, page 64, bf16 and fp8 KV.
SWEEP_CASES: tuple[BenchCase, ...] = tuple(
    BenchCase(f"sweep_{kv}_b{batch}_s{seq // 1024}k", batch, seq, kv_dtype=kv,
              flashinfer_paths=("generic", "sm90") if kv == "e4m3" else ("generic",))
    for kv in ("bf16", "e4m3") for batch in (1, 4, 16, 64, 256) for seq in (1024, 4096, 16384, 65536))


def named_cases(names: list[str]) -> list[BenchCase]:
    """The design and sweep cases of these names, in catalogue order."""
    cases = [c for c in (*DESIGN_CASES, *SWEEP_CASES) if c.name in names]
    unknown = set(names) - {c.name for c in cases}
    if unknown:
        raise ValueError(f"unknown bench case(s) {sorted(unknown)}; see xqagen bench --list (and --sweep --list)")
    return cases


@dataclass
class BenchResult:
    case: BenchCase
    ms: float  # CUDA-graph replay, per launch
    ms_events: float  # eager launches between CUDA events
    kv_tbps: float
    copy_fraction: float
    read_fraction: float
    num_splits: int
    same_read_ms: float = float("nan")  # a streaming read of the case's KV bytes, timed like the decode
    flashinfer_ms: dict[str, float] = field(default_factory=dict)  # by FlashInfer path, and FLASHINFER_XQA
    flashinfer_ms_events: dict[str, float] = field(default_factory=dict)
    flashinfer_rel_diff: dict[str, float] = field(default_factory=dict)

    @property
    def same_read_fraction(self) -> float:
        """The same-size read's time over the decode's: the share of that read's speed reached."""
        return self.same_read_ms / self.ms

    def row(self) -> dict:
        d = asdict(self)
        d["same_read_fraction"] = self.same_read_fraction
        d["case"] = self.case.name
        d["speedup"] = {path: ms / self.ms for path, ms in self.flashinfer_ms.items()}
        d["speedup_events"] = {path: ms / self.ms_events for path, ms in self.flashinfer_ms_events.items()}
        return d


def time_cuda(fn, *, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` launches, each bracketed by CUDA events.

    Includes any host time the GPU waits for between the events (a launch slower on the host
    than on the GPU measures the host): :func:`time_cuda_graph` measures the GPU alone."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    stops = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, stop in zip(starts, stops):
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, stops))


def time_cuda_graph(fn, *, launches: int = 20, replays: int = 30) -> float:
    """Median milliseconds per launch of ``fn()``, from CUDA-graph replays of ``launches`` calls
    in a row: the GPU's time alone, as a serving engine's captured decode step sees it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # loads modules and workspaces outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    return time_cuda(graph.replay, warmup=3, iters=replays) / launches


def copy_bandwidth_tbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (TB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e9


# A streaming read: every thread loads 16-byte vectors, four in flight, and folds them into one word
# written only on an impossible value (so nothing is optimised away and almost nothing is written).
_READ_KERNEL = r"""
extern "C" __global__ void streaming_read(uint4 const* __restrict__ src, long long n, unsigned* sink) {
  long long const stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 const a = __ldcs(src + i), b = __ldcs(src + i + stride);
    uint4 const c = __ldcs(src + i + 2 * stride), d = __ldcs(src + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    uint4 const a = __ldcs(src + i);
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}
"""


class StreamingRead:
    """A plain read kernel (every byte of a buffer once, 16 bytes per thread), the ceiling of a
    decode kernel, which only reads."""

    def __init__(self):
        from .compiler import compile_kernel
        from .runtime import device_arch, load_function

        device = torch.device("cuda", torch.cuda.current_device())
        compiled = compile_kernel(_READ_KERNEL, "streaming_read", device_arch(device))
        self._library, self._function = load_function(compiled.cubin, "streaming_read", device.index)
        self._sink = torch.zeros(1, dtype=torch.int32, device=device)
        self._sm_count = torch.cuda.get_device_properties(device).multi_processor_count

    def launcher(self, src: torch.Tensor, blocks_per_sm: int = 2, threads: int = 512):
        """A no-argument launch that reads ``src`` (its size a multiple of 16 bytes)."""
        import ctypes

        from cuda.bindings import driver

        from .runtime import _check

        args = (ctypes.c_uint64 * 3)(src.data_ptr(), src.numel() * src.element_size() // 16, self._sink.data_ptr())
        arg_ptrs = (ctypes.c_void_p * 3)(*(ctypes.addressof(args) + 8 * k for k in range(3)))

        def launch():
            _check(driver.cuLaunchKernel(self._function, blocks_per_sm * self._sm_count, 1, 1, threads, 1, 1, 0,
                                         torch.cuda.current_stream().cuda_stream, ctypes.addressof(arg_ptrs), 0))
        launch.keep = (args, arg_ptrs, src)  # what the driver reads at each launch
        return launch

    def bandwidth_tbps(self, nbytes: int = 1 << 30) -> float:
        """The best of a few grid shapes over ``nbytes``, eager launches timed with events."""
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
        return max(nbytes / time_cuda(self.launcher(src, blocks, threads)) / 1e9
                   for blocks, threads in ((2, 512), (4, 512), (2, 1024)))

    def same_size_ms(self, nbytes: int, copies: int) -> float:
        """CUDA-graph milliseconds of reading ``nbytes`` (a decode's KV bytes), rotating over
        ``copies`` buffers as the decode's inputs rotate: a short read pays the same ramp-up."""
        nbytes = -(-nbytes // 16) * 16
        launches = [self.launcher(torch.empty(nbytes, dtype=torch.uint8, device="cuda")) for _ in range(copies)]
        return time_cuda_graph(_rotating(lambda i: launches[i](), copies))


def read_bandwidth_tbps(nbytes: int = 1 << 30) -> float:
    """Streaming-read bandwidth (TB/s) of :class:`StreamingRead`."""
    return StreamingRead().bandwidth_tbps(nbytes)


class _Inputs:
    def __init__(self, case: BenchCase, copies: int, seed: int = 0):
        device = torch.device("cuda")
        gen = torch.Generator(device=device).manual_seed(seed)
        self.group = case.num_q_heads // case.num_kv_heads
        lens = [case.seq_len] * case.batch
        self.sets = [make_paged_kv(case.batch, lens, case.num_kv_heads, case.head_dim, case.page_size,
                                   TORCH_DTYPES[case.kv_dtype], shuffle=case.shuffled_pages, generator=gen,
                                   device=device)
                     for _ in range(copies)]
        shape = (case.batch, 1, case.num_q_heads, case.head_dim) if case.q_seq_len == 1 else \
            (case.batch, 1, case.q_seq_len, case.num_q_heads, case.head_dim)
        self.q = torch.randn(shape, generator=gen, device=device).to(TORCH_DTYPES[case.q_dtype])
        self.seq_lens = torch.full((case.batch,), case.seq_len, dtype=torch.int32, device=device)
        self.kv_scale = 1.0 / FP8_VALUE_SCALE if case.kv_dtype == "e4m3" else 1.0
        self.sinks = (torch.randn(case.num_kv_heads, self.group, generator=gen, device=device)
                      if case.sinks else None)
        self.mask = causal_mask(case.batch, case.q_seq_len, device=device) if case.q_seq_len > 1 else None


def _run_xqagen(case: BenchCase, inputs: _Inputs, num_splits: int | None, pdl: bool, path: str | None = None,
                tile=None):
    """(launch(i) on input copy i, output, split count); validation stays out of the timed loop."""
    out = torch.empty_like(inputs.q)
    calls = [prepare_decode(inputs.q, k, v, pt, inputs.seq_lens, out=out, kv_scale=inputs.kv_scale,
                            sinks=inputs.sinks, sliding_window=case.window, mask=inputs.mask,
                            num_splits=num_splits, enable_pdl=pdl, path=path, tile=tile, fp8_mma=case.fp8_mma)
             for k, v, pt in inputs.sets]
    return (lambda i: calls[i].launch()), out, calls[0].num_splits


#: FlashInfer's public ``flashinfer.xqa.xqa``, which picks its kernel path itself: timed beside the
#: paths the bench forces, under this name.
FLASHINFER_XQA = "xqa"


def _run_flashinfer(case: BenchCase, inputs: _Inputs, path: str, pdl: bool):
    """(launch(i) on input copy i, output) of FlashInfer's XQA: ``path`` "generic" or "sm90" forced
    through FlashInfer 0.7.2's module API, or :data:`FLASHINFER_XQA`, its public ``xqa`` as an engine
    calls it (no scale-factor caches, no ragged q)."""
    fx = importlib.import_module("flashinfer.xqa")  # the package re-exports a function named xqa
    device = inputs.q.device
    out = torch.empty_like(inputs.q)
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    semaphores = torch.zeros(8 << 20, dtype=torch.uint32, device=device)
    seq_lens = inputs.seq_lens.to(torch.uint32).unsqueeze(1)
    mask = as_flashinfer_mask(inputs.mask) if inputs.mask is not None else None

    if path == FLASHINFER_XQA:
        def launch_public(i: int) -> None:
            k, v, pt = inputs.sets[i]
            fx.xqa(inputs.q, k, v, pt, seq_lens, out, workspace, semaphores, case.num_kv_heads, case.page_size,
                   sinks=inputs.sinks, kv_scale=inputs.kv_scale, sliding_win_size=case.window, enable_pdl=pdl,
                   q_seq_len=case.q_seq_len, mask=mask)
        return launch_public, out

    module = fx.get_xqa_module(inputs.q.dtype, TORCH_DTYPES[case.kv_dtype], case.page_size, case.head_dim,
                               inputs.group, case.window > 0, out.dtype, case.q_seq_len)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    max_seq_len = inputs.sets[0][2].shape[1] * case.page_size

    def launch(i: int) -> None:
        k, v, pt = inputs.sets[i]
        module.xqa(path == "sm90", sm_count, case.num_kv_heads, case.window, 1.0, out, 1.0, inputs.q,
                   inputs.sinks, k, v, None, None, pt, max_seq_len, seq_lens, case.batch, inputs.kv_scale,
                   semaphores, workspace, pdl, case.q_seq_len, None, mask)

    return launch, out


def _rotating(launch, copies: int):
    """A no-argument launch whose successive calls read successive input copies (L2 stays cold)."""
    counter = itertools.count()
    return lambda: launch(next(counter) % copies)


def prebuild_flashinfer(cases: list[BenchCase]) -> None:
    """JIT-compile FlashInfer's modules for these cases concurrently (each build is an nvcc process)."""
    from concurrent.futures import ThreadPoolExecutor

    fx = importlib.import_module("flashinfer.xqa")  # the package re-exports a function named xqa

    def build(case: BenchCase):
        fx.get_xqa_module(TORCH_DTYPES[case.q_dtype], TORCH_DTYPES[case.kv_dtype], case.page_size, case.head_dim,
                          case.num_q_heads // case.num_kv_heads, case.window > 0, TORCH_DTYPES[case.q_dtype],
                          case.q_seq_len)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(build, cases))


def input_copies(case: BenchCase, l2_bytes: int) -> int:
    """How many copies of a case's inputs a timing rotates over, so that together they outgrow the
    L2 (``l2_bytes``; 0: unknown, one copy) and every launch reads its KV from HBM."""
    return max(1, min(4, math.ceil(4 * l2_bytes / case.kv_bytes))) if l2_bytes else 1


def run_case(case: BenchCase, copy_tbps: float, read_tbps: float, *, flashinfer: bool,
             num_splits: int | None = None, l2_bytes: int = 0, pdl: bool = False,
             path: str | None = None, tile=None, reader: StreamingRead | None = None) -> BenchResult:
    copies = input_copies(case, l2_bytes)
    inputs = _Inputs(case, copies)
    launch, out, splits = _run_xqagen(case, inputs, num_splits, pdl, path, tile)
    ms = time_cuda_graph(_rotating(launch, copies))
    kv_tbps = case.kv_bytes / ms / 1e9
    result = BenchResult(case, ms, time_cuda(_rotating(launch, copies)), kv_tbps, kv_tbps / copy_tbps,
                         kv_tbps / read_tbps, splits)
    if reader is not None:
        result.same_read_ms = reader.same_size_ms(case.kv_bytes, copies)
    if flashinfer:
        launch(0)
        ours = out.float()
        for path in (*case.flashinfer_paths, FLASHINFER_XQA):
            try:
                fi_launch, fi_out = _run_flashinfer(case, inputs, path, pdl)
                fi_launch(0)
                torch.cuda.synchronize()
                rel_diff = relative_l2_error(ours, fi_out.float())
                graph_ms = time_cuda_graph(_rotating(fi_launch, copies))
                events_ms = time_cuda(_rotating(fi_launch, copies))
            except Exception as err:  # noqa: BLE001  (a case FlashInfer rejects leaves its column empty)
                print(f"FlashInfer {path}: {type(err).__name__}: {err}", file=sys.stderr)
                continue
            result.flashinfer_rel_diff[path], result.flashinfer_ms[path] = rel_diff, graph_ms
            result.flashinfer_ms_events[path] = events_ms
    return result


def host_time_us(fn, *, calls: int = 2000, chunk: int = 100) -> float:
    """Median wall-clock microseconds of one eager call of ``fn()``: the host's cost of the call
    (argument handling and the launch), each call timed alone.  The GPU is synchronised every
    ``chunk`` calls, outside the timed calls, so that the launch queue never fills and blocks."""
    for _ in range(chunk):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls // chunk):
        for _ in range(chunk):
            start = time.perf_counter_ns()
            fn()
            times.append(time.perf_counter_ns() - start)
        torch.cuda.synchronize()
    return statistics.median(times) / 1e3


HOST_ENTRIES = ("run", "op", "xqa", "batch", "decode", "launch", "FI xqa", "FI batch")


def host_times(case: BenchCase, *, flashinfer: bool, pdl: bool = False) -> dict[str, float]:
    """Microseconds per eager call of each entry point (HOST_ENTRIES) on one case's inputs."""
    from . import flashinfer_compat, ops  # noqa: F401 (ops registers torch.ops.xqagen.decode)
    from .runtime import Workspace
    from .wrapper import DecodeWrapper

    inputs = _Inputs(case, 1)
    k, v, pt = inputs.sets[0]
    q, seq_lens, mask, sinks, kv_scale = inputs.q, inputs.seq_lens, inputs.mask, inputs.sinks, inputs.kv_scale
    out = torch.empty_like(q)
    device = q.device
    workspace = Workspace.allocate(device)

    def buffers():  # every entry point its own: one's scratch must not be another's semaphores
        return (torch.zeros(256 << 20, dtype=torch.uint8, device=device),
                torch.zeros(8 << 20, dtype=torch.uint32, device=device))

    fi_mask = as_flashinfer_mask(mask) if mask is not None else None
    wrapper = DecodeWrapper(workspace)
    wrapper.plan(pt, seq_lens, k, num_q_heads=case.num_q_heads, q_dtype=q.dtype, q_seq_len=case.q_seq_len,
                 mask=mask, sinks=sinks, sliding_window=case.window, kv_scale=kv_scale, enable_pdl=pdl)
    op_args = (q, k, v, pt, seq_lens, out, workspace.scratch, workspace.buffer, sinks, mask, None, None, 1.0,
               kv_scale, 1.0, case.window, "NHD", 0, 0, pdl)
    xqa_args = (q, k, v, pt, seq_lens, out, *buffers(), case.num_kv_heads, case.page_size)
    xqa_kwargs = dict(sinks=sinks, kv_scale=kv_scale, sliding_win_size=case.window, enable_pdl=pdl,
                      q_seq_len=case.q_seq_len, mask=fi_mask)
    query = q.view(case.batch * case.q_seq_len, case.num_q_heads, case.head_dim)
    batch_out = torch.empty_like(query if case.q_seq_len == 1 else
                                 q.view(case.batch, case.q_seq_len, -1, case.head_dim))
    head_dim_scale = 1.0 / math.sqrt(case.head_dim)
    batch_args = (query, (k, v), buffers()[0], pt, seq_lens, pt.shape[1] * case.page_size)
    batch_kwargs = dict(bmm1_scale=kv_scale * head_dim_scale, bmm2_scale=kv_scale, window_left=case.window - 1,
                        out=batch_out, sinks=sinks.reshape(-1) if sinks is not None else None, enable_pdl=pdl,
                        q_len_per_req=case.q_seq_len, mask=fi_mask)
    call = prepare_decode(q, k, v, pt, seq_lens, out=out, kv_scale=kv_scale, sinks=sinks, sliding_window=case.window,
                          mask=mask, workspace=workspace, enable_pdl=pdl)
    entries = {
        "run": lambda: wrapper.run(q, k, v, out),
        "op": lambda: torch.ops.xqagen.decode.default(*op_args),
        "xqa": lambda: flashinfer_compat.xqa(*xqa_args, **xqa_kwargs),
        "batch": lambda: flashinfer_compat.xqa_batch_decode_with_kv_cache(*batch_args, **batch_kwargs),
        "decode": lambda: xqa_decode(q, k, v, pt, seq_lens, out=out, kv_scale=kv_scale, sinks=sinks,
                                     sliding_window=case.window, mask=mask, workspace=workspace, enable_pdl=pdl,
                                     validate=False),
        "launch": call.launch,
    }
    if flashinfer:
        fi_xqa = importlib.import_module("flashinfer.xqa").xqa
        fi_decode = importlib.import_module("flashinfer.decode")
        fi_seq_lens = seq_lens.to(torch.uint32).unsqueeze(1)
        fi_xqa_args = (q, k, v, pt, fi_seq_lens, out, *buffers(), case.num_kv_heads, case.page_size)
        fi_batch_args = (query, (k, v), buffers()[0], pt, fi_seq_lens.view(-1), pt.shape[1] * case.page_size)
        entries["FI xqa"] = lambda: fi_xqa(*fi_xqa_args, **xqa_kwargs)
        entries["FI batch"] = lambda: fi_decode.xqa_batch_decode_with_kv_cache(*fi_batch_args, **batch_kwargs)
    times = {name: _timed_or_none(name, host_time_us, fn) for name, fn in entries.items()}
    return {name: time for name, time in times.items() if time is not None}


def _timed_or_none(name: str, timer, fn):
    """``timer(fn)``; None, with a note, where FlashInfer rejects a case (its API is not ours to fix)."""
    if not name.lower().startswith(("fi ", "flashinfer ")):
        return timer(fn)
    try:
        return timer(fn)
    except Exception as err:  # noqa: BLE001  (any FlashInfer failure leaves its column empty)
        print(f"{name}: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def format_host_times(rows: list[tuple[BenchCase, dict[str, float]]]) -> str:
    """Microseconds of host time per eager call (median), one column per entry point."""
    lines = [f"{'case (us per call)':28}" + "".join(f" {name:>9}" for name in HOST_ENTRIES)]
    for case, times in rows:
        lines.append(f"{case.name:28}" + "".join(
            f" {times[name]:9.1f}" if name in times else f" {'-':>9}" for name in HOST_ENTRIES))
    return "\n".join(lines)


def pdl_gemm_step_ms(case: BenchCase, *, flashinfer: bool) -> dict[str, float]:
    """Milliseconds per serving step (GEMM -> decode -> GEMM, with real data dependencies: the
    first GEMM writes the query, the second reads the decode's output) for each library with
    programmatic dependent launch off and on, CUDA-graph replays and eager launches between events;
    ``gemms``: the two GEMMs alone."""
    inputs = _Inputs(case, 1)
    k, v, pt = inputs.sets[0]
    device = inputs.q.device
    dtype = inputs.q.dtype
    tokens, hidden = case.batch * case.q_seq_len, case.num_q_heads * case.head_dim
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    w_in, w_out = (torch.randn(hidden, hidden, generator=gen, device=device).to(dtype) / math.sqrt(hidden)
                   for _ in range(2))
    y, z = (torch.empty(tokens, hidden, dtype=dtype, device=device) for _ in range(2))
    q = y.view(inputs.q.shape)
    out = torch.empty_like(q)
    out_2d = out.view(tokens, hidden)

    def gemms_only():
        torch.matmul(x, w_in, out=y)
        torch.matmul(out_2d, w_out, out=z)

    results = {"gemms": time_cuda_graph(gemms_only), "gemms events": time_cuda(gemms_only)}
    sides = {}
    for pdl in (False, True):
        call = prepare_decode(q, k, v, pt, inputs.seq_lens, out=out, kv_scale=inputs.kv_scale, sinks=inputs.sinks,
                              sliding_window=case.window, mask=inputs.mask, enable_pdl=pdl)
        sides[f"xqagen pdl={'on' if pdl else 'off'}"] = call.launch
        if flashinfer:
            fi_xqa = importlib.import_module("flashinfer.xqa").xqa
            fi_args = (q, k, v, pt, inputs.seq_lens.to(torch.uint32).unsqueeze(1), out,
                       torch.zeros(256 << 20, dtype=torch.uint8, device=device),
                       torch.zeros(8 << 20, dtype=torch.uint32, device=device), case.num_kv_heads, case.page_size)
            fi_kwargs = dict(sinks=inputs.sinks, kv_scale=inputs.kv_scale, sliding_win_size=case.window,
                             enable_pdl=pdl, q_seq_len=case.q_seq_len,
                             mask=as_flashinfer_mask(inputs.mask) if inputs.mask is not None else None)
            sides[f"flashinfer pdl={'on' if pdl else 'off'}"] = \
                lambda fi_args=fi_args, fi_kwargs=fi_kwargs: fi_xqa(*fi_args, **fi_kwargs)
    for name, decode in sides.items():
        def step(decode=decode):
            torch.matmul(x, w_in, out=y)
            decode()
            torch.matmul(out_2d, w_out, out=z)

        graph_ms = _timed_or_none(name, time_cuda_graph, step)
        if graph_ms is not None:
            results[name], results[f"{name} events"] = graph_ms, time_cuda(step)
    return results


def format_pdl_gemm(rows: list[tuple[BenchCase, dict[str, float]]]) -> str:
    """Per case, milliseconds per step (graph / events) and what the decode adds over the GEMMs."""
    lines = []
    for case, r in rows:
        lines.append(f"{case.name}: gemms {r['gemms']:.4f} ms (graph), {r['gemms events']:.4f} ms (events)")
        for name in (n for n in r if not n.startswith("gemms") and not n.endswith(" events")):
            lines.append(f"  {name:22} step {r[name]:.4f} ms (+{r[name] - r['gemms']:.4f} over gemms), "
                         f"events {r[name + ' events']:.4f} ms (+{r[name + ' events'] - r['gemms events']:.4f})")
    return "\n".join(lines)


def format_table(results: list[BenchResult], copy_tbps: float, read_tbps: float, device_name: str) -> str:
    """ms: CUDA-graph time per launch; %read: KV bandwidth over the streaming-read ceiling; %same: a
    streaming read of the case's KV bytes, timed the same way, over our time; FI generic and FI sm90:
    FlashInfer's paths forced, FI xqa(): its public ``xqa``, which picks one; x: FlashInfer's time /
    ours (graph), x ev: the same from eager launches timed with events."""
    lines = [f"device: {device_name}; copy bandwidth {copy_tbps:.2f} TB/s (read + write), "
             f"streaming read {read_tbps:.2f} TB/s",
             f"{'case':28} {'splits':>6} {'ms':>8} {'KV TB/s':>8} {'%copy':>6} {'%read':>6} {'%same':>6} "
             f"{'FI generic ms':>13} {'x':>5} {'x ev':>5} {'FI sm90 ms':>10} {'x':>5} {'x ev':>5} "
             f"{'FI xqa() ms':>11} {'x':>5} {'x ev':>5} {'|diff| FI':>9}"]

    def versus(r: BenchResult, path: str, width: int) -> str:
        fi = r.flashinfer_ms.get(path)
        if fi is None:
            return f" {'-':>{width}} {'-':>5} {'-':>5}"
        return f" {fi:{width}.4f} {fi / r.ms:5.2f} {r.flashinfer_ms_events[path] / r.ms_events:5.2f}"

    for r in results:
        diff = max(r.flashinfer_rel_diff.values()) if r.flashinfer_rel_diff else float("nan")
        lines.append(
            f"{r.case.name:28} {r.num_splits:>6} {r.ms:8.4f} {r.kv_tbps:8.2f} {100 * r.copy_fraction:5.0f}% "
            f"{100 * r.read_fraction:5.0f}% {100 * r.same_read_fraction:5.0f}%" + versus(r, "generic", 13)
            + versus(r, "sm90", 10) + versus(r, FLASHINFER_XQA, 11) + f" {diff:9.1e}")
    return "\n".join(lines)


def run_versions() -> dict[str, str | None]:
    """What a bench ran with: xqagen (``git describe`` of its checkout, else the package version),
    the digest of its sources (:func:`source_digest`), torch, the CUDA driver and NVRTC, and
    FlashInfer (None where one is absent)."""
    from .compiler import nvrtc_version

    return {"xqagen": _xqagen_version(), "source": source_digest(), "torch": torch.__version__,
            "driver": _driver_version(), "nvrtc": "%d.%d" % nvrtc_version(),
            "flashinfer": _installed_version("flashinfer-python")}


def source_digest() -> str:
    """12 hex digits of SHA-256 over xqagen's Python and its emitters' Python and templates (paths and
    contents): the code a run used, also where a copy of the checkout carries stale git metadata."""
    from . import emitters

    package, emitter_root = Path(xqagen.__file__).resolve().parent, Path(emitters.__file__).resolve().parent
    files = [(emitter_root, path) for path in emitter_root.rglob("*") if path.suffix in (".py", ".j2")]
    files += [(package, path) for path in package.rglob("*.py") if not path.resolve().is_relative_to(emitter_root)]
    digest = hashlib.sha256()
    for root, path in sorted(files, key=lambda item: (str(item[0]), item[1].relative_to(item[0]).as_posix())):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _xqagen_version() -> str:
    root = Path(xqagen.__file__).resolve().parent.parent
    if (root / ".git").exists():  # a checkout (or worktree) of which the package is the top folder
        try:
            described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                                       capture_output=True, text=True, check=False)
        except OSError:  # no git
            return xqagen.__version__
        if described.returncode == 0:
            return described.stdout.strip()
    return xqagen.__version__


def _driver_version() -> str | None:
    from cuda.bindings import driver

    try:
        status, version = driver.cuDriverGetVersion()
    except RuntimeError:  # no libcuda
        return None
    return f"{version // 1000}.{version % 1000 // 10}" if status == driver.CUresult.CUDA_SUCCESS else None


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- --plot ----

#: FlashInfer's XQA paths, and its public xqa(), as the plot labels them
FLASHINFER_LABELS = {"generic": "FlashInfer XQA", "sm90": "FlashInfer XQA sm90",
                     FLASHINFER_XQA: "FlashInfer xqa() (its own path)"}


def read_records(path: Path) -> tuple[dict, list[dict]]:
    """(header, case records) of a kernel bench's ``--json`` file; ValueError where it is not one."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path}, line {number}: not JSON") from None
    header, *rows = records or [None]
    if not (isinstance(header, dict) and {"copy_TBps", "read_TBps"} <= header.keys() and rows
            and all(isinstance(row, dict) and {"case", "ms", "kv_tbps", "flashinfer_ms"} <= row.keys()
                    for row in rows)):
        raise ValueError(f"{path}: no kernel bench records (those of `xqagen bench --json`, without "
                         "--host-time or --pdl-gemm)")
    return header, rows


def kv_bandwidths(rows: list[dict]) -> dict[str, list[float | None]]:
    """Per library, each case's KV TB/s (None where it has no time): xqagen's from the record, a
    FlashInfer path's from the same KV bytes over its time."""
    series = {"xqagen": [row["kv_tbps"] for row in rows]}
    for path, label in FLASHINFER_LABELS.items():
        if any(path in row["flashinfer_ms"] for row in rows):
            series[label] = [row["kv_tbps"] * row["ms"] / row["flashinfer_ms"][path]
                             if path in row["flashinfer_ms"] else None for row in rows]
    return series


def _matplotlib_figure():
    """matplotlib's Figure class (no pyplot: no display, no global state)."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] != "matplotlib":
            raise
        raise ModuleNotFoundError("xqagen bench --plot needs matplotlib, which is not installed: "
                                  "pip install 'xqagen[plot]'", name="matplotlib") from None
    return Figure


def plot_bandwidth(header: dict, rows: list[dict], out: Path) -> None:
    """Draw each case's KV bandwidth per library against the copy and streaming-read bandwidths
    to ``out`` (its suffix picks the format: .png, .svg, .pdf)."""
    figure_type = _matplotlib_figure()
    series = kv_bandwidths(rows)
    figure = figure_type(figsize=(max(8.0, 1.1 * len(rows) + 3), 6), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(series)
    for index, (label, values) in enumerate(series.items()):
        positions = [case + (index - (len(series) - 1) / 2) * width for case in range(len(rows))]
        axes.bar([x for x, v in zip(positions, values) if v is not None], [v for v in values if v is not None],
                 width, label=label)
    axes.axhline(header["copy_TBps"], color="black", linestyle="--",
                 label=f"device-to-device copy, read + write ({header['copy_TBps']:.2f} TB/s)")
    axes.axhline(header["read_TBps"], color="gray", linestyle=":",
                 label=f"streaming read ({header['read_TBps']:.2f} TB/s)")
    axes.set_xticks(range(len(rows)), [row["case"] for row in rows], rotation=30, ha="right")
    axes.set_ylabel("KV TB/s (KV bytes / CUDA-graph time per launch)")
    versions = header.get("versions", {})
    pdl = "on" if header.get("pdl") else "off"
    axes.set_title(f"KV bandwidth on {header.get('device', 'an unknown GPU')}, PDL {pdl}\n"
                   + ", ".join(f"{name} {value}" for name, value in versions.items() if value is not None),
                   fontsize="medium")
    figure.legend(loc="outside lower center", ncols=3, fontsize="small")  # bars reach the ceilings: keep it off them
    figure.savefig(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xqagen bench", description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="run only these cases (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--sweep", action="store_true",
                        help="the small-to-large sweep (batch 1-256 x 1k-64k tokens, bf16 and fp8) instead of the "
                             "design cases")
    parser.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer even if installed")
    parser.add_argument("--num-splits", type=int, default=None, help="force the split-KV count")
    parser.add_argument("--pdl", action="store_true",
                        help="launch both libraries with programmatic dependent launch (sm_90+)")
    parser.add_argument("--host-time", action="store_true",
                        help="time the host per eager call of each entry point instead of the kernels")
    parser.add_argument("--pdl-gemm", action="store_true",
                        help="time GEMM -> decode -> GEMM steps, both libraries, PDL off and on (sm_90+)")
    parser.add_argument("--path", choices=("generic", "hopper"), default=None,
                        help="force xqagen's kernel path (default: chosen per launch shape)")
    parser.add_argument("--json", help="also write one JSON object per case to this file")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="draw each case's KV bandwidth for both libraries and the copy and read ceilings "
                             "(.png, .svg, .pdf; needs matplotlib)")
    parser.add_argument("--from", dest="records", type=Path, metavar="JSON",
                        help="with --plot: draw this --json file of an earlier run instead of running")
    args = parser.parse_args(argv)
    if args.records is not None:
        if args.plot is None:
            parser.error("--from needs --plot")
        try:
            header, rows = read_records(args.records)
        except ValueError as err:
            parser.error(str(err))
        plot_bandwidth(header, rows, args.plot)
        print(f"plotted {len(rows)} cases to {args.plot}")
        return 0
    if args.plot is not None:
        if args.host_time or args.pdl_gemm:
            parser.error("--plot draws the kernel bench, not --host-time or --pdl-gemm")
        _matplotlib_figure()  # missing matplotlib fails now, not after the bench
    if args.list:
        for case in SWEEP_CASES if args.sweep else DESIGN_CASES:
            print(case.name, json.dumps(asdict(case)))
        return 0
    if not torch.cuda.is_available():
        print("xqagen bench needs a CUDA GPU", file=sys.stderr)
        return 2
    catalogue = SWEEP_CASES if args.sweep else DESIGN_CASES
    cases = [c for c in catalogue if not args.case or c.name in args.case]
    unknown = set(args.case or ()) - {c.name for c in cases}
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; see --list")
    flashinfer = not args.no_flashinfer
    if flashinfer:
        try:
            importlib.import_module("flashinfer.xqa")
        except ImportError:
            flashinfer = False
            print("FlashInfer is not installed: timing xqagen alone", file=sys.stderr)
    props = torch.cuda.get_device_properties(0)
    if flashinfer:
        prebuild_flashinfer(cases)
    from .runtime import supports_pdl

    pdl = args.pdl
    if (pdl or args.pdl_gemm) and not supports_pdl(torch.device("cuda")):
        parser.error("--pdl and --pdl-gemm need an sm_90+ GPU")
    if args.host_time or args.pdl_gemm:
        measure, show = (host_times, format_host_times) if args.host_time else (pdl_gemm_step_ms, format_pdl_gemm)
        options = dict(pdl=pdl) if args.host_time else {}
        rows = []
        for case in cases:
            rows.append((case, measure(case, flashinfer=flashinfer, **options)))
            print(show(rows[-1:]).splitlines()[-1] if args.host_time else show(rows[-1:]), flush=True)
            torch.cuda.empty_cache()
        print(show(rows))
        if args.json:
            with open(args.json, "w") as f:
                f.write(json.dumps({"device": props.name, "pdl": pdl, "mode": "host-time" if args.host_time
                                    else "pdl-gemm", "versions": run_versions()}) + "\n")
                for case, row in rows:
                    f.write(json.dumps({"case": case.name, **row}) + "\n")
        return 0
    copy_tbps = copy_bandwidth_tbps()
    reader = StreamingRead()
    read_tbps = reader.bandwidth_tbps()
    header = {"device": props.name, "copy_TBps": copy_tbps, "read_TBps": read_tbps, "pdl": pdl, "path": args.path,
              "versions": run_versions()}
    results = []
    # a JSON row per case as it is measured: a case that fails keeps the rows before it
    with open(args.json, "w") if args.json else contextlib.nullcontext() as record:
        if record:
            record.write(json.dumps(header) + "\n")
        for case in cases:
            result = run_case(case, copy_tbps, read_tbps, flashinfer=flashinfer, num_splits=args.num_splits,
                              l2_bytes=getattr(props, "L2_cache_size", 0), pdl=pdl, path=args.path, reader=reader)
            results.append(result)
            print(format_table([result], copy_tbps, read_tbps, props.name).splitlines()[-1], flush=True)
            if record:
                record.write(json.dumps(result.row()) + "\n")
                record.flush()
            torch.cuda.empty_cache()
    print(format_table(results, copy_tbps, read_tbps, props.name))
    print(f"programmatic dependent launch: {'on' if pdl else 'off'} for both libraries")
    rows = [r.row() for r in results]
    if args.plot is not None:
        plot_bandwidth(header, rows, args.plot)
        print(f"plotted {len(rows)} cases to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
