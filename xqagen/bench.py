"""`xqagen bench`: time xqagen's kernels against a device-to-device copy and, when installed,
FlashInfer's XQA on the same inputs in the same process.

Each case is timed with CUDA events around single launches (median of many after a warm-up).
When a case's KV cache is small enough to stay in L2, launches rotate over several input copies.
Reported: milliseconds, KV bandwidth (KV bytes read / time), its ratio to the copy bandwidth
(bytes read + written / time of a large ``copy_``), and speed ratios (FlashInfer time / ours).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch

from .masks import as_flashinfer_mask, causal_mask
from .reference import FP8_VALUE_SCALE, make_paged_kv, relative_l2_error

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "e4m3": torch.float8_e4m3fn}


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

    @property
    def kv_bytes(self) -> int:
        elem = 1 if self.kv_dtype == "e4m3" else 2
        return 2 * self.batch * self.seq_len * self.num_kv_heads * self.head_dim * elem


# The rows of the design document's baseline table (H100, FlashInfer 0.6.0).
DESIGN_CASES: tuple[BenchCase, ...] = (
    BenchCase("llama70b_fp8_b64_s8k", 64, 8192, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
    BenchCase("llama70b_bf16_b64_s8k", 64, 8192),
    BenchCase("llama70b_fp8_b8_s32k", 8, 32768, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
    BenchCase("llama70b_fp8_b1_s32k", 1, 32768, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
    BenchCase("specdec4_fp8_b64_s8k", 64, 8192, kv_dtype="e4m3", q_seq_len=4, flashinfer_paths=("generic", "sm90")),
    BenchCase("specdec8_bf16_b32_s8k", 32, 8192, q_seq_len=8),
    BenchCase("gptoss_sinks_bf16_b64_s8k", 64, 8192, head_dim=64, sinks=True),
    BenchCase("llama8b_bf16_p16_b128_s4k", 128, 4096, num_q_heads=32, page_size=16),
    BenchCase("llama8b_fp8_p16_b128_s4k", 128, 4096, num_q_heads=32, page_size=16, kv_dtype="e4m3",
              flashinfer_paths=("generic", "sm90")),
    BenchCase("llama70b_fp8_b256_s2k", 256, 2048, kv_dtype="e4m3", flashinfer_paths=("generic", "sm90")),
)


@dataclass
class BenchResult:
    case: BenchCase
    ms: float
    kv_tbps: float
    copy_fraction: float
    num_splits: int
    flashinfer_ms: dict[str, float] = field(default_factory=dict)
    flashinfer_rel_diff: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        d = asdict(self)
        d["case"] = self.case.name
        d["speedup"] = {path: ms / self.ms for path, ms in self.flashinfer_ms.items()}
        return d


def time_cuda(fn, *, warmup: int = 10, iters: int = 50) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` launches, each bracketed by CUDA events."""
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


