"""Where a variant's cubin comes from: cubin stores, the cache, or NVRTC (:func:`load_cubin`).

Which cubins run on a GPU
-------------------------
A cubin for ``sm_XY`` runs on GPUs of compute capability X.Z with Z >= Y (same major version); one
for an arch-specific target ``sm_XYa`` only on X.Y; one for a family target ``sm_XYf`` on X.Z with
Z >= Y.  :func:`compatible_targets` lists the targets whose cubins run on a GPU, best first (its own
minor version first, and at one version ``a``, then ``f``, then the plain target).
:func:`candidate_targets` puts the target that the variant's path compiles for that GPU
(``KernelPath.target_arch``) first and keeps the others the path can build
(``KernelPath.unsupported_target``).  :func:`load_cubin` uses the first candidate that a store or
the cache holds and compiles the first only when none does.  So an sm_86 or sm_89 GPU runs a
prebuilt sm_80 cubin (sm_89's hardware fp8 conversion needs an sm_89 build: ``--arch sm_89``), an
sm_90 GPU an sm_90 or sm_90a one, and an sm_120 GPU, which runs no sm_80 or sm_90 code, its own.

Cubin stores
------------
A store is a folder of cache entries (:mod:`xqagen.compiler`: the same files under the same keys,
which hold the source, options, arch and toolchain versions, not install paths) with a
``manifest.json``::

    {"format": 1, "xqagen": "0.1.0", "toolchain": {"nvrtc": [13, 0], "packages": {...}},
     "entries": {"<key>": {"kernel_name": "...", "arch": "sm_80"}, ...}}

``xqagen build --out DIR`` writes one (:func:`write_store`); the runtime only reads them.  It
searches, in this order: the folders in ``$XQAGEN_CUBIN_DIR`` (separated by ``os.pathsep``), the
stores of installed cubin packages, then the cubin cache.  A cubin package is any installed
distribution that declares an entry point in the group ``xqagen.cubin_stores`` whose object is
its store's folder (a ``str`` or ``os.PathLike``)::

    [project.entry-points."xqagen.cubin_stores"]
    my-model = "my_model_cubins:STORE_DIR"   # STORE_DIR = os.path.join(os.path.dirname(__file__), "store")

A store serves processes with the toolchain it was built with (the keys hold its versions).
``XQAGEN_DISABLE_JIT=1`` makes a cubin that no store and not the cache holds an error
(:class:`MissingCubinError`) rather than a compile.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xqagen

from . import compiler
from .compiler import CompiledKernel
from .emitters import EmittedKernel, KernelPath, path_of

__all__ = ["DISABLE_JIT_VARIABLE", "ENTRY_POINT_GROUP", "MANIFEST", "STORE_DIR_VARIABLE", "CubinStore",
           "MissingCubinError", "StoreError", "candidate_targets", "check_store_target", "compatible_targets",
           "cubin_stores", "jit_disabled", "load_cubin", "open_store", "write_store"]

logger = logging.getLogger(__name__)

STORE_DIR_VARIABLE = "XQAGEN_CUBIN_DIR"
DISABLE_JIT_VARIABLE = "XQAGEN_DISABLE_JIT"
ENTRY_POINT_GROUP = "xqagen.cubin_stores"
MANIFEST = "manifest.json"
#: Bump when the manifest's meaning changes; a store of another format is not read.
STORE_FORMAT = 1

_DEVICE_ARCH_RE = re.compile(r"sm_(?P<major>\d+)(?P<minor>\d)")


class MissingCubinError(RuntimeError):
    """JIT compilation is disabled and no store nor the cache holds a cubin that runs on the GPU."""


class StoreError(ValueError):
    """A folder that is not a cubin store, or a store that cannot take the cubins given."""


# ---- which cubins run on a GPU ----

def compatible_targets(device_arch: str) -> tuple[str, ...]:
    """The cubin targets whose code runs on a GPU of ``device_arch`` (``sm_89``, ``sm_100``, ...),
    best first: ``sm_89, sm_88, ..., sm_80``; ``sm_90a, sm_90``; ``sm_103a, sm_103f, sm_103,
    sm_102f, sm_102, ...``."""
    match = _DEVICE_ARCH_RE.fullmatch(device_arch)
    if not match:
        raise ValueError(f"device_arch {device_arch!r} is not a GPU's sm_<major><minor>")
    major, minor = match["major"], int(match["minor"])
    targets = []
    for older in range(minor, -1, -1):
        number = int(f"{major}{older}")
        # An arch-specific cubin runs on its own GPU only; family and plain ones on later minors too.
        suffixes = ("a", "f", "") if older == minor else ("f", "")
        targets += [f"sm_{number}{suffix}" for suffix in suffixes if number >= compiler.TARGET_SUFFIXES[suffix]]
    return tuple(targets)


def candidate_targets(path: KernelPath, device_arch: str) -> tuple[str, ...]:
    """The targets whose cubins of ``path`` may run on a GPU of ``device_arch``, in the order the
    runtime looks for them: the one the path compiles for that GPU, then the other compatible
    targets the path can build, best first.  Empty where the path's kernels cannot run there."""
    own = path.target_arch(device_arch)
    if own is None:
        return ()
    return tuple(dict.fromkeys([own, *(target for target in compatible_targets(device_arch)
                                       if path.unsupported_target(target) is None)]))


