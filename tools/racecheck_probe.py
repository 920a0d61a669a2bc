"""A correctly synchronised hand-off that compute-sanitizer's racecheck reports as a hazard.

Two warpgroups each synchronise on a named barrier of their own (ids 1 and 2, 128 threads), the
first `extra` times more than the second, as the Hopper kernel's consumer warpgroups do when a
CTA's tile count is odd (each warpgroup takes every other tile, two barriers per tile).  Then thread
3 writes shared memory, the whole CTA passes ``__syncthreads()``, and thread 192 reads it.  The
read is ordered after the write, yet on an H200 racecheck reported a RAW hazard for ``extra`` 1
and none for 0 or 2 (docs/design.md, "Sanitizers"):

    compute-sanitizer --tool racecheck python tools/racecheck_probe.py 0   # 0 hazards
    compute-sanitizer --tool racecheck python tools/racecheck_probe.py 1   # 1 RAW hazard

Needs a CUDA GPU (sm_70+).
"""

from __future__ import annotations

import argparse
import ctypes

import torch
from cuda.bindings import driver

from xqagen.compiler import compile_kernel
from xqagen.runtime import _check, device_arch, load_function

SOURCE = r"""
extern "C" __global__ void probe(int extra, float* out) {
  __shared__ float value;
  int const wg = threadIdx.x / 128;
  for (int i = 0; i < 2 + (wg == 0 ? extra : 0); ++i) asm volatile("bar.sync %0, 128;" :: "r"(1 + wg));
  if (threadIdx.x == 3) value = 1.f + extra;
  __syncthreads();
  if (threadIdx.x == 192) out[0] = value;
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", type=int, help="named-barrier passes of warpgroup 0 beyond warpgroup 1's")
    extra = parser.parse_args().extra
    device = torch.device("cuda", torch.cuda.current_device())
    compiled = compile_kernel(SOURCE, "probe", device_arch(device))
    _library, function = load_function(compiled.cubin, "probe", device.index)
    out = torch.zeros(1, device=device)
    args = (ctypes.c_int(extra), ctypes.c_uint64(out.data_ptr()))
    arg_ptrs = (ctypes.c_void_p * 2)(*map(ctypes.addressof, args))
    _check(driver.cuLaunchKernel(function, 1, 1, 1, 256, 1, 1, 0, torch.cuda.current_stream().cuda_stream,
                                 ctypes.addressof(arg_ptrs), 0))
    print(f"extra={extra}: thread 192 read {out.item()} (expected {1.0 + extra})")


if __name__ == "__main__":
    main()
