"""The ``xqagen`` command: ``generate``, ``build``, ``list`` and ``bench`` over recipes."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from xqagen.emitters import EmittedKernel, emit
from xqagen.recipes import Recipe, RecipeError, find_recipe, load_recipe, shipped_recipes, sync_generated
from xqagen.spec import KernelSpec

if TYPE_CHECKING:
    from xqagen.compiler import CompiledKernel

DEFAULT_OUT = Path("generated")
ARCH_PATTERN = re.compile(r"sm_\d+[af]?")
CHANGE_VERBS = {"missing": "wrote", "stale": "updated", "extra": "removed"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # bench parses its own arguments: argparse cannot pass through options it does not know.
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.all and args.recipes:
        parser.error(f"{args.command}: name recipes or pass --all, not both")
    if not (args.all or args.recipes or args.command == "list"):
        parser.error(f"{args.command}: name at least one RECIPE, or pass --all")
    try:
        return args.run(args)
    except (RecipeError, NotImplementedError) as err:
        print(f"xqagen: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xqagen", description="Generate, compile and benchmark XQA decode-attention kernels from recipes.",
        epilog="A RECIPE is the name of a shipped recipe (see `xqagen list`) or a path to a recipe file.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="write the CUDA sources and manifest of recipes")
    _add_recipe_arguments(generate)
    generate.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                          help="output folder; each recipe writes DIR/<recipe>/ (default: %(default)s)")
    generate.add_argument("--check", action="store_true",
                          help="write nothing; exit 1 listing the files that are stale, missing or extra")
    generate.set_defaults(run=_generate)

    build = commands.add_parser("build", help="compile every variant of recipes to cubins (no GPU needed)")
    _add_recipe_arguments(build)
    build.add_argument("--arch", type=_arch_list, metavar="ARCHES",
                       help="comma-separated targets such as sm_80,sm_90a (default: each variant's own)")
    build.add_argument("--jobs", "-j", type=_positive_int, default=os.cpu_count() or 1, metavar="N",
                       help="parallel compiles in worker processes; 1 compiles in this process "
                            "(default: %(default)s)")
    build.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help="cubin cache (default: $XQAGEN_CACHE_DIR, else ~/.cache/xqagen)")
    build.set_defaults(run=_build)

    listing = commands.add_parser("list", help="show recipes and their variants (default: all shipped)")
    _add_recipe_arguments(listing)
    listing.set_defaults(run=_list)

    # Listed for --help only; main() hands `bench` and everything after it to xqagen.bench.
    commands.add_parser("bench", add_help=False, help="benchmark kernels (`xqagen bench --help` for options)")
    return parser


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", metavar="RECIPE", help="shipped recipe name or recipe file")
    parser.add_argument("--all", action="store_true", help="every shipped recipe")


def _arch_list(text: str) -> tuple[str, ...]:
    arches = tuple(arch.strip() for arch in text.split(",") if arch.strip())
    bad = [arch for arch in arches if not ARCH_PATTERN.fullmatch(arch)]
    if bad or not arches:
        raise argparse.ArgumentTypeError(f"expected targets like sm_80,sm_90a; got {text!r}")
    return arches


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return int(text)


def _selected_recipes(args: argparse.Namespace) -> list[Recipe]:
    paths = shipped_recipes() if args.all or not args.recipes else [find_recipe(r) for r in args.recipes]
    return [load_recipe(path) for path in dict.fromkeys(path.resolve() for path in paths)]


# ---- generate ----

def _generate(args: argparse.Namespace) -> int:
    recipes = _selected_recipes(args)
    changes = sync_generated(args.out, recipes, prune_recipes=args.all, check=args.check)
    if args.check:
        if not changes:
            print(f"{args.out}: up to date ({len(recipes)} recipes)")
            return 0
        print(f"{args.out} is out of date; run `xqagen generate` without --check to update it:", file=sys.stderr)
        for change in changes:
            print(f"  {change.kind:<7}  {change.path}", file=sys.stderr)
        return 1
    for recipe in recipes:
        print(f"{recipe.name}: {len(recipe.variants)} variants in {args.out / recipe.name}")
    for change in changes:
        print(f"  {CHANGE_VERBS[change.kind]} {change.path}")
    print(f"{len(changes)} files changed" if changes else "already up to date")
    return 0


# ---- build ----

@dataclass(frozen=True)
class _CompileJob:
    kernel: EmittedKernel
    arch: str

    @property
    def label(self) -> str:
        return f"{self.kernel.spec.name} {self.arch}"


def _build(args: argparse.Namespace) -> int:
    jobs = _compile_jobs(_selected_recipes(args), args.arch)
    from xqagen import compiler  # imported here so that generate and list work without NVRTC

    workers = min(args.jobs, len(jobs))
    start = time.perf_counter()
    compiled: list[CompiledKernel] = []
    failures: list[tuple[_CompileJob, Exception]] = []
    # NVRTC runs one compile at a time per process, so parallel builds take worker processes;
    # -j 1 compiles in this process.
    pool: Executor = (ThreadPoolExecutor(max_workers=1) if workers == 1 else
                      ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")))
    try:
        # Each worker builds several kernels: precompiled CuTe headers make all but its first much faster.
        futures = {pool.submit(compiler.compile_kernel, job.kernel.source, job.kernel.kernel_name, job.arch,
                               cache_dir=args.cache_dir, use_pch=True): job
                   for job in jobs}
        for done, future in enumerate(as_completed(futures), start=1):
            job = futures[future]
            try:
                result = future.result()
            except (compiler.CompileError, ValueError) as err:  # ValueError: an arch NVRTC does not support
                failures.append((job, err))
                print(f"[{done}/{len(jobs)}] {job.label}: FAILED", flush=True)
                continue
            compiled.append(result)
            print(f"[{done}/{len(jobs)}] {job.label}: {_describe(result)}", flush=True)
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, do not wait for the queued compiles

    cached = sum(result.cache_hit for result in compiled)
    print(f"{len(jobs)} cubins in {time.perf_counter() - start:.1f} s: {len(compiled) - cached} compiled, "
          f"{cached} cached, {len(failures)} failed")
    cubin_paths = [str(result.path) for result in compiled if result.path]
    if cubin_paths:
        print(f"cubins under {os.path.commonpath([os.path.dirname(path) for path in cubin_paths])}")
    for job, err in failures:
        print(f"\n{job.label}: {err}", file=sys.stderr)
    return 1 if failures else 0


def _compile_jobs(recipes: Sequence[Recipe], arches: tuple[str, ...] | None) -> list[_CompileJob]:
    """One job per (variant, arch); a variant shared by several recipes is built once."""
    specs: dict[KernelSpec, None] = dict.fromkeys(spec for recipe in recipes for spec in recipe.variants)
    jobs = []
    for spec in specs:
        kernel = emit(spec)
        jobs.extend(_CompileJob(kernel, arch) for arch in arches or kernel.arches)
    return jobs


def _describe(result: CompiledKernel) -> str:
    """`6.1 s, 96 regs, 0 spills` for a compiled kernel (`cached, ...` for a cache hit)."""
    timing = "cached" if result.cache_hit else f"{result.compile_seconds:.1f} s"
    res = result.resources
    spills = (f"spills {res.spill_stores} B stored / {res.spill_loads} B loaded"
              if res.spill_stores or res.spill_loads else "0 spills")
    return f"{timing}, {res.registers} regs, {spills}"


# ---- list ----

LIST_COLUMNS = ("path", "q", "kv", "out", "page", "q_len", "features", "tile", "name")


def _list(args: argparse.Namespace) -> int:
    for index, recipe in enumerate(_selected_recipes(args)):
        model = recipe.model
        if index:
            print()
        print(f"{recipe.name}: {model.name}, {model.num_q_heads} q / {model.num_kv_heads} kv heads "
              f"(group {model.group}), head_dim {model.head_dim}; {len(recipe.variants)} variants")
        if recipe.description:
            print(textwrap.fill(recipe.description, width=100, initial_indent="  ", subsequent_indent="  "))
        rows = [(spec.path, spec.q_dtype, spec.kv_dtype, spec.out_dtype, str(spec.page_size),
                 str(spec.q_seq_len), ",".join(sorted(spec.features)) or "-", spec.tile.name, spec.name)
                for spec in recipe.variants]
        for line in _table(LIST_COLUMNS, rows):
            print(f"  {line}")
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in (header, *rows)]


# ---- bench ----

def _bench(argv: list[str]) -> int:
    try:
        from xqagen.bench import main as bench_main
    except ModuleNotFoundError as err:
        if err.name != "xqagen.bench":
            raise
        print("xqagen: error: benchmarks are not available in this installation (no xqagen.bench)", file=sys.stderr)
        return 2
    return bench_main(argv) or 0


if __name__ == "__main__":
    sys.exit(main())
