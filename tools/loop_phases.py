"""Where a Hopper consumer warp's cycles go inside the tile loop: `clock()` marks between the loop's
phases, summed over every consumer warp of one launch and given per tile the warp took, with the KV
read from HBM and from L2 (compute_floor's page tables, so that memory is not what is timed).

    python tools/loop_phases.py --case specdec8_fp8_b32_s8k --case specdec4_fp8_b64_s8k --json phases.jsonl

Phases, in a tile's order: waiting for the stage ("wait"); S^T = K Q^T, with fp8 K's loads and
conversions ("S^T"); the masks and the warpgroup's vote on raised rows, with the exchange of maxima
on a tile that raises one ("vote"); P, its row sums and stores ("exp"); the fence and the barrier
that hand P to the wgmma ("barrier"); O^T += V^T P^T and the stage's release ("P V").  A warpgroup's
warps run on different SM sub-partitions, so a tile costs an SM of two consumer warpgroups about half
of one warp's total.  The source is instrumented as emitted (``instrument``): the shipped kernels
carry no marks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its neighbours

from compute_floor import l2_resident  # noqa: E402
from cta_timeline import TemplateChanged, device_global, insert_marks, instrument_hopper_kernels  # noqa: E402,F401
from tile_sweep import select_cases  # noqa: E402

from xqagen import bench  # noqa: E402

PHASES = ("wait", "S^T", "vote", "exp", "barrier", "P V")
TILES_SLOT = len(PHASES)  # the counters' slot that holds the tiles counted

_PRELUDE = r"""
// ---- loop phase counters (tools/loop_phases.py) ----
extern "C" __device__ unsigned long long xq_loop_phases[8];  // cycles per phase over every consumer warp; tiles
#define XQ_PHASE(i) { uint32_t const now_ = clock(); xq_cycles[i] += now_ - xq_last; xq_last = now_; }
"""

# (line of the Hopper template, the code inserted before (-) or after (+) it)
_ANCHORS = (
    ("    for (int tile = range.tile_begin + wg; tile < range.tile_end; tile += kConsumers) {\n", "-",
     "    uint32_t xq_last = clock(), xq_cycles[%d] = {}, xq_tiles = 0;\n" % len(PHASES)),
    ("      pipeline.consumer_wait(state);\n", "+", "      ++xq_tiles;\n      XQ_PHASE(0);\n"),
    ("      mma_scores<kKvFp8>(&sK(0, 0), fp8_at, q_desc, acc_s);\n", "+", "      XQ_PHASE(1);\n"),
    ("      // P = exp2(S * scale - base)", "-", "      XQ_PHASE(2);\n"),
    ("      cutlass::arch::fence_view_async_shared();  // P (and zeroed V rows) are read by wgmma\n", "-",
     "      XQ_PHASE(3);\n"),
    ("      warpgroup_sync(wg, kPReady);\n", "+", "      XQ_PHASE(4);\n"),
    ("      pipeline.consumer_release(state);\n", "+", "      XQ_PHASE(5);\n"),
    ("    // ---- rows' sums over the warpgroup", "-",
     "    if (lane == 0) {\n"
     "      for (int i = 0; i < %d; ++i) atomicAdd(&xq_loop_phases[i], (unsigned long long)xq_cycles[i]);\n"
     "      atomicAdd(&xq_loop_phases[%d], (unsigned long long)xq_tiles);\n"
     "    }\n" % (len(PHASES), TILES_SLOT)),
)


def instrument(source: str) -> str:
    """``source`` (an emitted Hopper kernel) with the loop's phase marks; lane 0 of each consumer warp
    adds its sums to ``xq_loop_phases``.  Raises TemplateChanged where an anchor line is missing."""
    return insert_marks(source, _PRELUDE, _ANCHORS)


def per_tile(counters) -> dict:
    """Cycles per tile of each phase, and their total, from the counters of one launch (phase sums,
    then the tiles counted, over every consumer warp)."""
    tiles = int(counters[TILES_SLOT])
    if tiles == 0:
        raise ValueError("no consumer warp took a tile")
    cycles = {name: round(int(counters[i]) / tiles, 1) for i, name in enumerate(PHASES)}
    return dict(cycles_per_tile=cycles, total=round(sum(cycles.values()), 1), warp_tiles=tiles)


def _counters(kernel, device, *, reset: bool):
    import numpy as np
    from cuda.bindings import driver

    from xqagen.runtime import _check

    address, size = device_global(kernel, device, "xq_loop_phases")
    if reset:
        _check(driver.cuMemsetD8(address, 0, size))
        return None
    host = np.zeros(size // 8, dtype=np.uint64)
    _check(driver.cuMemcpyDtoH(host.ctypes.data, address, size))
    return host


def run(case: bench.BenchCase, *, from_l2: bool) -> dict:
    import torch

    from xqagen.api import prepare_decode

    inputs = bench._Inputs(case, 1)
    if from_l2:
        inputs = l2_resident(inputs, case)
    k, v, page_table = inputs.sets[0]
    call = prepare_decode(inputs.q, k, v, page_table, inputs.seq_lens, kv_scale=inputs.kv_scale, sinks=inputs.sinks,
                          sliding_window=case.window, mask=inputs.mask, path="hopper")
    ms = bench.time_cuda_graph(call.launch)
    _counters(call.kernel, inputs.q.device, reset=True)
    call.launch()
    row = per_tile(_counters(call.kernel, inputs.q.device, reset=False))
    torch.cuda.empty_cache()
    return dict(case=case.name, kv_from="L2" if from_l2 else "HBM", tile=call.spec.tile.name, splits=call.num_splits,
                ms=ms, **row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", required=True, help="bench case names, design or sweep")
    parser.add_argument("--json", help="write one JSON object per case and KV source to this file")
    args = parser.parse_args()
    try:
        cases = select_cases(args.case, None, "shuffled")
    except ValueError as err:
        parser.error(str(err))

    instrument_hopper_kernels(instrument)
    print(f"{'case':30} {'KV':3} {'tile':8} {'ms':>8}  " + "  ".join(f"{name:>7}" for name in PHASES) + "    total")
    with open(args.json, "w") if args.json else contextlib.nullcontext() as record:
        for case in cases:
            for from_l2 in (False, True):
                row = run(case, from_l2=from_l2)
                if record:
                    record.write(json.dumps(row) + "\n")
                    record.flush()
                print(f"{row['case']:30} {row['kv_from']:3} {row['tile']:8} {row['ms']:8.4f}  "
                      + "  ".join(f"{c:7.0f}" for c in row["cycles_per_tile"].values()) + f"  {row['total']:7.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