# ---- stores ----

@dataclass(frozen=True)
class CubinStore:
    """An opened store: its folder, the toolchain it was built with and its entries' keys."""

    path: Path
    origin: str  # where it is configured: the variable, or the package and entry point
    toolchain: Mapping[str, Any]
    entries: Mapping[str, Mapping[str, str]]  # key -> {"kernel_name", "arch"}

    def get(self, key: str, kernel_name: str, arch: str) -> CompiledKernel | None:
        """The entry ``key``, or None where the store has none or it is unreadable or corrupt
        (reported once; a store is never changed)."""
        if key not in self.entries:
            return None
        entry = compiler.entry_path(key, self.path)
        try:
            return compiler.read_entry(entry, kernel_name, arch)
        except (OSError, compiler.CorruptEntryError) as err:
            _warn_once(entry, "cubin store entry %s is unusable (%s); skipped", entry, err)
            return None


def open_store(directory: Path, origin: str = "") -> CubinStore:
    """The store in ``directory``; :class:`StoreError` where it has no readable manifest of this
    format."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_bytes())
        store_format, toolchain, entries = manifest["format"], manifest["toolchain"], manifest["entries"]
    except FileNotFoundError:
        raise StoreError(f"{directory} is not a cubin store (no {MANIFEST})") from None
    except OSError as err:
        raise StoreError(f"{directory}: cannot read its {MANIFEST} ({err.strerror or err})") from None
    except (ValueError, TypeError, KeyError) as err:
        raise StoreError(f"{directory}: unreadable {MANIFEST} ({type(err).__name__})") from None
    if store_format != STORE_FORMAT or not isinstance(toolchain, dict) or not isinstance(entries, dict):
        raise StoreError(f"{directory}: not a cubin store of format {STORE_FORMAT} (format {store_format!r})")
    return CubinStore(directory, origin, toolchain, entries)


def cubin_stores() -> list[CubinStore]:
    """The stores the runtime searches, in order: ``$XQAGEN_CUBIN_DIR``'s folders, then those of
    installed cubin packages.  One that cannot be opened is reported once and left out."""
    locations = [(Path(item), STORE_DIR_VARIABLE) for item in
                 os.environ.get(STORE_DIR_VARIABLE, "").split(os.pathsep) if item]
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        origin = f"{ENTRY_POINT_GROUP} entry point {entry_point.name!r} ({entry_point.value})"
        try:
            folder = entry_point.load()
            locations.append((Path(os.fspath(folder)), origin))
        except Exception as err:  # noqa: BLE001  (a broken package must not stop the others)
            _warn_once(origin, "%s does not name a cubin store folder (%s: %s); skipped",
                       origin, type(err).__name__, err)
    stores, seen = [], set()
    for directory, origin in locations:
        if directory.resolve() in seen:  # a package seen twice on sys.path
            continue
        seen.add(directory.resolve())
        try:
            stores.append(open_store(directory, origin))
        except StoreError as err:
            _warn_once(directory, "%s (from %s); skipped", err, origin)
    return stores


def write_store(directory: Path, kernels: Iterable[tuple[str, CompiledKernel]]) -> int:
    """Add ``(key, kernel)`` pairs (keys from :func:`xqagen.compiler.cache_key`) to the store in
    ``directory``, which is made where it is missing or empty; returns the entries it then holds.

    Raises :class:`StoreError` where ``directory`` is neither empty nor a store, or is a store of
    another toolchain, and ``OSError`` where it cannot be written.  The manifest is written last,
    atomically: a reader sees the old store or the new one."""
    directory = Path(directory)
    entries = dict(check_store_target(directory))
    directory.mkdir(parents=True, exist_ok=True)
    for key, kernel in kernels:
        compiler.write_entry(compiler.entry_path(key, directory), kernel)
        entries[key] = {"kernel_name": kernel.kernel_name, "arch": kernel.arch}
    manifest = {"format": STORE_FORMAT, "xqagen": xqagen.__version__, "toolchain": compiler.toolchain(),
                "entries": dict(sorted(entries.items()))}
    compiler.write_file_atomically(directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return len(entries)


def check_store_target(directory: Path) -> Mapping[str, Mapping[str, str]]:
    """The entries of the store :func:`write_store` would add to in ``directory`` (none for a
    missing or empty folder); raises :class:`StoreError` where it would refuse."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        store = open_store(directory)
        if store.toolchain != compiler.toolchain():
            raise StoreError(f"{directory} holds cubins of another toolchain "
                             f"({_toolchain_difference(store.toolchain)}); write to an empty folder")
        return store.entries
    if directory.is_dir() and any(directory.iterdir()):
        raise StoreError(f"{directory} is neither empty nor a cubin store (no {MANIFEST})")
    if directory.exists() and not directory.is_dir():
        raise StoreError(f"{directory} is not a folder")
    return {}


