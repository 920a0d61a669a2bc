"""Time every combination of tiles and split counts of a kernel path on the bench cases (one process,
CUDA-graph timed, against the streaming-read ceiling measured in the same run), to choose a path's
default tiles and split rule from data.  The variants are compiled first in parallel processes.

    python tools/tile_sweep.py --path hopper --tile tma3x1 --tile tma4x2 --splits 1,2,4 \
        --case llama70b_fp8_b64_s8k --json sweep.jsonl

--rounds N times the whole list N times over, so that tiles alternate (the GPU's clocks and power
drift within a process); --batch reruns each case at other batch sizes (a full grid's CTAs against
whole waves of the SMs), --window under other sliding windows, --pages in-order gives every request
consecutive pages (the bench shuffles them), and --flashinfer times FlashInfer's paths of each case
beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import torch

from xqagen import bench
from xqagen.compiler import compile_kernel
from xqagen.emitters import PATHS
from xqagen.spec import KernelSpec, SpecError


def case_spec(case: bench.BenchCase, path: str, tile: str | None) -> KernelSpec:
    features = {name for name, on in (("sinks", case.sinks), ("sliding_window", case.window > 0)) if on}
    return KernelSpec(q_dtype=case.q_dtype, kv_dtype=case.kv_dtype, head_dim=case.head_dim,
                      group=case.num_q_heads // case.num_kv_heads, page_size=case.page_size,
                      q_seq_len=case.q_seq_len, features=frozenset(features), path=path, tile=tile)


def select_cases(names: list[str] | None, batches: str | None, pages: str,
                 windows: str | None = None) -> list[bench.BenchCase]:
    """The named bench cases (design or sweep; default: the design cases), each at every batch of
    the comma-separated ``batches`` (renamed name@bN) or its own, under every sliding window of the
    comma-separated ``windows`` (name@wN) or its own, with ``pages`` "shuffled" or "in-order"."""
    cases = bench.named_cases(names) if names else list(bench.DESIGN_CASES)
    if batches:
        cases = [dataclasses.replace(c, name=f"{c.name}@b{b}", batch=int(b)) for c in cases for b in batches.split(",")]
    if windows:
        cases = [dataclasses.replace(c, name=f"{c.name}@w{w}", window=int(w)) for c in cases for w in windows.split(",")]
    return [dataclasses.replace(c, shuffled_pages=pages == "shuffled") for c in cases]


def _compile(spec_dict: dict) -> None:
    spec = KernelSpec.from_dict(spec_dict)
    path = PATHS[spec.path]
    emitted = path.emit(spec)
    compile_kernel(emitted.source, emitted.kernel_name, path.arches[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="hopper", choices=tuple(PATHS))
    parser.add_argument("--tile", action="append", help="tile names (default: the path's default)")
    parser.add_argument("--splits", default="0", help="comma-separated split counts; 0: the path's choice")
    parser.add_argument("--case", action="append", help="bench case names, design or sweep (default: the design cases)")
    parser.add_argument("--batch", help="comma-separated batch sizes, each case run at every one (name@bN)")
    parser.add_argument("--window", help="comma-separated sliding windows, each case run under every one (name@wN)")
    parser.add_argument("--pages", choices=("shuffled", "in-order"), default="shuffled",
                        help="page tables: a random permutation of the pool (as the bench) or consecutive pages")
    parser.add_argument("--flashinfer", action="store_true", help="also time the case's FlashInfer paths")
    parser.add_argument("--rounds", type=int, default=1, help="time every (case, tile, splits) this many times, "
                                                                 "round after round")
    parser.add_argument("--json", help="write one JSON object per measurement to this file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    try:
        cases = select_cases(args.case, args.batch, args.pages, args.window)
    except ValueError as err:
        parser.error(str(err))
    tiles = args.tile or [None]
    splits = [int(s) for s in args.splits.split(",")]
    runs = []  # (case, tile) pairs whose variant exists (a tile may not fit a head size in shared memory)
    for case in cases:
        for tile in tiles:
            try:
                runs.append((case, tile, case_spec(case, args.path, tile)))
            except SpecError as err:
                print(f"skipped {case.name} {tile}: {err}")
    specs = {spec for _, _, spec in runs}
    with ProcessPoolExecutor(max_workers=os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, [spec.to_dict() for spec in specs]))
    if args.flashinfer:
        bench.prebuild_flashinfer(cases)
    copy_tbps, read_tbps = bench.copy_bandwidth_tbps(), bench.read_bandwidth_tbps()
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    print(f"streaming read {read_tbps:.2f} TB/s")
    # a JSON row per measurement as it is taken: a run cut short keeps the rows before it
    with open(args.json, "w") if args.json else contextlib.nullcontext() as record:
        if record:
            record.write(json.dumps({"device": torch.cuda.get_device_name(0), "read_TBps": read_tbps}) + "\n")
        for round_index, (case, tile, _) in ((r, run) for r in range(args.rounds) for run in runs):
            for num_splits in splits:
                r = bench.run_case(case, copy_tbps, read_tbps, flashinfer=args.flashinfer,
                                   num_splits=num_splits or None, l2_bytes=l2_bytes, path=args.path, tile=tile)
                if record:
                    record.write(json.dumps(dict(case=case.name, batch=case.batch, pages=args.pages, path=args.path,
                                                 tile=tile, round=round_index, splits=r.num_splits, ms=r.ms,
                                                 read_fraction=r.read_fraction, flashinfer_ms=r.flashinfer_ms)) + "\n")
                    record.flush()
                theirs = "".join(f"  FI {name} {ms:.4f} ms ({case.kv_bytes / ms / 1e9 / read_tbps:.1%})"
                                 for name, ms in r.flashinfer_ms.items())
                print(f"{case.name:32} {str(tile):10} {r.num_splits:>4} {r.ms:8.4f} ms {100 * r.read_fraction:5.1f}%"
                      f"{theirs}", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
