"""Compile generated CuTe kernels to CUBINs with NVRTC, behind an on-disk cache.

:func:`compile_kernel` turns one generated translation unit into a CUBIN for one GPU
architecture and reports the kernel's resource usage as ptxas prints it (``-v``).  It asks for
CUBIN rather than PTX because a CUBIN from a newer NVRTC still loads on an older driver, where
newer PTX would not JIT.  The program is named ``<kernel_name>.cu``, so diagnostics point into
the generated source; a failure raises :class:`CompileError`, which quotes the generated lines
the log refers to.

NVRTC is driven through ``cuda.bindings.nvrtc``; ``cuda.core.ProgramOptions`` formats the typed
options.  ``cuda.core.Program`` is not used because it cannot pass the caller's extra raw flags
and it reports a failed compile's log only inside its exception text.  Both are imported on first
use, so that this module (and the cache functions) import without the CUDA toolchain; a missing
toolchain raises :class:`ToolNotFoundError` naming the extra to install.  The CUDA 12 and CUDA 13
wheels both work: :mod:`cuda.pathfinder` finds their libraries and headers.

CUBINs are not byte-for-byte reproducible: NVRTC gives internal symbols a per-compile random
suffix, so two compiles of one source differ in a few bytes of the symbol table while their SASS
and resource usage are the same.  The cache, not the bytes, makes a build repeatable.

Cache
-----
Entries live in ``cache_dir`` (default: :func:`default_cache_dir`), one file per entry named
``<key>.entry``.  The key is the SHA-256 of a JSON document holding :data:`CACHE_FORMAT_VERSION`,
the NVRTC version, the versions of the NVRTC, CUDA runtime, CCCL and CUTLASS packages, the
architecture, the kernel name, every NVRTC option in order and the source.  Include paths enter
the key relative to the site-packages folder that holds them (their packages' versions are in the
key), so that venvs with the same toolchain share entries; a CUDA toolkit's include path enters
as it is.  An entry file is::

    magic         8 bytes   b"XQAGCUB1"
    header_size   4 bytes   little-endian unsigned
    header        header_size bytes of UTF-8 JSON: kernel_name, arch, cubin_size,
                            cubin_sha256, resources (the ResourceUsage fields), log
    cubin         cubin_size bytes

A hit is checked against all of it (magic, sizes, checksum, header fields); an entry that fails
a check is reported in one line, deleted and rebuilt, never returned.  Entries are written to a
temporary file in the cache directory, flushed to disk and renamed over the entry, so a reader
sees a whole entry or none.  A miss takes the key's lock file (``<key>.lock``) before compiling
and looks again once it holds it, so that processes wanting the same kernel compile it once.  A
cache that cannot be read or written costs one warning per process and directory; compiles then
happen in memory and their :attr:`CompiledKernel.path` is None.

Cubin stores (:mod:`xqagen.cubins`) are read-only folders of the same entry files under the same
keys (:func:`cache_key`), written by ``xqagen build --out``.

Concurrency
-----------
Every function here may be called from several threads.  NVRTC itself runs one compile at a time
per process (two threads take as long as two compiles in a row), so compile in several
processes to use several cores.  Each compile logs an INFO record (kernel, arch, seconds) on the
``xqagen.compiler`` logger.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import site
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import filelock
from cuda.pathfinder import DynamicLibNotFoundError, find_nvidia_binary_utility, find_nvidia_header_directory

__all__ = [
    "CACHE_FORMAT_VERSION",
    "TARGET_SUFFIXES",
    "CompileError",
    "CompiledKernel",
    "CorruptEntryError",
    "ResourceUsage",
    "ToolNotFoundError",
    "cache_entries",
    "cache_key",
    "cached_kernel",
    "clear_cache",
    "compile_kernel",
    "default_cache_dir",
    "disassemble",
    "entry_path",
    "include_dirs",
    "nvrtc_version",
    "read_entry",
    "supported_archs",
    "toolchain",
    "write_entry",
    "write_file_atomically",
]

logger = logging.getLogger(__name__)

#: Part of every cache key: bump it when the entry format or the meaning of an entry changes.
CACHE_FORMAT_VERSION = 2

_ENTRY_MAGIC = b"XQAGCUB1"
_HEADER_SIZE = struct.Struct("<I")
_ENTRY_SUFFIX = ".entry"
_CACHE_FILE_RE = re.compile(r"[0-9a-f]{64}\.(entry|lock)|\.[0-9a-f]{64}\.entry\..*\.tmp")
# Packages whose contents shape the CUBIN without showing up in the option list (CUDA 13 and 12 names).
_TOOLCHAIN_PACKAGES = ("nvidia-cuda-nvrtc", "nvidia-cuda-runtime", "nvidia-cuda-cccl",
                       "nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12", "nvidia-cuda-cccl-cu12",
                       "nvidia-cutlass")
INSTALL_HINT = "pip install 'xqagen[cu13]' (CUDA 13 driver) or 'xqagen[cu12]' (CUDA 12 driver)"
# Automatic precompiled headers: NVRTC warns when a PCH made for other options (629) or another
# include prefix (630) does not fit and makes a new one; expected with several arches per process.
_PCH_OPTIONS: dict[str, Any] = {"pch": True, "pch_messages": False, "diag_suppress": [629, 630]}
# Making a PCH of CuTe's headers takes about 470 MB of NVRTC's PCH heap (the default is 256 MB).
# The heap is reserved address space; pages are touched only as PCHs fill it.
_PCH_HEAP_BYTES = 1 << 30
_pch_heap_lock = threading.Lock()
_ARCH_RE = re.compile(r"sm_(?P<number>\d+)(?P<suffix>[af]?)")
#: A target's suffix -> the first sm number that has it: arch-specific targets (sm_90a) start with
#: sm_90, family targets (sm_100f) with sm_100.
TARGET_SUFFIXES = {"": 0, "a": 90, "f": 100}
_KERNEL_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_QUOTED_LINES = 10  # referenced lines a CompileError quotes; the full log is always there


class ToolNotFoundError(RuntimeError):
    """A CUDA toolchain component (NVRTC, a header package or a binary utility) is not installed."""


class CompileError(RuntimeError):
    """NVRTC could not build the kernel.

    The message holds the kernel name, the architecture, NVRTC's log and the generated source
    lines that the log's errors and instantiation traces refer to.
    """

    def __init__(self, message: str, *, kernel_name: str, arch: str, log: str):
        super().__init__(message)
        self.kernel_name = kernel_name
        self.arch = arch
        self.log = log

    def __reduce__(self):  # picklable, so that it crosses process pools
        return functools.partial(type(self), kernel_name=self.kernel_name, arch=self.arch, log=self.log), (str(self),)


@dataclass(frozen=True)
class ResourceUsage:
    """What ptxas reports for one entry function."""

    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_bytes: int  # the function's stack frame
    shared_bytes: int  # static __shared__ memory; dynamic shared memory is a launch parameter


@dataclass(frozen=True)
class CompiledKernel:
    """A CUBIN with what ptxas reported about it."""

    cubin: bytes
    kernel_name: str
    arch: str
    resources: ResourceUsage
    log: str  # NVRTC's log, ptxas's resource report included
    cache_hit: bool
    path: Path | None  # the cache entry; None when it could not be written
    compile_seconds: float  # time this call took: the compile, or the cache load on a hit


# ---- toolchain discovery ----

def include_dirs() -> list[str]:
    """Include directories for CuTe kernels: CUTLASS, CCCL, with CUDA 13 the folder holding
    ``cccl/`` (CuTe writes ``<cccl/cuda/std/...>``), and the CUDA runtime headers."""
    return list(_include_dirs())


@functools.cache
def _include_dirs() -> tuple[str, ...]:
    cutlass_spec = importlib.util.find_spec("cutlass_library")
    cutlass = (Path(cutlass_spec.submodule_search_locations[0]) / "source" / "include"
               if cutlass_spec and cutlass_spec.submodule_search_locations else None)
    if cutlass is None or not (cutlass / "cute" / "tensor.hpp").is_file():
        raise ToolNotFoundError(f"CUTLASS/CuTe headers not found: {INSTALL_HINT}")
    # CUDA 13 puts CCCL under include/cccl, and CUTLASS then writes <cccl/cuda/std/...>, which the
    # parent folder serves; the CUDA 12 wheel has it directly under include/.
    cccl = _header_dir("cccl")
    cccl_parent = [os.path.dirname(cccl)] if os.path.basename(cccl) == "cccl" else []
    return tuple(dict.fromkeys([str(cutlass), cccl, *cccl_parent, _header_dir("cudart")]))


def _header_dir(libname: str) -> str:
    found = find_nvidia_header_directory(libname)
    if found is None:
        raise ToolNotFoundError(f"{libname} headers not found: {INSTALL_HINT}")
    return found


@functools.cache
def _nvrtc() -> Any:
    """``cuda.bindings.nvrtc`` with its library loaded."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise ToolNotFoundError(f"NVRTC bindings (cuda-bindings) not installed: {INSTALL_HINT}") from None
    try:
        nvrtc.nvrtcVersion()
    except DynamicLibNotFoundError:
        raise ToolNotFoundError(f"the NVRTC library is not installed: {INSTALL_HINT}") from None
    return nvrtc


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library in use."""
    major, minor = _check(_nvrtc().nvrtcVersion())
    return major, minor


def supported_archs() -> list[str]:
    """The ``sm_<N>`` targets this NVRTC compiles for."""
    return [f"sm_{number}" for number in _supported_arch_numbers()]


@functools.cache
def _supported_arch_numbers() -> tuple[int, ...]:
    return tuple(_check(_nvrtc().nvrtcGetSupportedArchs()))


def toolchain() -> dict[str, Any]:
    """What decides a cubin besides its source, options and arch: the NVRTC version and the
    versions of the toolchain packages (None for one not installed).  Part of every cache key;
    cubin stores record it."""
    return {"nvrtc": list(nvrtc_version()), "packages": dict(_package_versions())}


@functools.cache
def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in _TOOLCHAIN_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None  # e.g. headers from a CUDA toolkit: their paths are in the key
    return versions


def default_cache_dir() -> Path:
    """``$XQAGEN_CACHE_DIR``, else ``xqagen`` under ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    if configured := os.environ.get("XQAGEN_CACHE_DIR"):
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xqagen"


