"""Host microseconds per eager call of each decode entry point, with or without the kernel launch.

    PYTHONPATH=. python tools/host_overhead.py [--stub] [--case bf16 --case fp8] [--rounds 200]

On a GPU it times real launches; ``--stub`` replaces each bound launch by a stand-in that rewrites
the pointers of a parameter struct (and, for fp8 KV, retargets two tensor maps as the Hopper path
does) but launches nothing, so only the Python around the launch is timed.  Without a GPU it always
stubs, on CPU tensors of the same shapes (shapes, strides and hashing cost the same on any device),
which pose as CUDA tensors for ``xqagen.ops.launch``'s eager check.

Entries: ``launch_decode`` (:func:`xqagen.api.launch_decode`), ``op`` (``torch.ops.xqagen.decode``),
``ops.launch``, ``xqa`` and ``batch`` (the FlashInfer-compatible entry points), ``decode``
(``xqa_decode(validate=False)``), ``run`` (:meth:`DecodeWrapper.run`, GPU only), ``FI xqa`` (FlashInfer's
``xqa`` on the same inputs, GPU only, where FlashInfer is installed); ``floor``: a no-op
Python kernel with the op's schema through the dispatcher, the least any Python-implemented op of
that schema costs, and ``floor C++`` a no-op C++ kernel (where a compiler builds it), the least any
op of that schema costs from Python; on a GPU without ``--stub`` also ``rewrite`` (a layer's four pointer words and
the bound launch's ``refresh()``) and ``bound()``, the launch alone.  Each entry: the best and the
median over rounds of the mean of 100 calls; entries take turns, so that a busy machine slows every
entry alike.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from xqagen import api, flashinfer_compat, ops
from xqagen.emitters import PATHS
from xqagen.emitters.params import KernelParams
from xqagen.reference import FP8_VALUE_SCALE, make_paged_kv
from xqagen.runtime import POINTER_WORDS, BoundLaunch, Workspace

CASES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}  # KV dtype; q bf16 [1, 1, 64, 128], 32k tokens
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, SEQ_LEN = 64, 8, 128, 64, 32768


class StubLaunch:
    """A bound launch without a kernel: a real parameter struct for the pointer rewrites and, with
    tensor maps, the Hopper path's refresh of them; then nothing."""

    refresh = BoundLaunch.refresh

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, tensor_maps: bool):
        from xqagen.tensor_maps import TensorMap

        params = KernelParams(k=k_cache.data_ptr(), v=v_cache.data_ptr())
        maps = (TensorMap.aligned(), TensorMap.aligned()) if tensor_maps else ()
        for tensor_map, pool in zip(maps, (k_cache, v_cache)):
            tensor_map.address = pool.data_ptr()  # the same pools every call: no driver call to retarget
        self.params = (params, *maps)
        self.words = memoryview(params).cast("B").cast("Q")
        self._refresh = PATHS["hopper"].refresh if tensor_maps else None

    def __call__(self) -> None:
        pass


def time_entries(entries: dict, rounds: int, sync, calls: int = 100) -> dict[str, tuple[float, float]]:
    """(best, median) over rounds of the mean microseconds of ``calls`` calls, per entry."""
    for fn in entries.values():
        fn()
        fn()
    sync()
    samples = {name: [] for name in entries}
    for _ in range(rounds):
        for name, fn in entries.items():
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter_ns() - start) / calls / 1e3)
            sync()  # outside the timed calls: the launch queue never fills
    return {name: (min(s), statistics.median(s)) for name, s in samples.items()}


