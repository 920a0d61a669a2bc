"""The last step of a decode call: load a variant's cubin once per device, bind a launch, launch it
on torch's current stream.

The launch path does no host synchronisation and no allocation: the kernel's parameters are packed
once (by the variant's path) and each launch is one ``cuLaunchKernelEx``, called through ctypes on a
launch configuration built once (cuda-python's wrapper costs microseconds per call), so launches
can be captured in CUDA graphs.  A bound launch may have its pointers rewritten between launches
(:attr:`BoundLaunch.words`, then :meth:`BoundLaunch.refresh`): a plan serves every layer of a step.
Grid, block and shared memory come from the path (``xqagen.emitters``); validation and planning
happen before, in :mod:`xqagen.problem` and :mod:`xqagen.plan`.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from pathlib import Path

from ._torch import torch
from cuda.bindings import driver

from .cubins import load_cubin
from .emitters import EmittedKernel, WorkspaceSize, path_of
from .emitters.params import PARAMS, KernelParams
from .spec import KernelSpec


class LaunchError(RuntimeError):
    """A CUDA driver call failed while loading or launching a kernel."""


def _check(result):
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise LaunchError(f"CUDA driver error {name.decode() if name else err}")
    return values[0] if len(values) == 1 else values


def device_arch(device: torch.device) -> str:
    major, minor = _capability(device_index(device))  # asked once per device: every prepared call dispatches on it
    return f"sm_{major}{minor}"


def load_function(cubin: bytes, kernel_name: str, device_index: int, *, dynamic_smem_bytes: int = 0,
                  smem_carveout: int | None = None) -> tuple[driver.CUlibrary, driver.CUfunction]:
    """Load a CUBIN and return (library, function) of ``kernel_name`` in the primary context of
    device ``device_index`` (the one torch uses), allowing that much dynamic shared memory and
    preferring that percentage of the unified L1/shared memory as shared memory (None: no preference)."""
    _check(driver.cuInit(0))
    library = _check(driver.cuLibraryLoadData(cubin, None, None, 0, None, None, 0))
    kernel = _check(driver.cuLibraryGetKernel(library, kernel_name.encode()))
    attributes = driver.CUfunction_attribute
    for attribute, value in ((attributes.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic_smem_bytes or None),
                             (attributes.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, smem_carveout)):
        if value is not None:
            _check(driver.cuKernelSetAttribute(attribute, value, kernel, _check(driver.cuDeviceGet(device_index))))
    with torch.cuda.device(device_index):
        torch.cuda.current_stream()  # makes the device's primary context current on this thread
        function = _check(driver.cuKernelGetFunction(kernel))
    return library, function


@dataclass
class _Loaded:
    library: driver.CUlibrary
    function: driver.CUfunction


def fault_word_offset(semaphores: torch.Tensor) -> int | None:
    """Where a semaphore buffer's fault word is, its last int32, in bytes from the buffer's start
    (None for a buffer too small to hold one: faults are then not recorded)."""
    words = semaphores.numel() * semaphores.element_size() // 4
    return 4 * (words - 1) if words else None


def fault_word_address(semaphores: torch.Tensor) -> int:
    """The address of a semaphore buffer's fault word (0: not recorded)."""
    offset = fault_word_offset(semaphores)
    return 0 if offset is None else semaphores.data_ptr() + offset


