"""The xqagen command line: generate, build (with a stand-in compiler, and once for real), list, bench."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import xqagen
from xqagen import recipes as recipes_module
from xqagen.cli import main
from xqagen.recipes import load_recipe, shipped_recipes, shipped_recipes_dir
from xqagen.spec import KernelSpec

TWO_VARIANTS = "variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: [16, 64], tile: decode}]"


# ---- generate ----

def test_generate_writes_sources_and_manifest(write_recipe, read_tree, tmp_path, capsys):
    recipe_path = write_recipe(TWO_VARIANTS, name="two")
    out = tmp_path / "out"
    assert main(["generate", str(recipe_path), "--out", str(out)]) == 0
    assert f"two: 2 variants in {out / 'two'}" in capsys.readouterr().out

    recipe = load_recipe(recipe_path)
    files = read_tree(out / "two")
    assert sorted(files) == sorted([f"{spec.name}.cu" for spec in recipe.variants] + ["manifest.json"])
    manifest_bytes = files["manifest.json"]
    assert manifest_bytes.endswith(b"}\n")
    manifest = json.loads(manifest_bytes)
    assert manifest["recipe"] == "two"
    assert manifest["model"] == {"name": "test/model", "num_q_heads": 32, "num_kv_heads": 8, "head_dim": 128}
    assert [entry["name"] for entry in manifest["variants"]] == [spec.name for spec in recipe.variants]
    for entry, spec in zip(manifest["variants"], recipe.variants, strict=True):
        assert KernelSpec.from_dict(entry["spec"]) == spec
        assert entry["content_hash"] == spec.content_hash
        assert entry["source_sha256"] == hashlib.sha256(files[entry["file"]]).hexdigest()
        assert entry["arches"] and entry["threads"] > 0 and entry["kernel_name"]


def test_generate_is_deterministic_and_skips_unchanged_files(write_recipe, read_tree, tmp_path, capsys):
    recipe_path = write_recipe(TWO_VARIANTS)
    for out in ("a", "b"):
        assert main(["generate", str(recipe_path), "--out", str(tmp_path / out)]) == 0
    assert read_tree(tmp_path / "a") == read_tree(tmp_path / "b")
    capsys.readouterr()
    assert main(["generate", str(recipe_path), "--out", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out.endswith("already up to date\n")


def test_generate_removes_stale_sources_only(write_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    main(["generate", str(write_recipe(TWO_VARIANTS)), "--out", str(out)])
    notes = out / "test" / "notes.txt"
    notes.write_text("not generated")
    page64 = next((out / "test").glob("*_p64_*.cu"))

    recipe_path = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 16, tile: decode}]")
    assert main(["generate", str(recipe_path), "--out", str(out)]) == 0
    assert f"removed {page64}" in capsys.readouterr().out
    assert not page64.exists()
    assert notes.exists()
    assert len(list((out / "test").glob("*.cu"))) == 1


def test_generate_all_leaves_the_folders_of_other_recipes_alone(write_recipe, read_tree, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", str(write_recipe(TWO_VARIANTS, name="mine")), "--out", str(out)]) == 0
    mine = read_tree(out / "mine")
    assert main(["generate", "--all", "--out", str(out)]) == 0
    assert read_tree(out / "mine") == mine
    assert {path.parent.name for path in out.glob("*/manifest.json")} == {
        "mine", *(path.stem for path in shipped_recipes())}


def test_generate_deletes_only_sources_its_manifest_names(write_recipe, tmp_path, capsys):
    out = tmp_path / "out"
    main(["generate", str(write_recipe(TWO_VARIANTS)), "--out", str(out)])
    handwritten = out / "test" / "xqa_handwritten.cu"
    handwritten.write_text("// mine\n")
    manifest = out / "test" / "manifest.json"
    edited = json.loads(manifest.read_text())
    edited["variants"].append({"file": "../outside.cu"})
    manifest.write_text(json.dumps(edited))
    outside = out / "outside.cu"
    outside.write_text("// not in the recipe's folder\n")

    recipe_path = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 16, tile: decode}]")
    assert main(["generate", str(recipe_path), "--out", str(out)]) == 0
    removed = re.findall(r"^  removed (\S+)$", capsys.readouterr().out, re.M)
    assert len(removed) == 1 and "_p64_" in removed[0]
    assert handwritten.exists() and outside.exists()


def test_generate_all_without_shipped_recipes_is_an_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(recipes_module, "shipped_recipes_dir", lambda: tmp_path / "empty")
    out = tmp_path / "out"
    (out / "kept").mkdir(parents=True)
    for argv in (["list"], ["generate", "--all", "--out", str(out)], ["build", "--all"]):
        assert main(argv) == 2
        assert capsys.readouterr().err.startswith("xqagen: error: no shipped recipes in ")
    assert (out / "kept").is_dir()


def test_check_reports_stale_missing_and_extra_files_and_writes_nothing(write_recipe, tmp_path, capsys):
    recipe_path = str(write_recipe(TWO_VARIANTS))
    out = tmp_path / "out"
    assert main(["generate", recipe_path, "--out", str(out), "--check"]) == 1
    assert not out.exists()
    main(["generate", recipe_path, "--out", str(out)])
    assert main(["generate", recipe_path, "--out", str(out), "--check"]) == 0

    edited, deleted = sorted((out / "test").glob("*.cu"))
    edited.write_text(edited.read_text() + "// hand edit\n")
    deleted.unlink()
    extra = out / "test" / "xqa_gone.cu"
    extra.write_text("// from an older recipe\n")
    manifest = out / "test" / "manifest.json"
    old_manifest = json.loads(manifest.read_text())
    old_manifest["variants"].append({"file": extra.name})
    manifest.write_text(json.dumps(old_manifest))
    capsys.readouterr()
    assert main(["generate", recipe_path, "--out", str(out), "--check"]) == 1
    report = capsys.readouterr().err
    assert "out of date" in report
    assert re.search(rf"stale\s+{re.escape(str(edited))}", report)
    assert re.search(rf"missing\s+{re.escape(str(deleted))}", report)
    assert re.search(rf"extra\s+{re.escape(str(extra))}", report)
    assert re.search(rf"stale\s+{re.escape(str(manifest))}", report)
    assert edited.read_text().endswith("// hand edit\n") and not deleted.exists() and extra.exists()


# ---- list ----

def test_list_shows_recipes_and_variants(capsys):
    assert main(["list", "llama3-70b-specdec"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama3-70b-specdec: meta-llama/Meta-Llama-3-70B, 64 q / 8 kv heads (group 8), "
                          "head_dim 128; 21 variants\n")
    assert re.search(r"^  path +q +kv +out +page +q_len +features +tile +name$", out, re.M)
    assert re.search(r"^  generic +bf16 +e4m3 +bf16 +64 +8 +- +decode_fp8 +xqa_generic_\S+_s8_", out, re.M)
    assert re.search(r"^  generic +bf16 +e4m3 +bf16 +64 +8 +- +split +xqa_generic_\S+_s8_split_", out, re.M)
    assert re.search(r"^  hopper +bf16 +e4m3 +bf16 +64 +4 +- +tma6x2 +xqa_hopper_\S+_s4_tma6x2_", out, re.M)
    for spec in load_recipe(shipped_recipes_dir() / "llama3-70b-specdec.yaml").variants:
        assert spec.name in out

    assert main(["list"]) == 0
    everything = capsys.readouterr().out
    for path in shipped_recipes():
        assert re.search(rf"^{re.escape(path.stem)}: ", everything, re.M)


# ---- usage ----

@pytest.mark.parametrize("argv", [["generate"], ["build"], ["generate", "--all", "llama3-8b"], ["frobnicate"],
                                  ["build", "--all", "--arch", "80"], ["build", "--all", "--jobs", "0"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage: xqagen" in capsys.readouterr().err


def test_unknown_recipe_is_an_error(capsys):
    assert main(["generate", "no-such-model"]) == 2
    assert "xqagen: error: no recipe 'no-such-model'" in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    assert err.startswith("xqagen: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("command", ["list", "generate", "build"])
@pytest.mark.parametrize("variant, message", [
    ("{path: sm100, q_dtype: bf16, kv_dtype: e4m3, page_size: 64}", "KernelSpec.path = 'sm100' is invalid"),
    ("{q_dtype: bf16, kv_dtype: bf16, page_size: 64, tile: huge}", "tile 'huge' needs 528512 bytes of shared memory"),
], ids=["unknown-path", "tile-too-big"])
def test_a_variant_without_a_kernel_names_the_file_and_variant(command, variant, message, write_recipe, tmp_path,
                                                               capsys):
    """A variant no path implements fails when its recipe loads, naming the file and the entry."""
    path = write_recipe(f"tiles: {{huge: {{kv_tile: 128, stages: 8, warps: 8, max_rows: 128}}}}\n"
                        f"variants: [{variant}]\n")
    assert main([command, str(path), *(["--out", str(tmp_path / "out")] if command == "generate" else [])]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"{path}: variants[0] (" in err and message in err
    assert not (tmp_path / "out").exists()


def test_unwritable_out_is_an_error(write_recipe, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["generate", str(write_recipe(TWO_VARIANTS)), "--out", str(blocker / "out")]) == 1
    assert str(blocker) in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("probe", ["nvrtc_version", "include_dirs"])
def test_missing_toolchain_is_one_error(probe, write_recipe, monkeypatch, cache_dir, capsys):
    from xqagen import compiler

    def missing():
        raise compiler.ToolNotFoundError(f"not installed: {compiler.INSTALL_HINT}")

    monkeypatch.setattr(compiler, probe, missing)
    assert main(["build", str(write_recipe(TWO_VARIANTS)), "--cache-dir", str(cache_dir)]) == 2
    assert "pip install 'xqagen[cu13]'" in _one_error_line(capsys.readouterr().err)


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from xqagen import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_selected_recipes", interrupted)
    assert main(["list"]) == 130
    assert capsys.readouterr().err == "xqagen: interrupted\n"


def test_closed_pipe_ends_quietly(tmp_path):
    # `xqagen list | head -1`: the reader is gone before xqagen writes
    reader, writer = os.pipe()
    os.close(reader)
    result = subprocess.run([sys.executable, "-m", "xqagen.cli", "list"], stdout=writer, stderr=subprocess.PIPE,
                            text=True, check=False)
    os.close(writer)
    assert (result.returncode, result.stderr) == (141, "")


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"xqagen {xqagen.__version__}\n"


def test_bad_log_level_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("XQAGEN_LOG_LEVEL", "loud")
    assert main(["list"]) == 2
    assert "XQAGEN_LOG_LEVEL='LOUD' is not a log level" in _one_error_line(capsys.readouterr().err)


def test_env_reports_toolchain_driver_and_cache(monkeypatch, tmp_path, capsys):
    from xqagen import compiler

    monkeypatch.setenv("XQAGEN_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["env"]) == 0
    rows: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        key, value = line.split(":", 1)
        rows.setdefault(key, []).append(value.strip())
    assert rows["xqagen"] == [xqagen.__version__]
    assert rows["nvrtc"] == ["%d.%d" % compiler.nvrtc_version()]
    assert "sm_80" in rows["nvrtc archs"][0].split() and "sm_90" in rows["nvrtc archs"][0].split()
    assert rows["cache dir"] == [str(tmp_path / "cache")]
    assert rows["driver"][0].startswith(("CUDA ", "not found"))
    assert rows["include dir"] == compiler.include_dirs()


def test_cache_info_and_clear(tmp_path, capsys):
    from xqagen import compiler

    cache = tmp_path / "cache"
    compiler.compile_kernel('extern "C" __global__ void k(int* p) { *p = 1; }\n', "k", "sm_80", cache_dir=cache)
    (cache / "notes.txt").write_text("not an entry")
    size = compiler.cache_entries(cache)[0].stat().st_size
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out == f"{cache}: 1 entries, {size / 1e6:.1f} MB\n"
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out == f"{cache}: removed 1 entries\n"
    assert [path.name for path in cache.iterdir()] == ["notes.txt"]


def test_bench_passes_its_arguments_through(monkeypatch):
    received = []
    bench = types.ModuleType("xqagen.bench")
    bench.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "xqagen.bench", bench)
    assert main(["bench", "--batch", "64", "llama3-8b", "--help"]) == 3
    assert received == [["--batch", "64", "llama3-8b", "--help"]]


# ---- build ----

@pytest.fixture
def fake_compiler(monkeypatch, cache_dir):
    """Replaces compile_kernel in this process (so builds run with -j 1) and points the cache at a private
    folder: records calls, fails for kernel names in `.failing`, reports a cache hit for a (name, arch) it
    built before.  For output and error handling; test_build_for_real_* check what gets compiled."""
    from xqagen import compiler

    fake = types.SimpleNamespace(calls=[], built=set(), failing=set(), spills={}, unstored=False)

    def compile_kernel(source, kernel_name, arch, *, options=(), cache_dir=None, use_pch=False):
        fake.calls.append((kernel_name, arch, cache_dir))
        if not arch.startswith(("sm_80", "sm_90")):
            raise ValueError(f"invalid arch {arch!r}")
        if kernel_name in fake.failing:
            raise compiler.CompileError(f'{kernel_name}.cu(7): error: identifier "oops" is undefined',
                                        kernel_name=kernel_name, arch=arch, log="")
        cache_hit = (kernel_name, arch) in fake.built
        fake.built.add((kernel_name, arch))
        spills = fake.spills.get(kernel_name, 0)
        resources = compiler.ResourceUsage(registers=96, spill_stores=spills, spill_loads=spills, stack_bytes=0,
                                           shared_bytes=0)
        path = None if fake.unstored else Path(cache_dir) / f"{kernel_name}-{arch}.entry"
        return compiler.CompiledKernel(b"", kernel_name, arch, resources, "", cache_hit=cache_hit, path=path,
                                       compile_seconds=1.5)

    monkeypatch.setattr(compiler, "compile_kernel", compile_kernel)
    monkeypatch.setenv("XQAGEN_CACHE_DIR", str(cache_dir))
    return fake


def test_build_shows_progress_then_summary(write_recipe, fake_compiler, cache_dir, capsys):
    recipe_path = str(write_recipe(TWO_VARIANTS))
    assert main(["build", recipe_path, "-j", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = r"\[(\d)/4\] xqa_generic_\S+ sm_(80|90): {}, 96 regs, 0 spills"
    assert all(re.fullmatch(progress.format(r"1\.5 s"), line) for line in lines[:4]), lines
    assert sorted(int(re.match(r"\[(\d)", line).group(1)) for line in lines[:4]) == [1, 2, 3, 4]
    assert re.fullmatch(r"4 cubins in \d+\.\d s: 4 compiled, 0 cached, 0 failed", lines[4])
    assert lines[5] == f"cubins under {cache_dir}"
    assert sorted(arch for _, arch, _ in fake_compiler.calls) == ["sm_80", "sm_80", "sm_90", "sm_90"]

    assert main(["build", recipe_path, "-j", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(re.fullmatch(progress.format("cached"), line) for line in lines[:4]), lines
    assert "0 compiled, 4 cached, 0 failed" in lines[4]


def test_build_builds_a_variant_shared_by_two_recipes_once(write_recipe, fake_compiler, tmp_path, capsys):
    first = write_recipe(TWO_VARIANTS, name="first")
    second = write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: [64, 128], tile: decode}]",
                          name="second")
    cache = tmp_path / "cache"
    assert main(["build", str(first), str(second), "--arch", "sm_90a", "-j", "1", "--cache-dir", str(cache)]) == 0
    # the page-64 variant is in both recipes and is built once
    assert len(fake_compiler.calls) == 3
    assert {(arch, cache_dir) for _, arch, cache_dir in fake_compiler.calls} == {("sm_90a", cache)}
    assert "[3/3]" in capsys.readouterr().out


def test_build_for_real_compiles_the_arch_asked_for_and_logs_it(write_recipe, cache_dir, monkeypatch, capsys):
    from xqagen import compiler

    monkeypatch.setenv("XQAGEN_LOG_LEVEL", "info")
    recipe = load_recipe(write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 16, tile: decode}]"))
    argv = ["build", str(recipe.source_path), "--arch", "sm_90a", "-j", "1", "--cache-dir", str(cache_dir)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "1 compiled, 0 cached, 0 failed" in captured.out
    assert re.fullmatch(rf"xqagen: info: compiled {recipe.variants[0].name}\w* for sm_90a in \d+\.\d s\n", captured.err)
    (entry,) = compiler.cache_entries(cache_dir)
    cubin = entry.read_bytes()[entry.read_bytes().index(b"\x7fELF"):]
    assert re.search(r"code for sm_90a\b", compiler.disassemble(cubin))


def test_build_shows_a_status_line_on_a_terminal_only(write_recipe, fake_compiler, monkeypatch, capsys):
    recipe_path = str(write_recipe(TWO_VARIANTS))
    assert main(["build", recipe_path, "-j", "1"]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["build", recipe_path, "-j", "1"]) == 0
    err = capsys.readouterr().err
    assert "\rbuilding: 0/4 cubins done, 0 s" in err and "\rbuilding: 3/4 cubins done" in err
    assert err.endswith("\r\x1b[K")


def test_build_reports_spills(write_recipe, fake_compiler, capsys):
    recipe = load_recipe(write_recipe(TWO_VARIANTS))
    fake_compiler.spills[recipe.variants[0].name] = 24
    assert main(["build", str(recipe.source_path), "--arch", "sm_80", "-j", "1"]) == 0
    expected = f"{recipe.variants[0].name} sm_80: 1.5 s, 96 regs, spills 24 B stored / 24 B loaded"
    assert expected in capsys.readouterr().out


def test_build_fails_on_compile_error(write_recipe, fake_compiler, capsys):
    recipe = load_recipe(write_recipe(TWO_VARIANTS))
    broken = recipe.variants[1].name
    fake_compiler.failing.add(broken)
    assert main(["build", str(recipe.source_path), "-j", "1"]) == 1
    captured = capsys.readouterr()
    assert re.search(rf"^\[\d/4\] {broken} sm_80: FAILED$", captured.out, re.M)
    assert "2 compiled, 0 cached, 2 failed" in captured.out
    assert f'{broken} sm_90: {broken}.cu(7): error: identifier "oops" is undefined' in captured.err
    assert len(fake_compiler.calls) == 4, "one failure does not stop the other compiles"


@pytest.mark.parametrize("arch", ["sm_75", "sm_35"])
def test_build_refuses_an_arch_the_path_cannot_target(arch, write_recipe, cache_dir, capsys):
    """sm_75 compiles with NVRTC, but into cubins without tensor-core MMAs, cp.async or ldmatrix
    that trap: the path says so before anything compiles."""
    argv = ["build", str(write_recipe(TWO_VARIANTS)), "--arch", f"sm_80,{arch}", "-j", "1", "--cache-dir",
            str(cache_dir)]
    assert main(argv) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert f"--arch {arch}: the generic path builds for sm_80 and newer" in err
    assert not any(cache_dir.iterdir()), "nothing compiled"


def test_build_fails_once_when_the_cache_cannot_be_written(write_recipe, fake_compiler, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["build", str(write_recipe(TWO_VARIANTS)), "--cache-dir", str(blocker / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"xqagen: error: cannot write the cubin cache {blocker / 'cache'} ") and err.count("\n") == 1
    assert not fake_compiler.calls

    fake_compiler.unstored = True  # the disk fills up during the build
    assert main(["build", str(write_recipe(TWO_VARIANTS)), "-j", "1"]) == 1
    captured = capsys.readouterr()
    assert "4 compiled, 0 cached, 0 failed" in captured.out and "cubins under" not in captured.out
    assert captured.err.count("xqagen: error: 4 of the cubins could not be written to the cache") == 1


def test_build_out_adds_the_cubins_to_a_store(write_recipe, fake_compiler, tmp_path, capsys):
    from xqagen import compiler, cubins
    from xqagen.emitters import emit

    first = load_recipe(write_recipe(TWO_VARIANTS, name="first"))
    second = load_recipe(write_recipe("variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 32, tile: decode}]",
                                      name="second"))
    store = tmp_path / "store"
    assert main(["build", str(first.source_path), "-j", "1", "--out", str(store)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"cubin store {store}: 4 cubins written, 4 in all"
    assert main(["build", str(second.source_path), "--arch", "sm_80", "-j", "1", "--out", str(store)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"cubin store {store}: 1 cubins written, 5 in all"
    built = [(spec, arch) for spec in first.variants for arch in ("sm_80", "sm_90")] + [(second.variants[0], "sm_80")]
    assert cubins.open_store(store).entries == {
        compiler.cache_key(emit(spec).source, spec.name, arch): {"kernel_name": spec.name, "arch": arch}
        for spec, arch in built}


@pytest.mark.parametrize("manifest, message", [
    (None, "is neither empty nor a cubin store (no manifest.json)"),
    ({"format": 1, "toolchain": {"nvrtc": [12, 0], "packages": {}}, "entries": {}},
     "holds cubins of another toolchain (nvrtc 12.0 against "),
    ({"format": 2, "toolchain": {}, "entries": {}}, "not a cubin store of format 1 (format 2)"),
])
def test_build_out_refuses_a_folder_that_cannot_take_the_cubins(manifest, message, write_recipe, fake_compiler,
                                                                 tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json" if manifest else out / "notes.txt").write_text(json.dumps(manifest))
    assert main(["build", str(write_recipe(TWO_VARIANTS)), "-j", "1", "--out", str(out)]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not fake_compiler.calls, "refused before compiling"


def test_build_out_writes_no_store_when_a_compile_fails(write_recipe, fake_compiler, tmp_path, capsys):
    recipe = load_recipe(write_recipe(TWO_VARIANTS))
    fake_compiler.failing.add(recipe.variants[0].name)
    store = tmp_path / "store"
    assert main(["build", str(recipe.source_path), "-j", "1", "--out", str(store)]) == 1
    assert f"xqagen: error: the cubin store {store} was not written: 2 cubins failed" in capsys.readouterr().err
    assert not store.exists()


def test_env_lists_the_cubin_stores_and_whether_jit_is_on(monkeypatch, tmp_path, capsys):
    from xqagen import cubins

    cubins.write_store(tmp_path / "store", [])
    monkeypatch.setenv("XQAGEN_CUBIN_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("XQAGEN_DISABLE_JIT", "1")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^cubin store: +{tmp_path / 'store'} \(0 cubins; XQAGEN_CUBIN_DIR\)$", out, re.M), out
    assert re.search(r"^jit: +disabled$", out, re.M)


@pytest.mark.slow
def test_build_compiles_for_real_in_worker_processes_then_hits_the_cache(write_recipe, cache_dir, capsys):
    recipe_path = str(write_recipe("variants: [{q_dtype: bf16, kv_dtype: e4m3, page_size: [16, 64], tile: decode}]"))
    argv = ["build", recipe_path, "--arch", "sm_80", "--jobs", "2", "--cache-dir", str(cache_dir)]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert len(re.findall(r"^\[[12]/2\] \S+ sm_80: \d+\.\d s, \d+ regs, 0 spills$", out, re.M)) == 2, out
    assert f"cubins under {cache_dir}" in out
    assert main(argv) == 0
    assert "0 compiled, 2 cached, 0 failed" in capsys.readouterr().out


def test_bench_counts_the_kv_bytes_a_window_leaves_visible():
    from xqagen.bench import BenchCase

    full = BenchCase("full", 2, 8192, head_dim=64)
    assert full.kv_bytes == 2 * 2 * 8192 * 8 * 64 * 2  # K and V, batch 2, 8 KV heads, 2 bytes
    windowed = BenchCase("windowed", 2, 8192, head_dim=64, kv_dtype="e4m3", window=128, q_seq_len=4)
    assert windowed.visible_tokens == 131  # each draft row sees its own last 128 positions
    assert windowed.kv_bytes == 2 * 2 * 131 * 8 * 64
    assert BenchCase("short", 1, 100, window=128).visible_tokens == 100


def test_bench_table_reports_both_timings_and_ratios():
    from xqagen.bench import DESIGN_CASES, BenchResult, format_table

    case = next(c for c in DESIGN_CASES if "sm90" in c.flashinfer_paths)
    result = BenchResult(case, ms=0.5, ms_events=0.6, kv_tbps=2.0, copy_fraction=0.66, read_fraction=0.64,
                         num_splits=4, flashinfer_ms={"generic": 0.75, "sm90": 0.5, "xqa": 0.55},
                         flashinfer_ms_events={"generic": 0.9, "sm90": 0.6, "xqa": 0.9},
                         flashinfer_rel_diff={"generic": 3e-3, "sm90": 3e-2, "xqa": 3e-2}, same_read_ms=0.35)
    header, line = format_table([result], 3.0, 3.1, "GPU").splitlines()[-2:]
    assert "FI xqa() ms" in header
    assert line.split() == [case.name, "4", "0.5000", "2.00", "66%", "64%", "70%", "0.7500", "1.50", "1.50",
                            "0.5000", "1.00", "1.00", "0.5500", "1.10", "1.50", "3.0e-02"]
    row = result.row()
    assert row["same_read_fraction"] == pytest.approx(0.7)
    assert row["speedup"] == pytest.approx({"generic": 1.5, "sm90": 1.0, "xqa": 1.1})
    assert row["speedup_events"] == pytest.approx({"generic": 1.5, "sm90": 1.0, "xqa": 1.5})
    without_xqa = dataclasses.replace(result, flashinfer_ms={"generic": 0.75}, flashinfer_ms_events={"generic": 0.9})
    assert format_table([without_xqa], 3.0, 3.1, "GPU").splitlines()[-1].split()[-7:] == ["-"] * 6 + ["3.0e-02"]


def _bench_records(tmp_path: Path, *, public_xqa: bool = False) -> Path:
    """A kernel bench's --json file as bench writes it: two cases, FlashInfer timed on the first only
    (its public xqa() too with ``public_xqa``; records of runs before that column have none)."""
    from xqagen.bench import DESIGN_CASES, BenchResult, run_versions

    header = {"device": "GPU", "copy_TBps": 3.0, "read_TBps": 3.2, "pdl": False, "versions": run_versions()}
    xqa_ms, xqa_ms_events = ({"xqa": 0.5}, {"xqa": 0.6}) if public_xqa else ({}, {})
    timed = BenchResult(DESIGN_CASES[0], ms=0.5, ms_events=0.6, kv_tbps=2.0, copy_fraction=0.66, read_fraction=0.62,
                        num_splits=1, flashinfer_ms={"generic": 1.0, "sm90": 0.4, **xqa_ms},
                        flashinfer_ms_events={"generic": 1.1, "sm90": 0.5, **xqa_ms_events},
                        flashinfer_rel_diff={"generic": 1e-3, "sm90": 2e-3})
    alone = BenchResult(DESIGN_CASES[1], ms=0.25, ms_events=0.3, kv_tbps=1.5, copy_fraction=0.5, read_fraction=0.47,
                        num_splits=4)
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in (header, timed.row(), alone.row())))
    return path


def test_bench_records_the_versions_it_ran_with():
    import torch

    from xqagen import compiler
    from xqagen.bench import run_versions

    versions = run_versions()
    described = subprocess.run(["git", "-C", str(Path(xqagen.__file__).parent.parent), "describe", "--always",
                                "--dirty"], capture_output=True, text=True)
    assert versions["xqagen"] == (described.stdout.strip() if described.returncode == 0 else xqagen.__version__)
    assert versions["nvrtc"] == "%d.%d" % compiler.nvrtc_version()
    assert versions["torch"] == torch.__version__
    assert versions.keys() == {"xqagen", "source", "torch", "driver", "nvrtc", "flashinfer"}


def test_bench_source_digest_follows_the_templates(tmp_path, monkeypatch):
    import shutil

    from xqagen import bench, emitters

    copy = tmp_path / "emitters"  # a copy of the emitters to change, standing in for the real ones
    shutil.copytree(Path(emitters.__file__).resolve().parent, copy)
    monkeypatch.setattr(emitters, "__file__", str(copy / "__init__.py"))
    digest = bench.source_digest()
    assert len(digest) == 12 and int(digest, 16) >= 0 and bench.source_digest() == digest
    template = copy / "templates" / "pieces" / "softmax.cuh.j2"
    template.write_bytes(template.read_bytes() + b"// changed\n")
    assert bench.source_digest() != digest


def test_bench_plot_series_are_each_librarys_kv_bandwidth(tmp_path):
    from xqagen.bench import kv_bandwidths, read_records

    header, rows = read_records(_bench_records(tmp_path))
    assert (header["copy_TBps"], header["read_TBps"]) == (3.0, 3.2)
    # the same KV bytes in FlashInfer's time: 2 TB/s in 0.5 ms is 1 TB/s in 1 ms
    assert kv_bandwidths(rows) == {"xqagen": [2.0, 1.5], "FlashInfer XQA": [1.0, None],
                                   "FlashInfer XQA sm90": [2.5, None]}
    _, rows = read_records(_bench_records(tmp_path, public_xqa=True))
    assert kv_bandwidths(rows)["FlashInfer xqa() (its own path)"] == [2.0, None]


@pytest.mark.parametrize("public_xqa", [False, True])
def test_bench_plot_draws_a_recorded_run_without_a_gpu(tmp_path, capsys, public_xqa):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "bench.png"
    assert main(["bench", "--from", str(_bench_records(tmp_path, public_xqa=public_xqa)), "--plot", str(plot)]) == 0
    assert capsys.readouterr().out == f"plotted 2 cases to {plot}\n"
    assert plot.read_bytes().startswith(b"\x89PNG\r\n")


def test_bench_plot_draws_the_recorded_runs_in_docs(tmp_path, capsys):
    """Kernel bench records kept in docs/results/, written before the FlashInfer xqa() column, still
    give each library's series (one of them drawn: a plot takes a second)."""
    from xqagen.bench import FLASHINFER_LABELS, kv_bandwidths, read_records

    recorded = []
    for path in sorted((Path(__file__).resolve().parent.parent / "docs" / "results").glob("*.jsonl")):
        try:
            recorded.append((path, *read_records(path)))
        except ValueError:  # host-time, pdl-gemm and other records
            continue
    if not recorded:
        pytest.skip("no docs/results/ beside the tests (an installed package)")
    for path, _, rows in recorded:
        series = kv_bandwidths(rows)
        assert series.keys() <= {"xqagen", *FLASHINFER_LABELS.values()} and len(series["xqagen"]) == len(rows), path
    pytest.importorskip("matplotlib")
    path, _, rows = recorded[-1]
    assert main(["bench", "--from", str(path), "--plot", str(tmp_path / "bench.png")]) == 0
    assert capsys.readouterr().out == f"plotted {len(rows)} cases to {tmp_path / 'bench.png'}\n"


def test_bench_plot_without_matplotlib_is_one_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["bench", "--from", str(_bench_records(tmp_path)), "--plot", str(tmp_path / "bench.png")]) == 2
    assert _one_error_line(capsys.readouterr().err) == (
        "xqagen: error: xqagen bench --plot needs matplotlib, which is not installed: pip install 'xqagen[plot]'\n")


@pytest.mark.parametrize("records", ['{"device": "GPU", "pdl": false, "mode": "host-time"}\n{"case": "c", "run": 9.0}',
                                     "not json", ""])
def test_bench_plot_refuses_what_is_not_a_kernel_bench_run(records, tmp_path, capsys):
    path = tmp_path / "records.jsonl"
    path.write_text(records)
    with pytest.raises(SystemExit) as exited:
        main(["bench", "--from", str(path), "--plot", str(tmp_path / "bench.png")])
    assert exited.value.code == 2
    assert f"xqagen bench: error: {path}" in capsys.readouterr().err