def copy_bandwidth_tbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read plus written per second (TB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e9


class _Inputs:
    def __init__(self, case: BenchCase, copies: int, seed: int = 0):
        device = torch.device("cuda")
        gen = torch.Generator(device=device).manual_seed(seed)
        self.group = case.num_q_heads // case.num_kv_heads
        lens = [case.seq_len] * case.batch
        self.sets = [make_paged_kv(case.batch, lens, case.num_kv_heads, case.head_dim, case.page_size,
                                   TORCH_DTYPES[case.kv_dtype], generator=gen, device=device)
                     for _ in range(copies)]
        shape = (case.batch, 1, case.num_q_heads, case.head_dim) if case.q_seq_len == 1 else \
            (case.batch, 1, case.q_seq_len, case.num_q_heads, case.head_dim)
        self.q = torch.randn(shape, generator=gen, device=device).to(TORCH_DTYPES[case.q_dtype])
        self.seq_lens = torch.full((case.batch,), case.seq_len, dtype=torch.int32, device=device)
        self.kv_scale = 1.0 / FP8_VALUE_SCALE if case.kv_dtype == "e4m3" else 1.0
        self.sinks = (torch.randn(case.num_kv_heads, self.group, generator=gen, device=device)
                      if case.sinks else None)
        self.mask = causal_mask(case.batch, case.q_seq_len, device=device) if case.q_seq_len > 1 else None


def _run_xqagen(case: BenchCase, inputs: _Inputs, num_splits: int | None):
    """(launch(i) on input copy i, output, split count); validation stays out of the timed loop."""
    from .api import prepare_decode

    out = torch.empty_like(inputs.q)
    calls = [prepare_decode(inputs.q, k, v, pt, inputs.seq_lens, out=out, kv_scale=inputs.kv_scale,
                            sinks=inputs.sinks, sliding_window=case.window, mask=inputs.mask,
                            num_splits=num_splits)
             for k, v, pt in inputs.sets]
    return (lambda i: calls[i].launch()), out, calls[0].num_splits


def _run_flashinfer(case: BenchCase, inputs: _Inputs, path: str):
    """(launch(i) on input copy i, output) of FlashInfer's XQA ``path`` ("generic" or "sm90")."""
    fx = importlib.import_module("flashinfer.xqa")  # the package re-exports a function named xqa
    device = inputs.q.device
    out = torch.empty_like(inputs.q)
    module = fx.get_xqa_module(inputs.q.dtype, TORCH_DTYPES[case.kv_dtype], case.page_size, case.head_dim,
                               inputs.group, case.window > 0, out.dtype, case.q_seq_len)
    workspace = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
    semaphores = torch.zeros(8 << 20, dtype=torch.uint32, device=device)
    seq_lens = inputs.seq_lens.to(torch.uint32).unsqueeze(1)
    mask = as_flashinfer_mask(inputs.mask) if inputs.mask is not None else None
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    max_seq_len = inputs.sets[0][2].shape[1] * case.page_size

    def launch(i: int) -> None:
        k, v, pt = inputs.sets[i]
        module.xqa(path == "sm90", sm_count, case.num_kv_heads, case.window, 1.0, out, 1.0, inputs.q,
                   inputs.sinks, k, v, pt, max_seq_len, seq_lens, case.batch, inputs.kv_scale, semaphores,
                   workspace, False, case.q_seq_len, mask)

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


def run_case(case: BenchCase, copy_tbps: float, *, flashinfer: bool, num_splits: int | None = None,
             l2_bytes: int = 0) -> BenchResult:
    copies = max(1, min(4, math.ceil(4 * l2_bytes / case.kv_bytes))) if l2_bytes else 1
    inputs = _Inputs(case, copies)
    launch, out, splits = _run_xqagen(case, inputs, num_splits)
    ms = time_cuda(_rotating(launch, copies))
    result = BenchResult(case, ms, case.kv_bytes / ms / 1e9, case.kv_bytes / ms / 1e9 / copy_tbps, splits)
    if flashinfer:
        launch(0)
        ours = out.float()
        for path in case.flashinfer_paths:
            fi_launch, fi_out = _run_flashinfer(case, inputs, path)
            fi_launch(0)
            torch.cuda.synchronize()
            result.flashinfer_rel_diff[path] = relative_l2_error(ours, fi_out.float())
            result.flashinfer_ms[path] = time_cuda(_rotating(fi_launch, copies))
    return result


def format_table(results: list[BenchResult], copy_tbps: float, device_name: str) -> str:
    lines = [f"device: {device_name}; copy bandwidth {copy_tbps:.2f} TB/s (read + write)",
             f"{'case':28} {'splits':>6} {'ms':>8} {'KV TB/s':>8} {'%copy':>6} "
             f"{'FI generic ms':>13} {'x':>5} {'FI sm90 ms':>10} {'x':>5} {'|diff| FI':>9}"]
    for r in results:
        gen = r.flashinfer_ms.get("generic")
        sm90 = r.flashinfer_ms.get("sm90")
        diff = max(r.flashinfer_rel_diff.values()) if r.flashinfer_rel_diff else float("nan")
        lines.append(
            f"{r.case.name:28} {r.num_splits:>6} {r.ms:8.4f} {r.kv_tbps:8.2f} {100 * r.copy_fraction:5.0f}% "
            + (f"{gen:13.4f} {gen / r.ms:5.2f}" if gen else f"{'-':>13} {'-':>5}")
            + (f" {sm90:10.4f} {sm90 / r.ms:5.2f}" if sm90 else f" {'-':>10} {'-':>5}")
            + f" {diff:9.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xqagen bench", description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="run only these cases (repeatable); default: all")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--no-flashinfer", action="store_true", help="skip FlashInfer even if installed")
    parser.add_argument("--num-splits", type=int, default=None, help="force the split-KV count")
    parser.add_argument("--json", help="also write one JSON object per case to this file")
    args = parser.parse_args(argv)
    if args.list:
        for case in DESIGN_CASES:
            print(case.name, json.dumps(asdict(case)))
        return 0
    if not torch.cuda.is_available():
        print("xqagen bench needs a CUDA GPU", file=sys.stderr)
        return 2
    cases = [c for c in DESIGN_CASES if not args.case or c.name in args.case]
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
    copy_tbps = copy_bandwidth_tbps()
    results = []
    for case in cases:
        result = run_case(case, copy_tbps, flashinfer=flashinfer, num_splits=args.num_splits,
                          l2_bytes=getattr(props, "L2_cache_size", 0))
        results.append(result)
        print(format_table([result], copy_tbps, props.name).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    print(format_table(results, copy_tbps, props.name))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps({"device": props.name, "copy_TBps": copy_tbps}) + "\n")
            for r in results:
                f.write(json.dumps(r.row()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
