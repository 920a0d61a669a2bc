"""Where a Hopper kernel's time goes, CTA by CTA: each CTA of one launch records the global timer
(%globaltimer, ns) and its SM's cycle counter (clock64) at seven marks, and the phases between them
are summarised over the grid.

    python tools/cta_timeline.py --case llama70b_fp8_b1_s32k --case llama70b_fp8_b256_s2k --json timeline.jsonl

Marks, in a CTA's order: start; the producer issues its first TMA; the first stage reaches the
consumers ("first data"); the main loop ends; the outputs (or the split's partials) are stored; the
split merge begins (the last CTA of an output tile, once every split has arrived); the merge is
stored.  ``tail_us``: from the last main loop's end to the launch's last store.  Clock64 cycles over
global-timer time is the SM clock the CTA ran at.  The timings come from the last launch of a
CUDA-graph replay of 20 launches, the bench's timing.  The source is instrumented as emitted
(``instrument``): the shipped kernels carry no marks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its neighbour tile_sweep

from tile_sweep import select_cases  # noqa: E402

from xqagen import bench  # noqa: E402

MAX_CTAS = 8192  # CTAs a launch records; a larger grid's later CTAs are left out
MARKS = ("start", "first TMA", "first data", "loop end", "stored", "merge begins", "merge stored")
SMID_SLOT = 7
# The phases summarised: (name, from mark, to mark).
PHASES = (("to first TMA", 0, 1), ("to first data", 0, 2), ("main loop", 2, 3), ("epilogue", 3, 4),
          ("split arrival", 4, 5), ("split merge", 5, 6))

_PRELUDE = r"""
// ---- timeline marks (tools/cta_timeline.py) ----
__device__ unsigned long long xq_timeline[%(max_ctas)d][16];  // per CTA: 8 global-timer slots, 8 clock64 slots
__device__ __forceinline__ void xq_mark(int slot) {
  int const cta = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (cta >= %(max_ctas)d) return;
  unsigned long long now;
  asm volatile("mov.u64 %%0, %%%%globaltimer;" : "=l"(now));
  xq_timeline[cta][slot] = now;
  xq_timeline[cta][8 + slot] = clock64();
  if (slot == 0) {
    unsigned sm;
    asm volatile("mov.u32 %%0, %%%%smid;" : "=r"(sm));
    xq_timeline[cta][%(smid)d] = sm;
  }
}
""" % dict(max_ctas=MAX_CTAS, smid=SMID_SLOT)

# (line of the Hopper template, mark inserted before (-) or after (+) it)
_ANCHORS = (
    ("  SharedStorage& smem = *reinterpret_cast<SharedStorage*>(smem_raw);\n", "+", "  if (threadIdx.x == 0) xq_mark(0);\n"),
    ("    auto state = cutlass::make_producer_start_state<Pipeline>();\n", "+", "    if (lane == 0) xq_mark(1);\n"),
    ("      pipeline.consumer_wait(state);\n", "+", "      if (tile == range.tile_begin && threadIdx.x == 0) xq_mark(2);\n"),
    ("    // ---- rows' sums over the warpgroup", "-", "    if (threadIdx.x == 0) xq_mark(3);\n"),
    ("  if (p.num_splits == 1 || !partials.arrive_last(", "-", "  if (threadIdx.x == 0) xq_mark(4);\n"),
    ("  int const valid_rows = min(kRowsCta, request.rows - row_tile * kRowsCta);\n", "-", "  if (threadIdx.x == 0) xq_mark(5);\n"),
)


# ---- marks in emitted kernels, shared with loop_phases.py ----
class TemplateChanged(ValueError):
    """The Hopper template no longer has a line a mark goes beside."""


def insert_marks(source: str, prelude: str, anchors) -> str:
    """``source`` with ``prelude`` before its anonymous namespace and each ``(anchor line, "-" or "+",
    code)`` of ``anchors`` inserted before (-) or after (+) its line, which must occur once."""
    if "namespace {" not in source:
        raise TemplateChanged("no anonymous namespace to put the marks' storage before")
    source = source.replace("namespace {", prelude + "namespace {", 1)
    for anchor, where, mark in anchors:
        if source.count(anchor) != 1:
            raise TemplateChanged(f"expected the line {anchor.strip()!r} once in the kernel, found it "
                                  f"{source.count(anchor)} times")
        source = source.replace(anchor, anchor + mark if where == "+" else mark + anchor)
    return source


def instrument_hopper_kernels(instrument) -> None:
    """Every Hopper kernel this process emits (and so loads) from now on passes through ``instrument``."""
    from xqagen.emitters.hopper import HopperPath

    emit = HopperPath.emit

    def instrumented(self, spec):
        emitted = emit(self, spec)
        return dataclasses.replace(emitted, source=instrument(emitted.source))

    HopperPath.emit = instrumented


def device_global(kernel, device, name: str) -> tuple[int, int]:
    """(address, bytes) of the device global ``name`` in ``kernel``'s module, once the GPU is idle."""
    import torch
    from cuda.bindings import driver

    from xqagen.runtime import _check

    torch.cuda.synchronize()
    return _check(driver.cuLibraryGetGlobal(kernel.load(device).library, name.encode()))


