"""Where the runtime's cubins come from (CPU only): the binary-compatibility rule, cubin stores from
``XQAGEN_CUBIN_DIR`` and from an installed cubin package, and ``XQAGEN_DISABLE_JIT``.

One variant is compiled once for sm_80 (about 10 s) into a store that the tests share; they call
:func:`xqagen.cubins.load_cubin`, the lookup ``DecodeKernel`` launches from, with a GPU's arch.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from xqagen import compiler, cubins
from xqagen.cli import main
from xqagen.cubins import MissingCubinError, candidate_targets, compatible_targets, load_cubin
from xqagen.emitters import PATHS, EmittedKernel, emit
from xqagen.recipes import load_recipe

GENERIC = PATHS["generic"]
RECIPE = """\
model: {name: test/model, num_q_heads: 32, num_kv_heads: 8, head_dim: 128}
variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: [16, 32], tile: decode}]
"""


# ---- the rule ----

@pytest.mark.parametrize("device_arch, targets", [
    ("sm_80", ["sm_80"]),
    ("sm_86", ["sm_86", "sm_85", "sm_84", "sm_83", "sm_82", "sm_81", "sm_80"]),
    ("sm_90", ["sm_90a", "sm_90"]),
    ("sm_100", ["sm_100a", "sm_100f", "sm_100"]),
    ("sm_103", ["sm_103a", "sm_103f", "sm_103", "sm_102f", "sm_102", "sm_101f", "sm_101", "sm_100f", "sm_100"]),
    ("sm_121", ["sm_121a", "sm_121f", "sm_121", "sm_120f", "sm_120"]),
])
def test_compatible_targets_run_on_the_gpu_best_first(device_arch, targets):
    """Same major version, minor at most the GPU's; arch-specific (a) targets only on their own GPU."""
    assert compatible_targets(device_arch) == tuple(targets)


@pytest.mark.parametrize("device_arch, targets", [
    ("sm_75", []),  # the generic path refuses it
    ("sm_80", ["sm_80"]),
    ("sm_89", ["sm_89", "sm_88", "sm_87", "sm_86", "sm_85", "sm_84", "sm_83", "sm_82", "sm_81", "sm_80"]),
    ("sm_90", ["sm_90", "sm_90a"]),  # its own target first: what the path compiles for that GPU
    ("sm_120", ["sm_120", "sm_120a", "sm_120f"]),  # no sm_80 or sm_90 code runs there
])
def test_generic_path_candidates(device_arch, targets):
    assert candidate_targets(GENERIC, device_arch) == tuple(targets)


def test_candidates_are_only_targets_the_path_builds():
    hopper_only = types.SimpleNamespace(  # a path whose kernels need sm_90a
        target_arch=lambda arch: "sm_90a" if arch == "sm_90" else None,
        unsupported_target=lambda arch: None if arch == "sm_90a" else "sm_90a only")
    assert candidate_targets(hopper_only, "sm_90") == ("sm_90a",)
    assert candidate_targets(hopper_only, "sm_89") == ()


@pytest.mark.parametrize("device_arch", ["sm_9", "sm_90a", "90", "compute_90", "SM_90"])
def test_a_malformed_device_arch_is_named(device_arch):
    with pytest.raises(ValueError, match=f"device_arch '{device_arch}' is not a GPU's sm_<major><minor>"):
        compatible_targets(device_arch)