def _check(result: tuple) -> Any:
    """The value(s) of a cuda.bindings NVRTC call, which returns (status, *values)."""
    nvrtc = _nvrtc()
    status, *values = result
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {nvrtc.nvrtcGetErrorString(status)[1].decode()}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# ---- compiling ----

def compile_kernel(source: str, kernel_name: str, arch: str, *, options: Sequence[str] = (),
                   cache_dir: Path | None = None, use_pch: bool = False) -> CompiledKernel:
    """Compile ``source`` to a CUBIN for ``arch`` (``sm_80``, ``sm_90a``, ...), or load it from the cache.

    ``kernel_name`` is the ``extern "C"`` entry function; its resource usage is reported.
    ``options`` are extra NVRTC flags, passed after the built-in ones (C++17, ``-default-device``,
    line info, the include paths, ``ptxas -v``); surrounding blanks are dropped.  The cache key
    covers the toolchain's headers by package version, not headers that ``options`` add.

    ``use_pch`` lets NVRTC precompile the headers that the source includes before its first
    declaration and reuse them for later compiles, in this process, with the same include lines
    and options.  Making the PCH costs 1-2 s more than a plain compile; each later compile of a
    CuTe kernel then takes about 1 s instead of 4 s.  Use it when one process builds several
    kernels per architecture.  It assumes the headers do not change while the process runs, and
    each PCH takes about 450 MB in a temporary folder until the process exits.  The code is the
    same either way (the bytes too, but for internal symbol names: see the module docstring).

    Raises :class:`CompileError` when NVRTC fails or ``kernel_name`` is not an entry function,
    ``ValueError`` for a malformed ``arch`` or ``kernel_name``.
    """
    start = time.perf_counter()
    _validate(kernel_name, arch, options)
    nvrtc_options = _nvrtc_options(arch, options)  # without the PCH flags, which change no CUBIN
    path = entry_path(_cache_key(source, kernel_name, arch, nvrtc_options), cache_dir)

    def hit(cached: CompiledKernel) -> CompiledKernel:
        return replace(cached, compile_seconds=time.perf_counter() - start)

    if (cached := _read_cache_entry(path, kernel_name, arch)) is not None:
        return hit(cached)
    with _key_lock(path) as locked:
        # Whoever held the lock before us may have just built this kernel.
        if locked and (cached := _read_cache_entry(path, kernel_name, arch)) is not None:
            return hit(cached)
        if use_pch:
            _reserve_pch_heap()
            nvrtc_options = _nvrtc_options(arch, options, use_pch=True)
        cubin, log = _run_nvrtc(source, kernel_name, arch, nvrtc_options)
        try:
            resources = _parse_resources(log, kernel_name)
        except LookupError as err:
            raise CompileError(f"kernel {kernel_name!r} ({arch}): {err}; declare the kernel extern \"C\"",
                               kernel_name=kernel_name, arch=arch, log=log) from None
        compiled = CompiledKernel(cubin, kernel_name, arch, resources, log, cache_hit=False, path=None,
                                  compile_seconds=0.0)
        stored = locked and _write_cache_entry(path, compiled)
    seconds = time.perf_counter() - start
    logger.info("compiled %s for %s in %.1f s", kernel_name, arch, seconds)
    return replace(compiled, path=path if stored else None, compile_seconds=seconds)