class Workspace:
    """Split-KV scratch (fp32 partials), semaphores and the fault word, for one device.

    The semaphores start at zero and every launch leaves them at zero (the last CTA of each
    output tile resets its own), so a workspace serves any number of launches and graph replays,
    one stream at a time.  A launch that would need more scratch than the workspace holds uses
    fewer splits rather than allocating.

    The fault word (the semaphore buffer's last int32) collects ``FAULT_*`` bits
    (``xqagen.emitters.params``): kernels set them when a length or a page index would have read
    outside the page table or the KV pool, and read nothing there instead.  Nothing on the launch
    path reads it; check it off the hot path, e.g. ``flag = workspace.faults.to("cpu",
    non_blocking=True)`` into pinned memory and read after the step's event, or :meth:`fault_bits`
    (a sync), and clear it with :meth:`clear_faults`.
    """

    def __init__(self, scratch: torch.Tensor, semaphores: torch.Tensor):
        """Wrap buffers (any dtype, contiguous, one device); semaphores must be zero initially."""
        raw = scratch.reshape(-1).view(torch.uint8)
        self.device = scratch.device
        self.scratch = raw[: raw.numel() // 4 * 4].view(torch.float32)
        self.buffer = semaphores  # as given: the op takes it whole
        words = semaphores.reshape(-1).view(torch.int32)
        self.semaphores, self.faults = words[:-1], words[-1:]

    @property
    def faults_ptr(self) -> int:
        """The fault word's address; 0 (not recorded) for an empty semaphore buffer."""
        return fault_word_address(self.buffer)

    @property
    def size(self) -> WorkspaceSize:
        return WorkspaceSize(self.scratch.numel(), self.semaphores.numel())

    def fault_bits(self) -> int:
        """The fault word (0: no fault since the last clear); waits for the device."""
        return int(self.faults.item())

    def clear_faults(self) -> None:
        self.faults.zero_()

    @classmethod
    def allocate(cls, device: torch.device | str | int, scratch_bytes: int = 64 << 20,
                 num_semaphores: int = 1 << 16) -> "Workspace":
        device = torch.device(device)
        return cls(torch.empty(scratch_bytes, dtype=torch.uint8, device=device),
                   torch.zeros(num_semaphores, dtype=torch.int32, device=device))


_default_workspaces: dict[torch.device, Workspace] = {}


def default_workspace(device: torch.device) -> Workspace:
    ws = _default_workspaces.get(device)
    if ws is None:
        ws = _default_workspaces[device] = Workspace.allocate(device)
    return ws


class DecodeKernel:
    """Launch handle of one KernelSpec: finds its cubin (a store, the cache or NVRTC:
    :func:`xqagen.cubins.load_cubin`) and loads it lazily per device."""

    def __init__(self, spec: KernelSpec, *, cache_dir: Path | None = None):
        self.spec = spec
        self.path = path_of(spec)
        self.emitted: EmittedKernel = self.path.emit(spec)
        self._cache_dir = cache_dir
        self._loaded: dict[int, _Loaded] = {}
        self._lock = threading.Lock()

    def load(self, device: torch.device) -> _Loaded:
        index = device_index(device)
        loaded = self._loaded.get(index)
        if loaded is not None:
            return loaded
        with self._lock:
            if index not in self._loaded:
                self._loaded[index] = self._load(index)
        return self._loaded[index]

    def _load(self, index: int) -> _Loaded:
        device = torch.device("cuda", index)
        arch = device_arch(device)
        if self.path.target_arch(arch) is None:
            raise LaunchError(f"the {self.path.name} path's kernels do not run on {torch.cuda.get_device_name(device)} "
                              f"({arch})")
        compiled = load_cubin(self.emitted, arch, cache_dir=self._cache_dir)
        library, function = load_function(compiled.cubin, self.emitted.kernel_name, index,
                                          dynamic_smem_bytes=self.emitted.smem_bytes,
                                          smem_carveout=self.emitted.smem_carveout)
        return _Loaded(library, function)

    def bind(self, params: tuple, *, batch: int, num_kv_heads: int, num_splits: int, device: torch.device,
             pdl: bool = False) -> "BoundLaunch":
        """A ready-to-launch call with the kernel's packed parameters (the path's ``pack``);
        arguments must already be validated.  ``pdl``: launch with programmatic dependent launch
        (sm_90+)."""
        return BoundLaunch(self, params, self.path.grid(self.spec, batch, num_kv_heads, num_splits), device, pdl=pdl)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device) -> int:
    """The GPU's SM count, asked once per device (the query costs microseconds)."""
    return _sm_count(device_index(device))


def supports_pdl(device: torch.device) -> bool:
    """Programmatic dependent launch needs sm_90 or newer."""
    return _capability(device_index(device))[0] >= 9


# The driver's launch configuration (cuda.h, CUDA 12 and 13): seven unsigned ints, the stream, the
# attribute array and its length; an attribute is its 4-byte id, padding, and a 64-byte value union.
class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("value", ctypes.c_uint8 * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3), ("shared_mem_bytes", ctypes.c_uint32),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint32)]


_PROGRAMMATIC_STREAM_SERIALIZATION = int(
    driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)


@functools.lru_cache(maxsize=None)
def _launch_kernel_ex():
    """``cuLaunchKernelEx(config, function, params, extra)``, without ``argtypes``: converting four
    arguments through them costs about half a microsecond per launch, so every caller passes ctypes
    objects that are pointers already (a bare int would go as a C int)."""
    function = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    function.restype = ctypes.c_int
    return function


