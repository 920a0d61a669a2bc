"""The ``xqagen`` command: ``generate``, ``build``, ``list``, ``cache``, ``env`` and ``bench``.

Every failure a user can cause ends in one ``xqagen: error: ...`` line on stderr and a non-zero
exit (2 for a bad command line or recipe, 1 for a failed build or an I/O error, 130 for Ctrl-C).
Log records of the ``xqagen`` loggers go to stderr at the level ``$XQAGEN_LOG_LEVEL`` names
(default WARNING; INFO shows each compile).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import multiprocessing
import os
import re
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import xqagen
from xqagen.emitters import EmittedKernel, emit, path_of
from xqagen.recipes import Recipe, RecipeError, find_recipe, load_recipe, shipped_recipes, sync_generated

if TYPE_CHECKING:
    from xqagen.compiler import CompiledKernel

DEFAULT_OUT = Path("generated")
ARCH_PATTERN = re.compile(r"sm_\d+[af]?")
CHANGE_VERBS = {"missing": "wrote", "stale": "updated", "extra": "removed"}
LOG_LEVEL_VARIABLE = "XQAGEN_LOG_LEVEL"
# What `xqagen env` reports; the CUDA packages of one major version are installed, not both.
ENV_PACKAGES = ("cuda-bindings", "cuda-core", "cuda-pathfinder", "nvidia-cuda-nvrtc", "nvidia-cuda-runtime",
                "nvidia-cuda-cccl", "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cuda-cccl-cu12",
                "nvidia-cutlass", "torch")
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


class _UserError(Exception):
    """A mistake in the command line or the environment, reported in one line."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logger = logging.getLogger("xqagen")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    logger.addHandler(handler)
    level = logger.level
    try:
        logger.setLevel(_log_level())
        return _run(argv)
    except KeyboardInterrupt:
        print("xqagen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`xqagen list | head`): stop quietly, as other command-line tools do.
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except (_UserError, RecipeError) as err:
        _error(str(err))
        return 2
    except OSError as err:  # an unwritable --out, a full disk, ...
        _error(f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err))
        return 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(argv: list[str]) -> int:
    from xqagen.compiler import ToolNotFoundError  # imports without the CUDA toolchain

    # bench parses its own arguments: argparse cannot pass through options it does not know.
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "recipes", None) is not None:
        if args.all and args.recipes:
            parser.error(f"{args.command}: name recipes or pass --all, not both")
        if not (args.all or args.recipes or args.command == "list"):
            parser.error(f"{args.command}: name at least one RECIPE, or pass --all")
    try:
        return args.run(args)
    except ToolNotFoundError as err:
        raise _UserError(str(err)) from err


def _error(message: str) -> None:
    print(f"xqagen: error: {message}", file=sys.stderr, flush=True)


def _discard_stdout() -> None:
    # Python flushes stdout again at exit, which would raise BrokenPipeError once more.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class _LogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"xqagen: {record.levelname.lower()}: {record.getMessage()}"


def _log_level() -> int:
    name = os.environ.get(LOG_LEVEL_VARIABLE, "WARNING").strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise _UserError(f"{LOG_LEVEL_VARIABLE}={name!r} is not a log level; use DEBUG, INFO, WARNING or ERROR")
    return level