def _toolchain_difference(other: Mapping[str, Any]) -> str:
    """What differs between toolchain ``other`` and this process's, as ``name theirs against ours here``."""
    here = compiler.toolchain()
    pairs = [("nvrtc", other.get("nvrtc"), here["nvrtc"])]
    packages = other.get("packages", {})
    pairs += [(name, packages.get(name), version) for name, version in here["packages"].items()]

    def text(version: Any) -> str:
        return ".".join(map(str, version)) if isinstance(version, list) else str(version)

    return ", ".join(f"{name} {text(theirs)} against {text(ours)} here" for name, theirs, ours in pairs
                     if theirs != ours)


_warned: set[Any] = set()
_warned_lock = threading.Lock()


def _warn_once(subject: Any, message: str, *args: Any) -> None:
    with _warned_lock:
        if subject in _warned:
            return
        _warned.add(subject)
    logger.warning(message, *args)


# ---- the lookup ----

def jit_disabled() -> bool:
    """Whether ``$XQAGEN_DISABLE_JIT`` is ``1`` (unset or ``0``: compiling is allowed)."""
    value = os.environ.get(DISABLE_JIT_VARIABLE, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{DISABLE_JIT_VARIABLE}={value!r}: expected 1 (never compile) or 0")
    return value == "1"


def load_cubin(kernel: EmittedKernel, device_arch: str, *, cache_dir: Path | None = None) -> CompiledKernel:
    """The cubin to launch ``kernel`` with on a GPU of ``device_arch``: for each of
    :func:`candidate_targets` in turn, from the first store (:func:`cubin_stores`) or the cache
    (``cache_dir``, default :func:`xqagen.compiler.default_cache_dir`) that holds it; else compiled
    for the first candidate (and cached).

    Raises :class:`MissingCubinError` instead of compiling when ``$XQAGEN_DISABLE_JIT`` is 1, and
    ``ValueError`` where the kernel's path has no target for ``device_arch``."""
    path = path_of(kernel.spec)
    supported = set(compiler.supported_archs())
    # A store or cache entry of a target this NVRTC does not know would have another key.
    targets = [target for target in candidate_targets(path, device_arch) if target.rstrip("af") in supported]
    if not targets:
        raise ValueError(f"device_arch {device_arch!r}: the {path.name} path has no target for it that "
                         f"NVRTC {'.'.join(map(str, compiler.nvrtc_version()))} builds")
    stores = cubin_stores()
    for arch in targets:
        key = compiler.cache_key(kernel.source, kernel.kernel_name, arch)
        for store in stores:
            if (found := store.get(key, kernel.kernel_name, arch)) is not None:
                return found
        if (found := compiler.cached_kernel(key, kernel.kernel_name, arch, cache_dir=cache_dir)) is not None:
            return found
    if jit_disabled():
        raise MissingCubinError(_describe_miss(kernel, device_arch, targets, stores, cache_dir))
    return compiler.compile_kernel(kernel.source, kernel.kernel_name, targets[0], cache_dir=cache_dir)


def _describe_miss(kernel: EmittedKernel, device_arch: str, targets: list[str], stores: list[CubinStore],
                   cache_dir: Path | None) -> str:
    cache = cache_dir if cache_dir is not None else compiler.default_cache_dir()
    searched = (f"the cubin stores {', '.join(str(store.path) for store in stores)} and the cache {cache}" if stores
                else f"the cache {cache} (no cubin store: set {STORE_DIR_VARIABLE} or install a cubin package)")
    message = (f"no cubin of variant {kernel.spec.name} for {device_arch} (targets {', '.join(targets)}) in "
               f"{searched}, and {DISABLE_JIT_VARIABLE}=1 forbids compiling it; build it ahead of time with "
               f"`xqagen build RECIPE --arch {targets[0]} --out DIR` and add DIR to {STORE_DIR_VARIABLE}")
    others = [f"{store.path} was built with another toolchain: {_toolchain_difference(store.toolchain)}"
              for store in stores if store.toolchain != compiler.toolchain()]
    return "; ".join([message, *others])
