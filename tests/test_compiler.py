"""NVRTC compilation, the cubin cache and compile diagnostics (CPU only: NVRTC needs no GPU).

A CuTe compile takes about 5 s on a small machine, so the CuTe kernels are compiled once per
module; cache and error handling use a kernel without includes, which compiles in milliseconds.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import multiprocessing
import os
import pickle
import re
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from xqagen import compiler
from xqagen.compiler import CompiledKernel, CompileError, ToolNotFoundError, compile_kernel, disassemble

# One warp computes D(16x8) = A(16x16) . B(8x16)^T in bf16 with fp32 accumulation; each lane's
# fragments are rows of small row-major CuTe tensors over global memory.
PROBE_SOURCE = r"""#include <cute/tensor.hpp>
#include <cute/arch/mma_sm80.hpp>

using namespace cute;

extern "C" __global__ void mma_probe(const uint32_t* a, const uint32_t* b, float* d) {
  const int lane = threadIdx.x;
  Tensor ga = make_tensor(make_gmem_ptr(a), make_layout(make_shape(Int<32>{}, Int<4>{}), LayoutRight{}));
  Tensor gb = make_tensor(make_gmem_ptr(b), make_layout(make_shape(Int<32>{}, Int<2>{}), LayoutRight{}));
  Tensor gd = make_tensor(make_gmem_ptr(d), make_layout(make_shape(Int<32>{}, Int<4>{}), LayoutRight{}));
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  SM80_16x8x16_F32BF16BF16F32_TN::fma(acc[0], acc[1], acc[2], acc[3],
                                      ga(lane, 0), ga(lane, 1), ga(lane, 2), ga(lane, 3),
                                      gb(lane, 0), gb(lane, 1),
                                      acc[0], acc[1], acc[2], acc[3]);
  CUTE_UNROLL
  for (int i = 0; i < 4; ++i) { gd(lane, i) = acc[i]; }
}
"""

TINY_SOURCE = 'extern "C" __global__ void tiny(int* out) { out[threadIdx.x] = threadIdx.x * 3; }\n'


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("probe-cache")


@pytest.fixture(scope="module")
def probe_sm80(probe_cache: Path) -> CompiledKernel:
    return compile_kernel(PROBE_SOURCE, "mma_probe", "sm_80", cache_dir=probe_cache)


@pytest.fixture(scope="module")
def probe_sm90a(probe_cache: Path) -> CompiledKernel:
    return compile_kernel(PROBE_SOURCE, "mma_probe", "sm_90a", cache_dir=probe_cache)


@pytest.fixture(params=["probe_sm80", "probe_sm90a"])
def probe(request: pytest.FixtureRequest) -> CompiledKernel:
    return request.getfixturevalue(request.param)


# ---- toolchain ----

def test_include_dirs_hold_cute_cccl_and_the_cuda_runtime():
    dirs = [Path(path) for path in compiler.include_dirs()]
    assert all(path.is_absolute() and path.is_dir() for path in dirs)
    # CUTLASS includes <cccl/cuda/std/...> with CUDA 13, <cuda/std/...> with CUDA 12.
    cccl_headers = ["cccl/cuda/std/cstdint"] if compiler.nvrtc_version() >= (13, 0) else []
    for header in ("cute/tensor.hpp", *cccl_headers, "cuda/std/cstdint", "cuda_runtime.h"):
        assert any((path / header).is_file() for path in dirs), header


def test_nvrtc_version_can_emit_cubins_for_hopper():
    assert compiler.nvrtc_version() >= (12, 8)


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XQAGEN_CACHE_DIR", str(tmp_path / "mine"))
    assert compiler.default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("XQAGEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiler.default_cache_dir() == tmp_path / "xdg" / "xqagen"


# ---- real CuTe compiles ----

def test_cute_kernel_compiles_to_a_cubin(probe: CompiledKernel):
    assert probe.cubin.startswith(b"\x7fELF")
    assert not probe.cache_hit
    assert probe.path is not None and probe.path.is_file()
    assert f"Compiling entry function 'mma_probe' for '{probe.arch}'" in probe.log
    resources = probe.resources
    assert resources.registers > 0
    assert (resources.spill_stores, resources.spill_loads, resources.stack_bytes) == (0, 0, 0)


def test_sass_shows_the_tensor_core_mma(probe: CompiledKernel):
    sass = disassemble(probe.cubin)
    assert "Function : mma_probe" in sass
    assert "HMMA.16816.F32.BF16" in sass


def test_second_compile_is_a_fast_cache_hit(probe_sm80: CompiledKernel, probe_cache: Path):
    start = time.perf_counter()
    again = compile_kernel(PROBE_SOURCE, "mma_probe", "sm_80", cache_dir=probe_cache)
    elapsed = time.perf_counter() - start
    assert again.cache_hit
    assert elapsed < 0.1 and again.compile_seconds < 0.1
    assert (again.cubin, again.resources, again.log, again.path) == (
        probe_sm80.cubin, probe_sm80.resources, probe_sm80.log, probe_sm80.path)


def test_arches_get_separate_entries(probe_sm80: CompiledKernel, probe_sm90a: CompiledKernel):
    assert probe_sm80.path != probe_sm90a.path
    assert probe_sm80.cubin != probe_sm90a.cubin


def test_errors_in_cutlass_headers_quote_the_instantiating_generated_lines(tmp_path):
    source = PROBE_SOURCE.replace("gd(lane, i) = acc[i];", "gd(lane, i) = acc[i] + size<5>(ga.layout());")
    bad_line = next(number for number, line in enumerate(source.splitlines(), 1) if "size<5>" in line)
    with pytest.raises(CompileError) as caught:
        compile_kernel(source, "mma_probe", "sm_80", cache_dir=tmp_path)
    message = str(caught.value)
    assert "cute/" in message and "static assertion failed" in message  # the log, from the header
    assert f"at line {bad_line} of mma_probe.cu" in message
    assert re.search(rf"^> {bad_line} \| .*size<5>\(ga\.layout\(\)\)", message, re.M)
    assert not compiler.cache_entries(tmp_path), "a failed compile leaves no cache entry"


def _compile_probe_twice_with_pch(cache_dir: Path) -> tuple[CompiledKernel, CompiledKernel]:
    """In a fresh process, so that its precompiled headers (hundreds of MB in /tmp) go with it."""
    first = compile_kernel(PROBE_SOURCE, "mma_probe", "sm_80", cache_dir=cache_dir, use_pch=True)
    variant = PROBE_SOURCE.replace("float acc[4] = {0.f, 0.f, 0.f, 0.f};", "float acc[4] = {1.f, 0.f, 0.f, 1.f};")
    second = compile_kernel(variant, "mma_probe", "sm_80", cache_dir=cache_dir, use_pch=True)
    return first, second


def test_precompiled_headers_speed_up_later_compiles_and_change_nothing(probe_sm80: CompiledKernel, tmp_path):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        first, second = pool.submit(_compile_probe_twice_with_pch, tmp_path).result()
    assert not first.cache_hit and not second.cache_hit
    assert first.cubin == probe_sm80.cubin and first.resources == probe_sm80.resources
    assert second.cubin != first.cubin
    assert second.compile_seconds < first.compile_seconds / 2, (first.compile_seconds, second.compile_seconds)
    assert "precompiled header" not in first.log + second.log


# ---- the cache ----

def test_ptx_for_a_virtual_architecture():
    from xqagen.compiler import compile_ptx

    ptx = compile_ptx(TINY_SOURCE, "tiny", "compute_80")
    assert b".target sm_80" in ptx and b".entry tiny" in ptx and ptx.endswith(b"\0")
    for arch in ("sm_80", "compute_7x", "compute_1"):
        with pytest.raises(ValueError, match=f"invalid arch '{arch}'"):
            compile_ptx(TINY_SOURCE, "tiny", arch)


def test_cache_key_covers_source_options_arch_and_name(cache_dir: Path):
    baseline = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    assert not baseline.cache_hit
    two_kernels = TINY_SOURCE + TINY_SOURCE.replace("tiny", "tiny2")
    variants = [
        compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir, options=["-DXQA_TEST_FLAG=1"]),
        compile_kernel(TINY_SOURCE, "tiny", "sm_86", cache_dir=cache_dir),
        compile_kernel(TINY_SOURCE.replace("* 3", "* 5"), "tiny", "sm_80", cache_dir=cache_dir),
        compile_kernel(two_kernels, "tiny", "sm_80", cache_dir=cache_dir),
        compile_kernel(two_kernels, "tiny2", "sm_80", cache_dir=cache_dir),
    ]
    assert not any(variant.cache_hit for variant in variants)
    assert len({baseline.path, *(variant.path for variant in variants)}) == 6
    again = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    assert again.cache_hit and again.path == baseline.path
    spaced = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir, options=[" -DXQA_TEST_FLAG=1 ", ""])
    assert spaced.cache_hit and spaced.path == variants[0].path


def test_cache_dir_defaults_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XQAGEN_CACHE_DIR", str(tmp_path / "from-env"))
    compiled = compile_kernel(TINY_SOURCE, "tiny", "sm_80")
    assert compiled.path is not None and compiled.path.parent == tmp_path / "from-env"


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_cubin_byte(data: bytes) -> bytes:
    return data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:]


def _bad_magic(data: bytes) -> bytes:
    return b"NOTMAGIC" + data[8:]


def _garbled_header(data: bytes) -> bytes:
    return data[:12] + b"\xff" + data[13:]  # the header's opening brace


def _extra_bytes(data: bytes) -> bytes:
    return data + b"\0" * 16


def _wrong_resources(data: bytes) -> bytes:
    return data.replace(b'"resources": {', b'"resources": {"bogus": 1, ', 1).replace(b'"registers"', b'"regs"', 1)


def _huge_header_size(data: bytes) -> bytes:
    return data[:8] + b"\xff\xff\xff\x7f" + data[12:]


@pytest.mark.parametrize("corrupt", [_truncate, _flip_cubin_byte, _bad_magic, _garbled_header, _extra_bytes,
                                     _wrong_resources, _huge_header_size, lambda data: b""],
                         ids=["truncated", "flipped", "magic", "header", "extra", "resources", "header-size", "empty"])
def test_corrupt_entries_are_reported_in_one_line_and_rebuilt(cache_dir: Path, corrupt, caplog):
    original = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    assert original.path is not None
    original.path.write_bytes(corrupt(original.path.read_bytes()))
    rebuilt = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    assert not rebuilt.cache_hit
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warning.startswith(f"discarding corrupt cache entry {original.path}: ")
    assert len(warning) < len(str(original.path)) + 100 and "\n" not in warning
    assert (rebuilt.cubin, rebuilt.resources) == (original.cubin, original.resources)
    assert compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir).cache_hit


def _compile_tiny_slowly(cache_dir: Path) -> tuple[bool, str, str]:
    """Compiles that take a second, so that without the key lock both processes would compile."""
    run_nvrtc = compiler._run_nvrtc

    def slow_run_nvrtc(*args, **kwargs):
        time.sleep(1.0)
        return run_nvrtc(*args, **kwargs)

    compiler._run_nvrtc = slow_run_nvrtc
    compiled = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    return compiled.cache_hit, hashlib.sha256(compiled.cubin).hexdigest(), str(compiled.path)


def test_two_processes_wanting_one_kernel_compile_it_once(cache_dir: Path):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)  # both workers are up before either looks at the cache
    with ProcessPoolExecutor(2, mp_context=context, initializer=barrier.wait) as pool:
        outcomes = list(pool.map(_compile_tiny_slowly, [cache_dir, cache_dir]))
    assert sorted(hit for hit, _, _ in outcomes) == [False, True], "one compiles, the other waits and loads it"
    assert outcomes[0][1:] == outcomes[1][1:]
    entry = Path(outcomes[0][2])
    assert compiler.cache_entries(cache_dir) == [entry]
    assert not list(cache_dir.glob(".*.tmp")), "no temporary files are left behind"
    again = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    assert again.cache_hit and hashlib.sha256(again.cubin).hexdigest() == outcomes[0][1]


def test_compiles_from_a_thread_pool(cache_dir: Path):
    sources = [TINY_SOURCE.replace("* 3", f"* {factor}") for factor in (3, 5, 7, 3, 5, 7)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda source: compile_kernel(source, "tiny", "sm_80", cache_dir=cache_dir), sources))
    assert [result.cubin for result in results[:3]] == [result.cubin for result in results[3:]]
    assert len(compiler.cache_entries(cache_dir)) == 3


def test_unwritable_cache_compiles_in_memory_with_one_warning(tmp_path, caplog):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    for source in (TINY_SOURCE, TINY_SOURCE.replace("* 3", "* 5")):
        compiled = compile_kernel(source, "tiny", "sm_80", cache_dir=blocker / "cache")
        assert compiled.cubin and compiled.path is None and not compiled.cache_hit
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"cubin cache {blocker / 'cache'} is not usable" in warnings[0], warnings


def test_full_cache_compiles_in_memory_with_one_warning(cache_dir: Path, monkeypatch, caplog):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(compiler.tempfile, "mkstemp", disk_full)
    for source in (TINY_SOURCE, TINY_SOURCE.replace("* 3", "* 5")):
        compiled = compile_kernel(source, "tiny", "sm_80", cache_dir=cache_dir)
        assert compiled.cubin and compiled.path is None
    assert caplog.text.count("is not usable (No space left on device)") == 1
    assert not compiler.cache_entries(cache_dir)


def test_corrupt_entry_in_a_read_only_cache_is_reported_and_compiled_around(cache_dir: Path, monkeypatch, caplog):
    original = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    original.path.write_bytes(original.path.read_bytes()[:40])

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(compiler.filelock.FileLock, "acquire", read_only)
    rebuilt = compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    assert rebuilt.cubin == original.cubin and rebuilt.path is None
    assert "discarding corrupt cache entry" in caplog.text and "is not usable (Permission denied)" in caplog.text


def test_cache_keys_do_not_depend_on_where_the_toolchain_is_installed(monkeypatch, tmp_path):
    keys = []
    for venv in ("venv-a", "venv-b"):
        site_packages = tmp_path / venv / "lib" / "python3.11" / "site-packages"
        dirs = (str(site_packages / "cutlass_library/source/include"), str(site_packages / "nvidia/cu13/include"))
        monkeypatch.setattr(compiler, "_include_dirs", lambda dirs=dirs: dirs)
        monkeypatch.setattr(compiler, "_site_roots", lambda root=site_packages: (root,))
        keys.append(compiler._cache_key(TINY_SOURCE, "tiny", "sm_80", compiler._nvrtc_options("sm_80", [])))
    assert keys[0] == keys[1]
    # Headers outside site-packages (a CUDA toolkit) are identified by their path.
    monkeypatch.setattr(compiler, "_include_dirs", lambda: ("/usr/local/cuda/include",))
    toolkit = compiler._cache_key(TINY_SOURCE, "tiny", "sm_80", compiler._nvrtc_options("sm_80", []))
    monkeypatch.setattr(compiler, "_include_dirs", lambda: ("/opt/cuda-13.0/include",))
    assert compiler._cache_key(TINY_SOURCE, "tiny", "sm_80", compiler._nvrtc_options("sm_80", [])) != toolkit


def test_compiles_are_logged_at_info(cache_dir: Path, caplog):
    caplog.set_level(logging.INFO, logger="xqagen")
    compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)
    compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir)  # a hit compiles nothing
    assert [record.name for record in caplog.records] == ["xqagen.compiler"]
    assert re.fullmatch(r"compiled tiny for sm_80 in \d+\.\d s", caplog.records[0].getMessage())


INTERNAL_SYMBOL_SOURCE = """namespace { __device__ int scale(int x) { return 3 * x; } }
extern "C" __global__ void internal(int* out) { out[threadIdx.x] = scale(threadIdx.x); }
"""


def test_recompiles_differ_only_in_internal_symbol_names(tmp_path):
    first, second = (compile_kernel(INTERNAL_SYMBOL_SOURCE, "internal", "sm_80", cache_dir=tmp_path / name,
                                    options=["-G"])  # keeps the callee a function of its own
                     for name in ("a", "b"))
    assert first.resources == second.resources

    def masked(cubin: bytes) -> str:
        return re.sub(r"_INTERNAL_[0-9a-f_]+", "_INTERNAL_", disassemble(cubin))

    assert masked(first.cubin) == masked(second.cubin)
    assert "_INTERNAL_" in masked(first.cubin)


# ---- resource usage ----

SMEM_SOURCE = """__device__ __noinline__ float pick(const float* values, int i) {
  float copy[64];
  for (int j = 0; j < 64; ++j) copy[j] = values[j];
  return copy[i & 63];
}
extern "C" __global__ void plain(float* p) { p[0] = pick(p, 3); }
extern "C" __global__ void with_smem(float* p) {
  __shared__ float tile[1024];
  tile[threadIdx.x] = p[threadIdx.x];
  __syncthreads();
  p[threadIdx.x] = tile[1023 - threadIdx.x];
}
"""


@pytest.mark.parametrize("kernel_name, shared_bytes", [("plain", 0), ("with_smem", 4096)])
def test_resources_are_those_of_the_named_entry_function(cache_dir: Path, kernel_name: str, shared_bytes: int):
    compiled = compile_kernel(SMEM_SOURCE, kernel_name, "sm_90a", cache_dir=cache_dir)
    assert "Function properties for _Z4pickPKfi" in compiled.log  # a callee's report sits in between
    assert compiled.resources.shared_bytes == shared_bytes
    assert compiled.resources.registers > 0


def test_kernel_without_c_linkage_is_reported(cache_dir: Path):
    with pytest.raises(CompileError, match=r"no ptxas report for entry function 'mangled'.*extern \"C\""):
        compile_kernel("__global__ void mangled(int* p) { p[0] = 1; }\n", "mangled", "sm_80", cache_dir=cache_dir)


# ---- diagnostics and validation ----

BROKEN_SOURCE = """extern "C" __global__ void broken(int* out) {
  int a = 1;
  int b = 2;
  int c = 3;
  out[0] = a + b + c + missing_value;
  out[1] = 4;
  out[2] = 5;
  out[3] = 6;
  out[4] = 7;
}
"""


def test_compile_error_quotes_the_numbered_generated_lines(cache_dir: Path):
    with pytest.raises(CompileError) as caught:
        compile_kernel(BROKEN_SOURCE, "broken", "sm_80", cache_dir=cache_dir)
    error = caught.value
    assert (error.kernel_name, error.arch) == ("broken", "sm_80")
    assert 'broken.cu(5): error: identifier "missing_value" is undefined' in error.log
    message = str(error)
    assert "'broken'" in message and "sm_80" in message and error.log.strip() in message
    copy = pickle.loads(pickle.dumps(error))  # process pools send it back to the parent
    assert (str(copy), copy.kernel_name, copy.arch, copy.log) == (message, error.kernel_name, error.arch, error.log)
    quoted = message.split("Generated source at the lines the log refers to:\n", 1)[1]
    assert quoted.splitlines() == [
        "broken.cu, line 5:",
        "  2 |   int a = 1;",
        "  3 |   int b = 2;",
        "  4 |   int c = 3;",
        "> 5 |   out[0] = a + b + c + missing_value;",
        "  6 |   out[1] = 4;",
        "  7 |   out[2] = 5;",
        "  8 |   out[3] = 6;",
    ]


def test_invalid_option_is_a_compile_error(cache_dir: Path):
    with pytest.raises(CompileError, match="--no-such-flag"):
        compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir, options=["--no-such-flag"])


@pytest.mark.parametrize("arch", ["sm_35", "sm_80a", "sm_90f", "compute_90", "90", "sm80", "SM_90"])
def test_invalid_arch_is_rejected(arch: str, cache_dir: Path):
    with pytest.raises(ValueError, match=rf"invalid arch '{arch}'.*sm_<N>a"):
        compile_kernel(TINY_SOURCE, "tiny", arch, cache_dir=cache_dir)


def test_invalid_arguments_are_rejected(cache_dir: Path):
    with pytest.raises(ValueError, match="not a C identifier"):
        compile_kernel(TINY_SOURCE, "tiny-kernel", "sm_80", cache_dir=cache_dir)
    with pytest.raises(TypeError, match="sequence of strings"):
        compile_kernel(TINY_SOURCE, "tiny", "sm_80", cache_dir=cache_dir, options="-DX=1")


def test_missing_cuobjdump_names_the_package(monkeypatch):
    for finder in ("find_nvidia_binary_utility", "_installed_file"):
        monkeypatch.setattr(compiler, finder, lambda *args: None)
    monkeypatch.setattr(compiler.shutil, "which", lambda name: None)
    with pytest.raises(ToolNotFoundError, match="pip install nvidia-cuda-cuobjdump"):
        disassemble(b"")
