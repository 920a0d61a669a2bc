"""How fast a bench case runs when its KV comes from L2 instead of HBM: the kernel's floor without
the memory it is measured against.

Every request's page table is pointed into the first pages of its pool (8 MiB of K and V), so
the same bytes are read as often as before, from L2.  The case's KV bytes over that time, as a
share of the streaming read, is the most the kernel could reach with memory for free ("ceiling"):
where it is below a target, no better overlap of loads with compute reaches that target, and the
kernel's work per KV tile has to fall first.  FlashInfer's kernels run on the same inputs where
installed.

    python tools/compute_floor.py --case specdec8_fp8_b32_s8k --json floor.jsonl
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json

import torch

from xqagen import bench

POOL_BYTES = 8 << 20  # K and V together; the H200's L2 holds 60 MiB


def l2_resident(inputs: bench._Inputs, case: bench.BenchCase) -> bench._Inputs:
    """``inputs`` with every page-table entry in the first pages of its pool (order kept random)."""
    pool = max(1, POOL_BYTES // case.page_bytes)
    resident = copy.copy(inputs)
    resident.sets = [(k, v, torch.where(pt >= 0, pt % pool, pt)) for k, v, pt in inputs.sets]
    return resident


def time_case(case: bench.BenchCase, inputs: bench._Inputs, flashinfer_paths) -> dict[str, float]:
    launch, _, splits = bench._run_xqagen(case, inputs, None, False)
    times = {"xqagen": bench.time_cuda_graph(lambda: launch(0))}
    for path in flashinfer_paths:
        try:
            fi_launch, _ = bench._run_flashinfer(case, inputs, path, False)
            times[f"FI {path}"] = bench.time_cuda_graph(lambda: fi_launch(0))
        except Exception as err:  # noqa: BLE001  (a case FlashInfer rejects has no column)
            print(f"FlashInfer {path}: {type(err).__name__}: {err}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", required=True, help="bench case names, design or sweep")
    parser.add_argument("--no-flashinfer", action="store_true")
    parser.add_argument("--json", help="write one JSON object per case to this file")
    args = parser.parse_args()
    try:
        cases = bench.named_cases(args.case)
    except ValueError as err:
        parser.error(str(err))
    flashinfer = not args.no_flashinfer and importlib.util.find_spec("flashinfer") is not None
    if flashinfer:
        bench.prebuild_flashinfer(cases)
    read_tbps = bench.read_bandwidth_tbps()
    print(f"streaming read {read_tbps:.2f} TB/s")
    print(f"{'case':30} {'library':10} {'HBM ms':>8} {'% read':>6} {'L2 ms':>8} {'ceiling':>7}")
    rows = []
    for case in cases:
        inputs = bench._Inputs(case, 1)
        paths = case.flashinfer_paths if flashinfer else ()
        hbm, l2 = time_case(case, inputs, paths), time_case(case, l2_resident(inputs, case), paths)
        read_share = {lib: case.kv_bytes / (ms * 1e9) / read_tbps for lib, ms in hbm.items()}
        ceiling = {lib: case.kv_bytes / (ms * 1e9) / read_tbps for lib, ms in l2.items()}
        for lib in hbm:
            print(f"{case.name:30} {lib:10} {hbm[lib]:8.4f} {100 * read_share[lib]:5.1f}% {l2.get(lib, float('nan')):8.4f} "
                  f"{100 * ceiling.get(lib, float('nan')):6.1f}%", flush=True)
        rows.append(dict(case=case.name, hbm_ms=hbm, l2_ms=l2, read_share=read_share, ceiling=ceiling))
        del inputs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps({"device": torch.cuda.get_device_name(0), "read_TBps": read_tbps}) + "\n")
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