def instrument(source: str) -> str:
    """``source`` (an emitted Hopper kernel) with the timeline marks; thread 0 (a consumer) and the
    producer's lane 0 record them.  Raises TemplateChanged where an anchor line is missing."""
    source = insert_marks(source, _PRELUDE, _ANCHORS)
    end = source.rstrip().rfind("}")  # the kernel's closing brace: the merge has stored
    return source[:end] + "  if (threadIdx.x == 0) xq_mark(6);\n" + source[end:]


def summarize(marks, *, ms: float) -> dict:
    """Percentiles (0, 10, 50, 90, 100; microseconds) of each phase over the CTAs that reached both
    of its marks, the span of the launch, and the SM clock (MHz) the CTAs ran at.  ``marks``: the
    recorded ``[ctas, 16]`` array (global-timer slots 0-6, SM id in slot 7, clock64 in 8-14)."""
    import numpy as np

    timer, cycles = marks[:, :7].astype(np.int64), marks[:, 8:15].astype(np.int64)
    t0 = timer[:, 0].min()
    merged = timer[:, 6] > timer[:, 4]  # this launch's merging CTAs (others hold an earlier launch's)
    end = np.where(merged, timer[:, 6], timer[:, 4])

    def percentiles(values):
        return [round(float(v) / 1e3, 3) for v in np.percentile(values, (0, 10, 50, 90, 100))] if len(values) else None

    phases = {}
    for name, a, b in PHASES:
        rows = merged if a >= 4 and b >= 5 else np.ones(len(marks), bool)
        phases[name] = percentiles((timer[rows, b] - timer[rows, a]))
    life_ns = np.maximum(1, timer[:, 4] - timer[:, 0])
    return dict(ms=ms, ctas=len(marks), sms=int(len(np.unique(marks[:, SMID_SLOT]))),
                span_us=round(float(end.max() - t0) / 1e3, 3), starts_us=percentiles(timer[:, 0] - t0),
                ends_us=percentiles(end - t0), phases_us=phases,
                tail_us=round(float(end.max() - timer[:, 3].max()) / 1e3, 3),
                sm_clock_mhz=round(float(np.median((cycles[:, 4] - cycles[:, 0]) / life_ns)) * 1e3, 0))


def _read_marks(kernel, device, ctas: int):
    import numpy as np
    from cuda.bindings import driver

    from xqagen.runtime import _check

    address, size = device_global(kernel, device, "xq_timeline")
    host = np.zeros(MAX_CTAS * 16, dtype=np.uint64)
    _check(driver.cuMemcpyDtoH(host.ctypes.data, address, size))
    return host.reshape(MAX_CTAS, 16)[:min(ctas, MAX_CTAS)]


def run(case: bench.BenchCase, tile: str | None, num_splits: int | None) -> dict:
    import torch

    from xqagen.api import prepare_decode

    copies = bench.input_copies(case, getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0))
    inputs = bench._Inputs(case, copies)
    calls = [prepare_decode(inputs.q, k, v, pt, inputs.seq_lens, kv_scale=inputs.kv_scale, sinks=inputs.sinks,
                            sliding_window=case.window, mask=inputs.mask, num_splits=num_splits, path="hopper",
                            tile=tile)
             for k, v, pt in inputs.sets]
    ms = bench.time_cuda_graph(bench._rotating(lambda i: calls[i].launch(), copies))
    grid = calls[0].bound._config.grid
    marks = _read_marks(calls[0].kernel, inputs.q.device, grid[0] * grid[1] * grid[2])
    return dict(case=case.name, tile=calls[0].spec.tile.name, splits=calls[0].num_splits, grid=list(grid),
                pages="shuffled" if case.shuffled_pages else "in-order", **summarize(marks, ms=ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", required=True, help="bench case names, design or sweep")
    parser.add_argument("--tile", help="a Hopper tile (default: the one dispatch chooses)")
    parser.add_argument("--splits", type=int, help="KV split count (default: the path's choice)")
    parser.add_argument("--batch", help="comma-separated batch sizes, each case run at every one (name@bN)")
    parser.add_argument("--pages", choices=("shuffled", "in-order"), default="shuffled")
    parser.add_argument("--json", help="write one JSON object per case to this file")
    args = parser.parse_args()
    try:
        cases = select_cases(args.case, args.batch, args.pages)
    except ValueError as err:
        parser.error(str(err))

    instrument_hopper_kernels(instrument)
    # a JSON row per case as it is measured: a run cut short keeps the rows before it
    with open(args.json, "w") if args.json else contextlib.nullcontext() as record:
        for case in cases:
            row = run(case, args.tile, args.splits)
            if record:
                record.write(json.dumps(row) + "\n")
                record.flush()
            phases = "  ".join(f"{name} {p[2]:.2f}" for name, p in row["phases_us"].items() if p)
            print(f"{row['case']:30} {row['tile']:8} {row['splits']:>3} splits {row['ms'] * 1e3:9.2f} us, span "
                  f"{row['span_us']:9.2f} us, tail {row['tail_us']:.2f} us, SM {row['sm_clock_mhz']:.0f} MHz; medians (us): {phases}", flush=True)


if __name__ == "__main__":
    main()
