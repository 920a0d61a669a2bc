"""Time the kernels of two template trees against each other in one process: a base tree (``--base``,
``emitters/templates`` of another revision) and this tree's own, alternated round by round on bench
cases and graph-timed beside the streaming read measured in the same run.  Changes to the templates
are measured this way before they are kept (docs/benchmarks.md).

    git archive REV emitters/templates | tar -x -C /tmp/base
    python tools/template_ab.py --base /tmp/base/emitters/templates --case llama70b_fp8_b1_s32k \\
        --case llama70b_fp8_b1_s32k:generic --rounds 3 --json ab.jsonl

A case is a bench case name (design or sweep), with ``:PATH`` to force a kernel path; each side runs
the variant the runtime dispatches.  Both sides' variants are compiled first, in parallel processes.
Rounds alternate which side goes first, so that the GPU's drift within the run shows as a
difference between rounds rather than between the sides.  A change beyond the templates (Python
included) is compared with ``tools/bench_before_after.sh`` instead: whole trees, one process each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: its neighbour tile_sweep

from tile_sweep import select_cases  # noqa: E402

from xqagen import bench, runtime  # noqa: E402
from xqagen.emitters import render  # noqa: E402

SIDES = ("base", "head")
_package_environment = render._environment


def use_templates(directory: str | None) -> None:
    """Emit every kernel from now on from the templates in ``directory`` (None: the package's own),
    and drop the launch handles emitted before, so that the next launches load the new kernels."""
    if directory is None:
        render._environment = _package_environment
    else:
        import jinja2

        overlay = _package_environment().overlay(loader=jinja2.FileSystemLoader(directory))
        render._environment = lambda: overlay
    runtime._handles.clear()


def parse_case(text: str) -> tuple[bench.BenchCase, str | None]:
    """``name`` or ``name:path``: the bench case, and the path it is forced onto (None: dispatched)."""
    name, _, path = text.partition(":")
    (case,) = select_cases([name], None, "shuffled")
    return case, path or None


def _compile(job: tuple[str | None, bench.BenchCase, str | None]) -> None:
    """In a worker: launch the case once on one side's templates, which compiles its variant into
    the cubin cache that the timing process then reads."""
    import torch

    directory, case, path = job
    use_templates(directory)
    launch, _, _ = bench._run_xqagen(case, bench._Inputs(case, 1), None, False, path)
    launch(0)
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base side's templates folder")
    parser.add_argument("--case", action="append", required=True, help="bench case name, or name:path")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every case on both sides (default 2)")
    parser.add_argument("--json", help="write one JSON object per measurement to this file")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: expected at least 1")
    if not (Path(args.base) / "hopper_decode.cu.j2").is_file():
        parser.error(f"--base {args.base}: expected a templates folder (with hopper_decode.cu.j2)")
    try:
        runs = [parse_case(text) for text in args.case]
    except ValueError as err:
        parser.error(str(err))

    import torch

    directories = {"base": str(Path(args.base).resolve()), "head": None}
    jobs = [(directories[side], case, path) for side in SIDES for case, path in runs]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile, jobs))
    copy_tbps, read_tbps = bench.copy_bandwidth_tbps(), bench.read_bandwidth_tbps()
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    print(f"streaming read {read_tbps:.2f} TB/s")
    times: dict[tuple[str, str | None, str], list[float]] = {}
    # a JSON row per measurement as it is taken: a run cut short keeps the rows before it
    with open(args.json, "w") if args.json else contextlib.nullcontext() as record:
        if record:
            record.write(json.dumps({"device": torch.cuda.get_device_name(0), "read_TBps": read_tbps,
                                     "base": args.base}) + "\n")
        for round_index in range(args.rounds):
            for case, path in runs:
                for side in SIDES if round_index % 2 == 0 else SIDES[::-1]:
                    use_templates(directories[side])
                    r = bench.run_case(case, copy_tbps, read_tbps, flashinfer=False, l2_bytes=l2_bytes, path=path)
                    times.setdefault((case.name, path, side), []).append(r.ms)
                    if record:
                        record.write(json.dumps(dict(case=case.name, path=path, side=side, round=round_index,
                                                     splits=r.num_splits, ms=r.ms,
                                                     read_fraction=r.read_fraction)) + "\n")
                        record.flush()
                    print(f"{round_index} {case.name:32} {str(path):8} {side:4} {r.num_splits:>3} splits "
                          f"{r.ms * 1e3:9.2f} us {100 * r.read_fraction:5.1f}%", flush=True)
                    torch.cuda.empty_cache()
    use_templates(None)
    print("\ncase, path: head / base, ratio of medians (below 1: head faster)")
    for case, path in runs:
        base, head = times[(case.name, path, "base")], times[(case.name, path, "head")]
        print(f"{case.name:32} {str(path):8} {statistics.median(head) / statistics.median(base):.3f}")


if __name__ == "__main__":
    main()