@pytest.mark.parametrize("value, disabled", [("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_disable_jit_values(monkeypatch, value, disabled):
    monkeypatch.setenv("XQAGEN_DISABLE_JIT", value)
    assert cubins.jit_disabled() is disabled


def test_a_bad_disable_jit_value_is_named(monkeypatch):
    monkeypatch.setenv("XQAGEN_DISABLE_JIT", "yes")
    with pytest.raises(ValueError, match="XQAGEN_DISABLE_JIT='yes': expected 1"):
        cubins.jit_disabled()


# ---- stores ----

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    """The page-16 variant of RECIPE compiled for sm_80 into a cache and a store, with both kernels."""
    root = tmp_path_factory.mktemp("store")
    recipe_path = root / "model.yaml"
    recipe_path.write_text(RECIPE)
    in_store, not_built = (emit(spec) for spec in load_recipe(recipe_path).variants)
    (root / "one.yaml").write_text(RECIPE.replace("[16, 32]", "16"))
    argv = ["build", str(root / "one.yaml"), "--arch", "sm_80", "-j", "1", "--cache-dir", str(root / "cache"),
            "--out", str(root / "store")]
    assert main(argv) == 0
    return types.SimpleNamespace(store=root / "store", cache=root / "cache", kernel=in_store, other=not_built)


@pytest.fixture
def no_jit(monkeypatch, tmp_path) -> Path:
    """JIT disabled, no store configured, an empty cache (returned)."""
    monkeypatch.setenv("XQAGEN_DISABLE_JIT", "1")
    monkeypatch.delenv("XQAGEN_CUBIN_DIR", raising=False)
    empty = tmp_path / "empty-cache"
    monkeypatch.setenv("XQAGEN_CACHE_DIR", str(empty))
    return empty


def _store_cubin(store: Path, kernel: EmittedKernel, arch: str) -> bytes:
    key = compiler.cache_key(kernel.source, kernel.kernel_name, arch)
    return compiler.read_entry(compiler.entry_path(key, store), kernel.kernel_name, arch).cubin


def test_build_out_writes_a_store_keyed_like_the_cache(built):
    store = cubins.open_store(built.store)
    key = compiler.cache_key(built.kernel.source, built.kernel.kernel_name, "sm_80")
    assert dict(store.entries) == {key: {"kernel_name": built.kernel.kernel_name, "arch": "sm_80"}}
    assert store.toolchain == compiler.toolchain()
    assert (built.store / f"{key}.entry").read_bytes() == (built.cache / f"{key}.entry").read_bytes()


@pytest.mark.parametrize("device_arch", ["sm_80", "sm_86", "sm_89"])
def test_store_from_the_variable_serves_every_compatible_gpu_without_jit(built, no_jit, monkeypatch, device_arch):
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", f"{built.store.parent / 'missing'}:{built.store}")
    compiled = load_cubin(built.kernel, device_arch)
    assert (compiled.arch, compiled.path.parent) == ("sm_80", built.store)
    assert compiled.cubin.startswith(b"\x7fELF") and compiled.cubin == _store_cubin(built.store, built.kernel, "sm_80")
    assert not no_jit.exists(), "nothing compiled, nothing cached"


def test_the_cache_serves_a_compatible_gpu_too(built, no_jit):
    compiled = load_cubin(built.kernel, "sm_86", cache_dir=built.cache)
    assert (compiled.arch, compiled.path.parent, compiled.cache_hit) == ("sm_80", built.cache, True)


@pytest.mark.parametrize("which, device_arch", [("kernel", "sm_90"), ("other", "sm_86")])
def test_a_miss_without_jit_names_the_variant_and_the_arch(built, no_jit, monkeypatch, which, device_arch):
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", str(built.store))
    kernel = getattr(built, which)
    with pytest.raises(MissingCubinError) as raised:
        load_cubin(kernel, device_arch)
    message = str(raised.value)
    assert message.startswith(f"no cubin of variant {kernel.spec.name} for {device_arch} (targets {device_arch}")
    assert f"in the cubin stores {built.store} and the cache {no_jit}, and XQAGEN_DISABLE_JIT=1" in message


def test_a_miss_names_a_store_of_another_toolchain(built, no_jit, monkeypatch, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(built.store, other)
    manifest = (other / "manifest.json").read_text()
    (other / "manifest.json").write_text(manifest.replace('"nvidia-cutlass": "', '"nvidia-cutlass": "0.'))
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", str(other))
    with pytest.raises(MissingCubinError, match=rf"{other} was built with another toolchain: nvidia-cutlass 0\."):
        load_cubin(built.other, "sm_80")


def test_with_jit_a_miss_compiles_the_gpus_own_target(built, monkeypatch, tmp_path):
    compiles = []
    monkeypatch.setattr(compiler, "compile_kernel", lambda source, name, arch, **_: compiles.append(arch) or arch)
    monkeypatch.delenv("XQAGEN_DISABLE_JIT", raising=False)
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", str(built.store))
    assert load_cubin(built.kernel, "sm_86", cache_dir=tmp_path).arch == "sm_80"
    assert load_cubin(built.other, "sm_86", cache_dir=tmp_path) == "sm_86"
    assert load_cubin(built.kernel, "sm_90", cache_dir=tmp_path) == "sm_90"
    assert compiles == ["sm_86", "sm_90"]


def test_a_corrupt_store_entry_is_reported_once_and_left_alone(built, no_jit, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "broken"
    shutil.copytree(built.store, broken)
    (entry,) = broken.glob("*.entry")
    data = bytearray(entry.read_bytes())
    data[-1] ^= 1
    entry.write_bytes(bytes(data))
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", str(broken))
    for _ in range(2):
        with pytest.raises(MissingCubinError):
            load_cubin(built.kernel, "sm_80")
    assert [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING] == [
        f"cubin store entry {entry} is unusable (cubin checksum mismatch); skipped"]
    assert entry.exists()


def test_a_folder_that_is_not_a_store_is_reported_and_skipped(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", str(tmp_path))
    assert cubins.cubin_stores() == []
    assert f"{tmp_path} is not a cubin store (no manifest.json) (from XQAGEN_CUBIN_DIR); skipped" in caplog.text


def test_installed_cubin_package_serves_without_jit(built, no_jit, monkeypatch, tmp_path):
    """A cubin package as users make one: the store as package data, an entry point naming its folder."""
    project = tmp_path / "project"
    shutil.copytree(built.store, project / "xqagen_test_cubins" / "store")
    (project / "xqagen_test_cubins" / "__init__.py").write_text(
        "import os\nSTORE_DIR = os.path.join(os.path.dirname(__file__), 'store')\n")
    (project / "pyproject.toml").write_text(textwrap.dedent("""\
        [build-system]
        requires = ["setuptools>=70.1"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "xqagen-test-cubins"
        version = "1.0"

        [project.entry-points."xqagen.cubin_stores"]
        test-model = "xqagen_test_cubins:STORE_DIR"

        [tool.setuptools]
        packages = ["xqagen_test_cubins"]
        package-data = {xqagen_test_cubins = ["store/*"]}
        """))
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                "--no-index", "--target", str(site), str(project)], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    shutil.rmtree(project)  # what runs is the installed copy
    monkeypatch.syspath_prepend(str(site))

    (store,) = cubins.cubin_stores()
    assert store.path == site / "xqagen_test_cubins" / "store"
    assert "entry point 'test-model'" in store.origin
    compiled = load_cubin(built.kernel, "sm_89")
    assert compiled.path.parent == store.path and compiled.cubin == _store_cubin(built.store, built.kernel, "sm_80")


@pytest.mark.gpu
def test_decode_launches_from_a_store_without_jit(monkeypatch, tmp_path):
    """On a GPU: a store built for it serves xqa_decode with JIT disabled and an empty cache."""
    import torch

    from xqagen import runtime
    from xqagen.api import xqa_decode
    from xqagen.reference import make_paged_kv, relative_l2_error, xqa_reference

    device = torch.device("cuda")
    target = candidate_targets(GENERIC, runtime.device_arch(device))[0]  # what the GPU would compile
    (tmp_path / "one.yaml").write_text(RECIPE.replace("[16, 32]", "16"))
    argv = ["build", str(tmp_path / "one.yaml"), "--arch", target, "-j", "1", "--cache-dir",
            str(tmp_path / "build-cache"), "--out", str(tmp_path / "store")]
    assert main(argv) == 0
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("XQAGEN_DISABLE_JIT", "1")
    monkeypatch.setenv("XQAGEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(runtime, "_handles", {})  # no handle loaded by an earlier test

    gen = torch.Generator(device=device).manual_seed(12)
    seq_lens = [300, 77]
    k_cache, v_cache, page_table = make_paged_kv(2, seq_lens, 8, 128, 16, torch.bfloat16, generator=gen,
                                                 device=device)
    q = torch.randn(2, 1, 32, 128, generator=gen, device=device).to(torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    out = xqa_decode(q, k_cache, v_cache, page_table, lens, tile="decode", num_splits=1)
    ref = xqa_reference(q, k_cache, v_cache, page_table, lens, num_kv_heads=8, out_dtype=torch.float32)
    assert relative_l2_error(out.float(), ref) < 5e-3
    assert not (tmp_path / "empty-cache").exists(), "nothing compiled or cached"
