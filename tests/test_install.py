"""Installed as users install it: from a wheel, run from another folder, and without torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from xqagen.cli import main
from xqagen.recipes import shipped_recipes

ONE_VARIANT = """\
model: {name: test/model, num_q_heads: 32, num_kv_heads: 8, head_dim: 128}
variants: [{q_dtype: bf16, kv_dtype: bf16, page_size: 16, tile: decode}]
"""

# Python with torch unimportable, running the command line or a snippet.
NO_TORCH = "import sys; sys.modules['torch'] = None; "


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


def test_generate_list_and_the_compiler_work_without_torch(tmp_path):
    recipe = tmp_path / "one.yaml"
    recipe.write_text(ONE_VARIANT)
    cli = NO_TORCH + "from xqagen.cli import main; sys.exit(main(sys.argv[1:]))"
    listed = _run([sys.executable, "-c", cli, "list"])
    assert listed.returncode == 0, listed.stderr
    assert {line.split(":")[0] for line in listed.stdout.splitlines() if re.match(r"\S", line)} == {
        path.stem for path in shipped_recipes()}
    generated = _run([sys.executable, "-c", cli, "generate", str(recipe), "--out", str(tmp_path / "out")])
    assert generated.returncode == 0, generated.stderr
    assert len(list((tmp_path / "out" / "one").glob("*.cu"))) == 1

    compiled = _run([sys.executable, "-c", NO_TORCH + textwrap.dedent(f"""
        from xqagen.compiler import compile_kernel
        print(len(compile_kernel('extern "C" __global__ void k(int* p) {{ *p = 1; }}', "k", "sm_80",
                                 cache_dir={str(tmp_path / "cache")!r}).cubin))
        """)])
    assert compiled.returncode == 0 and int(compiled.stdout) > 0, compiled.stderr


def test_without_the_cuda_toolchain_generate_works_and_build_names_the_extras(tmp_path):
    recipe = tmp_path / "one.yaml"
    recipe.write_text(ONE_VARIANT)
    cli = ("import sys; sys.modules['cuda.bindings'] = sys.modules['cuda.core'] = None; "
           "from xqagen.cli import main; sys.exit(main(sys.argv[1:]))")
    generated = _run([sys.executable, "-c", cli, "generate", str(recipe), "--out", str(tmp_path / "out")])
    assert generated.returncode == 0, generated.stderr
    built = _run([sys.executable, "-c", cli, "build", str(recipe), "--cache-dir", str(tmp_path / "cache")])
    assert (built.returncode, built.stderr) == (2, "xqagen: error: NVRTC bindings (cuda-bindings) not installed: "
                                                   "pip install 'xqagen[cu13]' (CUDA 13 driver) or 'xqagen[cu12]' "
                                                   "(CUDA 12 driver)\n")


@pytest.mark.parametrize("module", ["xqagen.api", "xqagen.flashinfer_compat", "xqagen.runtime"])
def test_launch_modules_without_torch_say_how_to_install_it(module):
    result = _run([sys.executable, "-c", NO_TORCH + f"import {module}"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "ModuleNotFoundError: xqagen's launch API needs PyTorch, which is not installed: pip install "
        "'xqagen[torch]' (or the torch build you serve with); generate, build and list work without it")


def test_bench_without_torch_is_one_error():
    result = _run([sys.executable, "-c", NO_TORCH + "from xqagen.cli import main; sys.exit(main(['bench']))"])
    assert result.returncode == 2
    assert result.stderr.startswith("xqagen: error: xqagen's launch API needs PyTorch") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_folder(repo_root, read_tree, tmp_path, capsys):
    """pip install of a wheel (no source tree), offline: the toolchain comes from this environment."""
    source = tmp_path / "source"
    shutil.copytree(repo_root, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "generated"))
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(wheels), str(source)])
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("xqagen-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # This environment's packages (NVRTC, headers, jinja2, ...) after the venv's own; cuda.pathfinder
    # looks for the NVIDIA wheels in site.getsitepackages(), which the import line extends.
    (venv_site / "this-env.pth").write_text("\n".join([
        *dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")),
        f"import site; site.PREFIXES.append({sys.prefix!r})"]) + "\n")
    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])
    assert installed.returncode == 0, installed.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    xqagen = str(venv / "bin" / "xqagen")
    env = {**os.environ, "XQAGEN_CACHE_DIR": str(tmp_path / "cache")}

    def run(*argv: str) -> str:
        result = _run([xqagen, *argv], cwd=elsewhere, env=env)
        assert result.returncode == 0, (argv, result.stderr)
        return result.stdout

    where = _run([str(python), "-c", "import xqagen.recipes as r; print(r.shipped_recipes_dir())"], cwd=elsewhere)
    assert Path(where.stdout.strip()).is_relative_to(venv_site), where
    listed = run("list")
    assert [line.split(":")[0] for line in listed.splitlines() if re.match(r"\S", line)] == [
        path.stem for path in shipped_recipes()]
    assert run("list", "llama3-8b").startswith("llama3-8b: ")  # a shipped recipe by name
    run("generate", "--all")
    assert read_tree(elsewhere / "generated") == read_tree(repo_root / "generated")

    # A cubin built by this environment is a cache hit for the wheel's: where xqagen lives is not in the key.
    recipe = elsewhere / "one.yaml"
    recipe.write_text(ONE_VARIANT)
    assert main(["build", str(recipe), "--arch", "sm_80", "-j", "1", "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "1 compiled, 0 cached" in capsys.readouterr().out
    assert "0 compiled, 1 cached, 0 failed" in run("build", "one.yaml", "--arch", "sm_80")