def _init_worker(level: int) -> None:
    """Build workers log like the main process and leave Ctrl-C to it, which stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter())
    logger = logging.getLogger("xqagen")
    logger.addHandler(handler)
    logger.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xqagen", description="Generate, compile and benchmark XQA decode-attention kernels from recipes.",
        epilog="A RECIPE is the name of a shipped recipe (see `xqagen list`) or a path to a recipe file. "
               f"{LOG_LEVEL_VARIABLE}=INFO logs each compile.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {xqagen.__version__}")
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
    build.add_argument("--out", type=Path, metavar="DIR",
                       help="also add the cubins to the cubin store in DIR (made where missing or empty), "
                            "which the runtime reads through XQAGEN_CUBIN_DIR or an installed cubin package")
    _add_cache_dir_argument(build)
    build.set_defaults(run=_build)

    listing = commands.add_parser("list", help="show recipes and their variants (default: all shipped)")
    _add_recipe_arguments(listing)
    listing.set_defaults(run=_list)

    cache = commands.add_parser("cache", help="show or empty the cubin cache")
    cache.add_argument("action", choices=("info", "clear"), help="info: where it is and what it holds; "
                                                                 "clear: delete its entries")
    _add_cache_dir_argument(cache)
    cache.set_defaults(run=_cache)

    env = commands.add_parser("env", help="show the toolchain, driver, GPUs, cache and cubin stores this "
                                          "installation uses")
    env.set_defaults(run=_env)

    # Listed for --help only; main() hands `bench` and everything after it to xqagen.bench.
    commands.add_parser("bench", add_help=False, help="benchmark kernels (`xqagen bench --help` for options)")
    return parser


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipes", nargs="*", metavar="RECIPE", help="shipped recipe name or recipe file")
    parser.add_argument("--all", action="store_true", help="every shipped recipe")


def _add_cache_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="cubin cache (default: $XQAGEN_CACHE_DIR, else ~/.cache/xqagen)")


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
    """The recipes named (or all shipped ones); loading one checks that a path implements each variant."""
    paths = shipped_recipes() if args.all or not args.recipes else [find_recipe(r) for r in args.recipes]
    return [load_recipe(path) for path in dict.fromkeys(path.resolve() for path in paths)]


# ---- generate ----

def _generate(args: argparse.Namespace) -> int:
    recipes = _selected_recipes(args)
    changes = sync_generated(args.out, recipes, check=args.check)
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
    from xqagen import compiler

    # A missing toolchain is one error, not one failure per kernel.
    compiler.nvrtc_version()
    compiler.include_dirs()
    cache_dir = args.cache_dir or compiler.default_cache_dir()
    _check_writable(cache_dir)
    if args.out is not None:
        _check_store_target(args.out)  # a folder that cannot take them fails before compiling
    workers = min(args.jobs, len(jobs))
    start = time.perf_counter()
    compiled: list[CompiledKernel] = []
    failures: list[tuple[_CompileJob, Exception]] = []
    progress = _Progress(len(jobs))
    # NVRTC runs one compile at a time per process, so parallel builds take worker processes;
    # -j 1 compiles in this process.
    pool: Executor = (ThreadPoolExecutor(max_workers=1) if workers == 1 else
                      ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_init_worker, initargs=(logging.getLogger("xqagen").level,)))
    try:
        # Each worker builds several kernels: precompiled CuTe headers make all but its first much faster.
        futures = {pool.submit(compiler.compile_kernel, job.kernel.source, job.kernel.kernel_name, job.arch,
                               cache_dir=cache_dir, use_pch=True): job
                   for job in jobs}
        progress.draw()
        for done, future in enumerate(as_completed(futures), start=1):
            job = futures[future]
            try:
                result = future.result()
            except (compiler.CompileError, ValueError) as err:  # ValueError: an arch NVRTC does not support
                failures.append((job, err))
                progress.print(f"[{done}/{len(jobs)}] {job.label}: FAILED")
                continue
            compiled.append(result)
            progress.print(f"[{done}/{len(jobs)}] {job.label}: {_describe(result)}")
    except KeyboardInterrupt:
        # A compile cannot be interrupted; stop the workers rather than wait for theirs to end.
        for worker in multiprocessing.active_children():
            worker.terminate()
        raise
    finally:
        progress.clear()
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, do not wait for the queued compiles

    cached = sum(result.cache_hit for result in compiled)
    unstored = sum(result.path is None for result in compiled)
    print(f"{len(jobs)} cubins in {time.perf_counter() - start:.1f} s: {len(compiled) - cached} compiled, "
          f"{cached} cached, {len(failures)} failed")
    if len(compiled) > unstored:
        print(f"cubins under {cache_dir}")
    for job, err in failures:
        print(f"\n{job.label}: {err}", file=sys.stderr)
    if unstored:
        _error(f"{unstored} of the cubins could not be written to the cache {cache_dir} (see the warning above)")
    if args.out is not None:
        if failures:
            _error(f"the cubin store {args.out} was not written: {len(failures)} cubins failed")
        else:
            _write_store(args.out, jobs, compiled)
    return 1 if failures or unstored else 0


def _write_store(out: Path, jobs: list[_CompileJob], compiled: list[CompiledKernel]) -> None:
    from xqagen import compiler, cubins

    built = {(result.kernel_name, result.arch): result for result in compiled}
    keys = [(compiler.cache_key(job.kernel.source, job.kernel.kernel_name, job.arch),
             built[job.kernel.kernel_name, job.arch]) for job in jobs]
    try:
        total = cubins.write_store(out, keys)
    except cubins.StoreError as err:
        raise _UserError(f"--out: {err}") from err
    print(f"cubin store {out}: {len(keys)} cubins written, {total} in all")


def _check_store_target(out: Path) -> None:
    from xqagen import cubins

    try:
        cubins.check_store_target(out)
    except cubins.StoreError as err:
        raise _UserError(f"--out: {err}") from err


def _check_writable(cache_dir: Path) -> None:
    """Fail before compiling when the cache cannot take the cubins that build exists to store."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache_dir):
            pass
    except OSError as err:
        raise _UserError(f"cannot write the cubin cache {cache_dir} ({err.strerror or err}); "
                         "pass --cache-dir DIR or set XQAGEN_CACHE_DIR") from err