#: The parameter struct's pointer fields (emitters.params), in declaration order: the ones a bound
#: launch may rewrite between launches.
POINTER_FIELDS: tuple[str, ...] = tuple(name for name, _, ctype in PARAMS if ctype is ctypes.c_void_p)


#: Each pointer field's index in the parameter struct read as 64-bit words (:attr:`BoundLaunch.words`;
#: a pointer is 8-byte aligned in the struct).
POINTER_WORDS: dict[str, int] = {name: getattr(KernelParams, name).offset // 8 for name in POINTER_FIELDS}


class BoundLaunch:
    """One kernel, grid and parameter struct with everything the launch needs resolved once, so a
    repeated launch costs one driver call (and reading torch's current stream).

    With ``pdl``, launches carry the programmatic-stream-serialization attribute: the kernel may
    begin while the previous kernel on the stream finishes, and waits (``griddepcontrol.wait``)
    for that kernel's writes before it touches memory."""

    def __init__(self, kernel: DecodeKernel, params: tuple, grid: tuple[int, int, int],
                 device: torch.device, *, pdl: bool = False):
        self.device = device
        self._index = device_index(device)
        self.params = params  # kept alive: the driver reads them through the pointer array below
        self._param_ptrs = (ctypes.c_void_p * len(params))(*map(ctypes.addressof, params))  # kept alive likewise
        # The path's parameter struct (it comes first) as 64-bit words: a caller rewrites a pointer
        # field with one store at its POINTER_WORDS index, cheaper than packing every field anew.
        self.words = memoryview(params[0]).cast("B").cast("Q")
        self._function = ctypes.c_void_p(int(kernel.load(device).function))
        self._refresh = kernel.path.refresh if len(params) > 1 else None
        self._attribute = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        self._attribute.value[0] = 1  # programmaticStreamSerializationAllowed, the union's first int
        self._config = _LaunchConfig(grid=grid, block=(kernel.emitted.threads, 1, 1),
                                     shared_mem_bytes=kernel.emitted.smem_bytes,
                                     attrs=ctypes.pointer(self._attribute), num_attrs=int(pdl))
        self._config_ref = ctypes.byref(self._config)
        self._stream_handle = 0  # the stream the config holds (0: the legacy default stream)
        self._launch = _launch_kernel_ex()
        # torch's current stream as a handle, without building a Stream object (as Inductor reads it)
        self._raw_stream = torch._C._cuda_getCurrentRawStream

    def refresh(self) -> None:
        """Bring what the path derives from the pointer fields (a Hopper launch's tensor maps) up to
        date after pointers were rewritten in :attr:`words`; the next launch reads them.  Strides,
        sizes and scales stay as bound."""
        if self._refresh is not None:
            self._refresh(self.params)

    def native_description(self) -> list[int]:
        """Where this launch's state lives, for the C++ op (xqagen/csrc/decode_op.cpp, which holds
        the order): the parameter struct, the launch configuration and its stream field's offset,
        the function, the parameter pointer array, and a Hopper launch's two tensor maps with the
        addresses they point at (zeros without).  Valid while this object lives."""
        maps = [(ctypes.addressof(m), m.address) for m in self.params[1:3]] or [(0, 0), (0, 0)]
        return [ctypes.addressof(self.params[0]), ctypes.addressof(self._config), _LaunchConfig.stream.offset,
                self._function.value, ctypes.addressof(self._param_ptrs), maps[0][0], maps[1][0], maps[0][1],
                maps[1][1]]

    def __call__(self, stream: torch.cuda.Stream | None = None) -> None:
        handle = self._raw_stream(self._index) if stream is None else stream.cuda_stream
        if handle != self._stream_handle:
            self._stream_handle = handle
            self._config.stream = handle
        err = self._launch(self._config_ref, self._function, self._param_ptrs, None)
        if err:
            _check(driver.CUresult(err))


_handles: dict[tuple[KernelSpec, Path | None], DecodeKernel] = {}
_handles_lock = threading.Lock()


def get_kernel(spec: KernelSpec, *, cache_dir: Path | None = None) -> DecodeKernel:
    """The process-wide handle of a spec (emitted and compiled once)."""
    key = (spec, cache_dir)
    handle = _handles.get(key)
    if handle is None:
        with _handles_lock:
            handle = _handles.setdefault(key, DecodeKernel(spec, cache_dir=cache_dir))
    return handle