def cache_key(source: str, kernel_name: str, arch: str, *, options: Sequence[str] = ()) -> str:
    """The key under which :func:`compile_kernel` caches this kernel, and cubin stores hold it:
    the content and the toolchain's versions, not where anything is installed (see Cache)."""
    _validate(kernel_name, arch, options)
    return _cache_key(source, kernel_name, arch, _nvrtc_options(arch, options))


def cached_kernel(key: str, kernel_name: str, arch: str, *, cache_dir: Path | None = None) -> CompiledKernel | None:
    """The cache's entry ``key`` (:func:`cache_key`) if it holds one, never compiling; a corrupt
    entry is reported in one line and deleted."""
    return _read_cache_entry(entry_path(key, cache_dir), kernel_name, arch)


def compile_ptx(source: str, kernel_name: str, arch: str = "compute_80", *, options: Sequence[str] = ()) -> bytes:
    """PTX of ``source`` for virtual architecture ``arch`` (``compute_<N>``), uncached.

    The driver compiles PTX for the GPU it loads on (when its CUDA version is at least NVRTC's),
    so this runs an older architecture's code path on a newer GPU: the GPU tests use it to run the
    sm_80 kernels on sm_90.  Shipped kernels are CUBINs (:func:`compile_kernel`).
    """
    match = re.fullmatch(r"compute_(\d+)", arch)
    if not match or int(match[1]) not in _supported_arch_numbers():
        raise ValueError(f"invalid arch {arch!r}: expected compute_<N> with N one of "
                         f"{', '.join(map(str, _supported_arch_numbers()))}")
    _validate(kernel_name, f"sm_{match[1]}", options)
    ptx, _ = _run_nvrtc(source, kernel_name, arch, _nvrtc_options(arch, options, target="ptx"), target="ptx")
    return ptx.rstrip(b"\0") + b"\0"