class _Progress:
    """Result lines on stdout and, when stderr is a terminal, a status line below them."""

    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.enabled = sys.stderr.isatty()

    def print(self, line: str) -> None:
        self.clear()
        print(line, flush=True)
        self.done += 1
        self.draw()

    def draw(self) -> None:
        if self.enabled and self.done < self.total:
            elapsed = time.perf_counter() - self.start
            sys.stderr.write(f"\rbuilding: {self.done}/{self.total} cubins done, {elapsed:.0f} s")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\x1b[K")  # carriage return, erase to the end of the line
            sys.stderr.flush()


def _compile_jobs(recipes: Sequence[Recipe], arches: tuple[str, ...] | None) -> list[_CompileJob]:
    """One job per (variant, arch); a variant shared by several recipes is built once.  An ``--arch``
    that a variant's path cannot build for is an error before anything compiles."""
    kernels = {spec: emit(spec) for recipe in recipes for spec in recipe.variants}
    for kernel in kernels.values():
        for arch in arches or ():
            reason = path_of(kernel.spec).unsupported_target(arch)
            if reason:
                raise _UserError(f"--arch {arch}: {reason}")
    jobs = [_CompileJob(kernel, arch) for kernel in kernels.values() for arch in arches or kernel.arches]
    # Jobs of one path and arch in a row: a worker's precompiled header serves only the headers and
    # target it was made for, so each switch makes a new one (a Hopper kernel took 16-18 s instead
    # of 5-6 in an interleaved build).
    return sorted(jobs, key=lambda job: (job.kernel.spec.path, job.arch))


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


# ---- cache ----

def _cache(args: argparse.Namespace) -> int:
    from xqagen import compiler

    cache_dir = args.cache_dir or compiler.default_cache_dir()
    if args.action == "clear":
        print(f"{cache_dir}: removed {compiler.clear_cache(cache_dir)} entries")
        return 0
    entries = compiler.cache_entries(cache_dir)
    size = sum(entry.stat().st_size for entry in entries)
    print(f"{cache_dir}: {len(entries)} entries, {size / 1e6:.1f} MB")
    return 0


# ---- env ----

def _env(args: argparse.Namespace) -> int:
    from xqagen import compiler

    rows = [("xqagen", xqagen.__version__), ("python", sys.version.split()[0])]
    for package in ENV_PACKAGES:
        try:
            rows.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    try:
        rows.append(("nvrtc", "%d.%d" % compiler.nvrtc_version()))
        rows.append(("nvrtc archs", " ".join(compiler.supported_archs())))
        rows.extend(("include dir", path) for path in compiler.include_dirs())
    except compiler.ToolNotFoundError as err:
        rows.append(("toolchain", f"not usable: {err}"))
    rows.extend(_driver_rows())
    rows.append(("cache dir", str(compiler.default_cache_dir())))
    rows.extend(_store_rows())
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name + ':':<{width + 1}} {value}")
    return 0


def _driver_rows() -> list[tuple[str, str]]:
    """The CUDA driver and its GPUs, through cuda.bindings (no torch needed)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return [("driver", "unknown (cuda-bindings not installed)")]
    try:
        (status,) = driver.cuInit(0)
    except RuntimeError:  # no libcuda: a machine without a GPU driver
        return [("driver", "not found (building needs none)")]
    if status != driver.CUresult.CUDA_SUCCESS:
        return [("driver", f"not usable ({status.name})")]
    _, version = driver.cuDriverGetVersion()
    rows = [("driver", f"CUDA {version // 1000}.{version % 1000 // 10}")]
    _, count = driver.cuDeviceGetCount()
    for ordinal in range(count):
        _, device = driver.cuDeviceGet(ordinal)
        _, name = driver.cuDeviceGetName(64, device)
        major = driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)[1]
        minor = driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)[1]
        rows.append((f"gpu {ordinal}", f"{name.split(bytes(1))[0].decode()} (sm_{major}{minor})"))
    if not count:
        rows.append(("gpus", "none"))
    return rows


def _store_rows() -> list[tuple[str, str]]:
    """The cubin stores the runtime searches, in order (unusable ones are logged), and whether it may compile."""
    from xqagen import cubins

    rows = [("cubin store", f"{store.path} ({len(store.entries)} cubins; {store.origin})")
            for store in cubins.cubin_stores()] or [("cubin stores", "none")]
    try:
        rows.append(("jit", "disabled" if cubins.jit_disabled() else "enabled"))
    except ValueError as err:
        rows.append(("jit", str(err)))
    return rows


# ---- bench ----

def _bench(argv: list[str]) -> int:
    try:
        from xqagen.bench import main as bench_main

        return bench_main(argv) or 0
    except ModuleNotFoundError as err:
        if err.name in ("torch", "matplotlib"):  # optional extras, whose messages say how to install them
            raise _UserError(str(err)) from err
        if err.name != "xqagen.bench":
            raise
        raise _UserError("benchmarks are not available in this installation (no xqagen.bench)") from err


if __name__ == "__main__":
    sys.exit(main())