def entries_of(kv_dtype: torch.dtype, device: torch.device, stub: bool) -> dict:
    k, v, pt = make_paged_kv(1, [SEQ_LEN], NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE, kv_dtype, device=device, shuffle=False)
    q = torch.randn(1, 1, NUM_Q_HEADS, HEAD_DIM, device=device).to(torch.bfloat16)
    seq_lens = torch.full((1,), SEQ_LEN, dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    kv_scale = 1 / FP8_VALUE_SCALE if kv_dtype == torch.float8_e4m3fn else 1.0
    workspace = Workspace.allocate(device)
    if stub:
        api._bind = lambda q, k, v, *rest: StubLaunch(k, v, tensor_maps=kv_dtype == torch.float8_e4m3fn)
    op_args = (q, k, v, pt, seq_lens, out, workspace.scratch, workspace.buffer, None, None, None, None, 1.0, kv_scale,
               1.0, 0, "NHD", 0, 0, False)
    fi_workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    fi_semaphores = torch.zeros(8 << 20, dtype=torch.uint32, device=device)
    batch_workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    query, batch_out = q.view(1, NUM_Q_HEADS, HEAD_DIM), torch.empty(1, NUM_Q_HEADS, HEAD_DIM, dtype=q.dtype,
                                                                     device=device)
    entries = {
        "launch_decode": lambda: api.launch_decode(*op_args),
        "op": lambda: torch.ops.xqagen.decode.default(*op_args),
        "ops.launch": lambda: ops.launch(*op_args),
        "xqa": lambda: flashinfer_compat.xqa(q, k, v, pt, seq_lens, out, fi_workspace, fi_semaphores, NUM_KV_HEADS,
                                             PAGE_SIZE, kv_scale=kv_scale),
        "batch": lambda: flashinfer_compat.xqa_batch_decode_with_kv_cache(
            query, (k, v), batch_workspace, pt, seq_lens, SEQ_LEN, bmm1_scale=kv_scale / math.sqrt(HEAD_DIM),
            bmm2_scale=kv_scale, out=batch_out),
        "decode": lambda: api.xqa_decode(q, k, v, pt, seq_lens, out=out, kv_scale=kv_scale, workspace=workspace,
                                         validate=False),
        "floor": lambda: torch.ops.xqagen_host_overhead.floor.default(*op_args),
    }
    if torch._C._dispatch_has_kernel_for_dispatch_key("xqagen_host_overhead::floor_cpp", "CPU"):  # it was built
        entries["floor C++"] = lambda: torch.ops.xqagen_host_overhead.floor_cpp.default(*op_args)
    if device.type == "cuda":
        from xqagen.wrapper import DecodeWrapper

        try:  # FlashInfer's own xqa call, timed the same way, where it is installed
            from flashinfer.xqa import xqa as fi_xqa
        except ImportError:
            fi_xqa = None
        if fi_xqa is not None:
            fi_args = (q, k, v, pt, seq_lens.to(torch.uint32).unsqueeze(1), out,
                       torch.zeros(256 << 20, dtype=torch.uint8, device=device),
                       torch.zeros(8 << 20, dtype=torch.uint32, device=device), NUM_KV_HEADS, PAGE_SIZE)
            entries["FI xqa"] = lambda: fi_xqa(*fi_args, kv_scale=kv_scale)

        wrapper = DecodeWrapper(workspace)
        wrapper.plan(pt, seq_lens, k, num_q_heads=NUM_Q_HEADS, q_dtype=q.dtype, kv_scale=kv_scale)
        if stub:
            wrapper._bound = StubLaunch(k, v, tensor_maps=len(wrapper._bound.params) > 1)
        entries["run"] = lambda: wrapper.run(q, k, v, out)
        if not stub:
            bound = api.prepare_decode(q, k, v, pt, seq_lens, out=out, kv_scale=kv_scale, workspace=workspace).bound
            words, layer_words = bound.words, [POINTER_WORDS[name] for name in ("q", "k", "v", "out")]

            def rewrite():  # a layer's four pointers, as run() writes them
                for index in layer_words:
                    words[index] = words[index]
                bound.refresh()

            entries["rewrite"] = rewrite
            entries["bound()"] = bound
    return entries


# A no-op C++ kernel of the op's schema (the types the op's C++ kernel takes).
FLOOR_CPP = """
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <optional>
using T = at::Tensor const&;
using O = std::optional<at::Tensor> const&;
void floor_cpp(T, T, T, T, T, T, O, O, O, O, O, O, double, double, double, int64_t, c10::string_view, int64_t,
               int64_t, bool, O, int64_t) {}
TORCH_LIBRARY_IMPL(xqagen_host_overhead, CPU, m) { m.impl("floor_cpp", &floor_cpp); }
TORCH_LIBRARY_IMPL(xqagen_host_overhead, CUDA, m) { m.impl("floor_cpp", &floor_cpp); }
"""


def register_floor() -> None:
    """``torch.ops.xqagen_host_overhead.floor``: the op's schema, a no-op Python kernel; and
    ``floor_cpp``, the same with a no-op C++ kernel, where a compiler builds it (like the op's own)."""
    schema = str(torch.ops.xqagen.decode.default._schema).replace("xqagen::decode", "floor")
    lib = torch.library.Library("xqagen_host_overhead", "DEF")
    lib.define(schema)
    lib.define(schema.replace("floor(", "floor_cpp(", 1))
    for key in ("CPU", "CUDA"):
        lib.impl("floor", lambda *args: None, key)
    register_floor.lib = lib  # the registration lives as long as the library object
    try:
        from torch.utils import cpp_extension

        cpp_extension.load_inline("xqagen_host_overhead_floor", cpp_sources=FLOOR_CPP, is_python_module=False,
                                  extra_cflags=["-O2"])
    except Exception as err:  # noqa: BLE001  (no compiler: the C++ floor is left out)
        print(f"floor C++ left out: {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=CASES, help="KV dtype (repeatable; default: both)")
    parser.add_argument("--stub", action="store_true", help="time everything but the launch (always without a GPU)")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, stub = torch.device("cuda" if cuda else "cpu"), args.stub or not cuda
    if not cuda:
        torch.Tensor.is_cuda = property(lambda self: True)  # CPU tensors take ops.launch's eager path
    register_floor()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"{device}, {'launch stubbed' if stub else 'real launches'}; us per call: best / median over "
          f"{args.rounds} rounds")
    for case in args.case or CASES:
        times = time_entries(entries_of(CASES[case], device, stub), args.rounds, sync)
        print(f"{case}: " + ", ".join(f"{name} {best:.2f} / {median:.2f}" for name, (best, median) in times.items()))


if __name__ == "__main__":
    main()