def _validate(kernel_name: str, arch: str, options: Sequence[str]) -> None:
    if not _KERNEL_NAME_RE.fullmatch(kernel_name):
        raise ValueError(f"kernel_name {kernel_name!r} is not a C identifier")
    if isinstance(options, str) or not all(isinstance(option, str) for option in options):
        raise TypeError(f"options must be a sequence of strings, got {options!r}")
    match = _ARCH_RE.fullmatch(arch)
    supported = _supported_arch_numbers()
    if match:
        number, suffix = int(match["number"]), match["suffix"]
        if number in supported and number >= TARGET_SUFFIXES[suffix]:
            return
    major, minor = nvrtc_version()
    raise ValueError(f"invalid arch {arch!r}: expected sm_<N>, sm_<N>a (N >= 90) or sm_<N>f (N >= 100) "
                     f"with N one of {', '.join(map(str, supported))} (NVRTC {major}.{minor})")


def _nvrtc_options(arch: str, extra: Sequence[str], *, use_pch: bool = False, target: str = "cubin") -> list[str]:
    _nvrtc()  # a missing toolchain is reported before cuda.core fails to import its bindings
    from cuda.core import ProgramOptions

    program_options = ProgramOptions(
        arch=arch,
        std="c++17",
        device_as_default_execution_space=True,  # CUTLASS has functions with no __device__ annotation
        lineinfo=True,
        ptxas_options=["-v"] if target == "cubin" else None,  # puts the resource usage into the log
        no_cache=True,  # NVRTC's own cache (12.9+) returns hits with an empty log: no resource usage
        include_path=list(_include_dirs()),
        **(_PCH_OPTIONS if use_pch else {}),
    )
    return [option.decode() for option in program_options.as_bytes("nvrtc", target)] + [
        option.strip() for option in extra if option.strip()]


def _cache_key(source: str, kernel_name: str, arch: str, nvrtc_options: list[str]) -> str:
    # Option order is kept: include paths and macro definitions can depend on it.
    document = {
        "format": CACHE_FORMAT_VERSION,
        **toolchain(),
        "arch": arch,
        "kernel_name": kernel_name,
        "options": [_portable_option(option) for option in nvrtc_options],
        "source": source,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


_INCLUDE_PATH_OPTION = "--include-path="


def _portable_option(option: str) -> str:
    """``option``, with a toolchain include path inside site-packages made relative to it."""
    if not option.startswith(_INCLUDE_PATH_OPTION) or option[len(_INCLUDE_PATH_OPTION):] not in _include_dirs():
        return option
    path = Path(option[len(_INCLUDE_PATH_OPTION):])
    for root in _site_roots():
        if path.is_relative_to(root):
            return f"{_INCLUDE_PATH_OPTION}<site-packages>/{path.relative_to(root).as_posix()}"
    return option


@functools.cache
def _site_roots() -> tuple[Path, ...]:
    """The folders pip installs packages into, as this interpreter sees them, deepest first: its
    own, and those of other environments on ``sys.path`` (a ``.pth`` file, ``PYTHONPATH``)."""
    roots = {*site.getsitepackages(), site.getusersitepackages(),
             *(sysconfig.get_paths()[key] for key in ("purelib", "platlib")),
             *(entry for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages"))}
    return tuple(sorted((Path(root) for root in roots), key=lambda root: len(root.parts), reverse=True))


def _reserve_pch_heap() -> None:
    # Resizing the heap would invalidate the PCHs already in it, so it only ever grows, once.
    nvrtc = _nvrtc()
    with _pch_heap_lock:
        if _check(nvrtc.nvrtcGetPCHHeapSize()) < _PCH_HEAP_BYTES:
            _check(nvrtc.nvrtcSetPCHHeapSize(_PCH_HEAP_BYTES))


def _run_nvrtc(source: str, kernel_name: str, arch: str, options: list[str], *,
               target: str = "cubin") -> tuple[bytes, str]:
    """(CUBIN or PTX, log) of one NVRTC compile; raises CompileError when it fails."""
    nvrtc = _nvrtc()
    program_name = f"{kernel_name}.cu"
    encoded = [option.encode() for option in options]
    program = _check(nvrtc.nvrtcCreateProgram(source.encode(), program_name.encode(), 0, [], []))
    try:
        (status,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        log_buffer = bytearray(_check(nvrtc.nvrtcGetProgramLogSize(program)))
        _check(nvrtc.nvrtcGetProgramLog(program, log_buffer))
        # Logs can hold bytes that are not UTF-8 (from headers, or paths in other encodings).
        log = log_buffer.rstrip(b"\0").decode("utf-8", errors="replace")
        if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(_describe_failure(source, program_name, kernel_name, arch, log),
                               kernel_name=kernel_name, arch=arch, log=log)
        if target == "ptx":
            ptx = bytearray(_check(nvrtc.nvrtcGetPTXSize(program)))
            _check(nvrtc.nvrtcGetPTX(program, ptx))
            return bytes(ptx), log
        cubin = bytearray(_check(nvrtc.nvrtcGetCUBINSize(program)))
        _check(nvrtc.nvrtcGetCUBIN(program, cubin))
        return bytes(cubin), log
    finally:
        _check(nvrtc.nvrtcDestroyProgram(program))


def _describe_failure(source: str, program_name: str, kernel_name: str, arch: str, log: str) -> str:
    name = re.escape(program_name)
    # "<kernel>.cu(12): error: ..." and, in template instantiation traces, "... at line 12 of <kernel>.cu".
    references = re.finditer(rf"^{name}\((\d+)\): (?:catastrophic )?error|\bat line (\d+) of {name}\b", log, re.M)
    line_numbers = list(dict.fromkeys(int(match[1] or match[2]) for match in references))
    message = f"NVRTC could not compile kernel {kernel_name!r} for {arch}.\n\nNVRTC log:\n{log.rstrip()}\n"
    if line_numbers:
        source_lines = source.splitlines()
        quoted = [f"{program_name}, line {number}:\n{_quote_lines(source_lines, number)}"
                  for number in line_numbers[:_MAX_QUOTED_LINES]]
        omitted = len(line_numbers) - len(quoted)
        if omitted:
            quoted.append(f"... and {omitted} more referenced lines")
        message += "\nGenerated source at the lines the log refers to:\n" + "\n\n".join(quoted)
    return message


def _quote_lines(lines: list[str], number: int, context: int = 3) -> str:
    """Lines number-context .. number+context, numbered, with ``>`` marking line ``number``."""
    first, last = max(1, number - context), min(len(lines), number + context)
    width = len(str(last))
    return "\n".join(f"{'>' if current == number else ' '} {current:>{width}} | {lines[current - 1]}"
                     for current in range(first, last + 1))


_ENTRY_RE = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES_RE = re.compile(r"Function properties for (\S+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED_RE = re.compile(r"Used (\d+) registers")
_SMEM_RE = re.compile(r"(\d+) bytes smem")


def _parse_resources(log: str, kernel_name: str) -> ResourceUsage:
    """The ptxas -v report of entry function ``kernel_name``; the log may cover several functions.

    ptxas writes, per entry function: "Compiling entry function 'k'", "Function properties for k",
    the stack frame / spill line, then "Used N registers, ..., M bytes smem, ...".  Callees that
    are not inlined get their own "Function properties" block.
    """
    entry: str | None = None
    properties_of: str | None = None
    frames: dict[str, tuple[int, int, int]] = {}
    usage: dict[str, tuple[int, int]] = {}
    for line in log.splitlines():
        if match := _ENTRY_RE.search(line):
            entry = match[1]
        elif match := _PROPERTIES_RE.search(line):
            properties_of = match[1]
        elif (match := _FRAME_RE.search(line)) and properties_of is not None:
            frames[properties_of] = (int(match[1]), int(match[2]), int(match[3]))
        elif (match := _USED_RE.search(line)) and entry is not None:
            smem = _SMEM_RE.search(line)
            usage[entry] = (int(match[1]), int(smem[1]) if smem else 0)
    if kernel_name not in usage or kernel_name not in frames:
        raise LookupError(f"no ptxas report for entry function {kernel_name!r} "
                          f"(entry functions: {', '.join(usage) or 'none'})")
    stack, spill_stores, spill_loads = frames[kernel_name]
    registers, shared = usage[kernel_name]
    return ResourceUsage(registers, spill_stores, spill_loads, stack, shared)


# ---- cache entries ----

class CorruptEntryError(ValueError):
    """An entry file that fails a check (magic, sizes, checksum, or the kernel it describes)."""


def entry_path(key: str, directory: Path | None = None) -> Path:
    """The file of entry ``key`` in a cache or store folder (default: :func:`default_cache_dir`)."""
    return (Path(directory) if directory is not None else default_cache_dir()) / f"{key}{_ENTRY_SUFFIX}"


def _encode_entry(compiled: CompiledKernel) -> bytes:
    header = json.dumps({
        "kernel_name": compiled.kernel_name,
        "arch": compiled.arch,
        "cubin_size": len(compiled.cubin),
        "cubin_sha256": hashlib.sha256(compiled.cubin).hexdigest(),
        "resources": asdict(compiled.resources),
        "log": compiled.log,
    }).encode()
    return _ENTRY_MAGIC + _HEADER_SIZE.pack(len(header)) + header + compiled.cubin


def read_entry(path: Path, kernel_name: str, arch: str) -> CompiledKernel:
    """The kernel in entry file ``path``, checked to be ``kernel_name`` for ``arch``.

    Raises ``OSError`` when the file cannot be read (``FileNotFoundError``: there is none) and
    :class:`CorruptEntryError` when it fails a check."""
    start = time.perf_counter()
    data = Path(path).read_bytes()
    prefix = len(_ENTRY_MAGIC) + _HEADER_SIZE.size
    if len(data) < prefix or not data.startswith(_ENTRY_MAGIC):
        raise CorruptEntryError("bad magic")
    (header_size,) = _HEADER_SIZE.unpack_from(data, len(_ENTRY_MAGIC))
    try:
        header = json.loads(data[prefix:prefix + header_size])
        cubin_size, cubin_sha256, log = header["cubin_size"], header["cubin_sha256"], header["log"]
        resources = ResourceUsage(**{field.name: int(header["resources"][field.name])
                                     for field in fields(ResourceUsage)})
        identity = (header["kernel_name"], header["arch"])
    except (ValueError, TypeError, KeyError) as err:
        # The type only: a decode error's text can quote the whole entry.
        raise CorruptEntryError(f"unreadable header ({type(err).__name__})") from None
    if identity != (kernel_name, arch) or not isinstance(log, str):
        raise CorruptEntryError("header does not describe this kernel")
    cubin = data[prefix + header_size:]
    if len(cubin) != cubin_size:
        raise CorruptEntryError(f"{len(cubin)} cubin bytes, header says {cubin_size}")
    if hashlib.sha256(cubin).hexdigest() != cubin_sha256:
        raise CorruptEntryError("cubin checksum mismatch")
    return CompiledKernel(cubin, kernel_name, arch, resources, log, cache_hit=True, path=Path(path),
                          compile_seconds=time.perf_counter() - start)


def write_entry(path: Path, compiled: CompiledKernel) -> None:
    """Store ``compiled`` as entry file ``path``, atomically: a reader sees the whole entry or
    none.  Raises ``OSError`` when it cannot."""
    write_file_atomically(path, _encode_entry(compiled))


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk and rename it over
    ``path``; raises ``OSError`` (leaving nothing behind) when it cannot."""
    temp_name: str | None = None
    try:
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as temp:
            os.fchmod(temp.fileno(), 0o644)  # mkstemp makes the file private; cubins are no secret
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(temp_name, path)
    except OSError:
        if temp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp_name)
        raise


def _read_cache_entry(path: Path, kernel_name: str, arch: str) -> CompiledKernel | None:
    """The cache's entry, or None on a miss; a corrupt entry is deleted."""
    try:
        return read_entry(path, kernel_name, arch)
    except FileNotFoundError:
        return None
    except OSError as err:
        _warn_cache_unusable(path.parent, err)
        return None
    except CorruptEntryError as err:
        logger.warning("discarding corrupt cache entry %s: %s", path, err)
        with contextlib.suppress(OSError):  # a read-only cache keeps it; the compile still happens
            path.unlink(missing_ok=True)
        return None


def _write_cache_entry(path: Path, compiled: CompiledKernel) -> bool:
    """:func:`write_entry`; False (with a warning) when the cache is not writable."""
    try:
        write_entry(path, compiled)
        return True
    except OSError as err:
        _warn_cache_unusable(path.parent, err)
        return False


@contextlib.contextmanager
def _key_lock(path: Path) -> Iterator[bool]:
    """Holds the entry's lock file; yields False, having warned, when the cache is not writable."""
    lock = filelock.FileLock(path.with_suffix(".lock"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        locked = True
    except OSError as err:
        _warn_cache_unusable(path.parent, err)
        locked = False
    try:
        yield locked
    finally:
        if locked:
            lock.release()


_unusable_cache_dirs: set[Path] = set()
_unusable_lock = threading.Lock()


def _warn_cache_unusable(cache_dir: Path, err: OSError) -> None:
    with _unusable_lock:
        if cache_dir in _unusable_cache_dirs:
            return
        _unusable_cache_dirs.add(cache_dir)
    reason = f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    logger.warning("cubin cache %s is not usable (%s); compiling without it", cache_dir, reason)


def cache_entries(cache_dir: Path | None = None) -> list[Path]:
    """The entry files in ``cache_dir`` (default: :func:`default_cache_dir`)."""
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.iterdir() if _CACHE_FILE_RE.fullmatch(path.name)
                  and path.suffix == _ENTRY_SUFFIX)


def clear_cache(cache_dir: Path | None = None) -> int:
    """Delete the entries, lock and temporary files of ``cache_dir``; returns how many entries went.

    Other files in the folder are left alone, so a mistaken ``cache_dir`` loses nothing else.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not directory.is_dir():
        return 0
    removed = 0
    for path in directory.iterdir():
        if _CACHE_FILE_RE.fullmatch(path.name):
            path.unlink(missing_ok=True)
            removed += path.suffix == _ENTRY_SUFFIX
    return removed


# ---- SASS ----

def disassemble(cubin: bytes) -> str:
    """The SASS of ``cubin``, as ``cuobjdump -sass`` prints it."""
    cuobjdump = _find_tool("cuobjdump", "nvidia-cuda-cuobjdump")
    nvdisasm = _find_tool("nvdisasm", "nvidia-cuda-nvdisasm")
    # cuobjdump runs nvdisasm, which it looks up on PATH.
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(nvdisasm), os.environ.get("PATH", "")])}
    with tempfile.TemporaryDirectory(prefix="xqagen-sass-") as temp_dir:
        cubin_path = os.path.join(temp_dir, "kernel.cubin")
        with open(cubin_path, "wb") as file:
            file.write(cubin)
        result = subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass failed (exit {result.returncode}): "
                           f"{result.stderr.decode(errors='replace').strip()}")
    return result.stdout.decode(errors="replace")


def _find_tool(name: str, package: str) -> str:
    path = find_nvidia_binary_utility(name) or _installed_file(package, name) or shutil.which(name)
    if path is None:
        raise ToolNotFoundError(f"{name} not found: pip install {package}")
    return path


def _installed_file(package: str, filename: str) -> str | None:
    """``filename`` from the files of pip package ``package`` (cuda-pathfinder before 1.8.1
    does not look in the CUDA 13 wheels' ``nvidia/cu13/bin``)."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((str(file.locate()) for file in files if file.name == filename), None)
