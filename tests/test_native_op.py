"""The C++ kernel of torch.ops.xqagen.decode (xqagen/native.py, xqagen/csrc/decode_op.cpp) on the
CPU: it builds, registers as the op's CUDA kernel, agrees with the Python side on the order of the
fields they exchange, and the setting that turns it off works.  Its launches are tested on a GPU
(tests/test_gpu_serving.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from xqagen import native

REGISTRATION = """
import torch, xqagen.ops as ops
print("NATIVE", ops.NATIVE)
for line in torch._C._dispatch_dump("xqagen::decode").splitlines():
    if line.startswith("CUDA:"):
        print(line)
"""


def _registration(setting: str) -> str:
    env = dict(os.environ, XQAGEN_NATIVE_OP=setting)
    done = subprocess.run([sys.executable, "-c", REGISTRATION], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the op's kernel")
def test_native_kernel_builds_and_registers_for_cuda():
    out = _registration("1")
    assert "NATIVE True" in out
    assert re.search(r"CUDA: registered at .*decode_op\.cpp:\d+ .*\[ boxed unboxed \]", out), out


def test_setting_0_keeps_the_python_kernel():
    out = _registration("0")
    assert "NATIVE False" in out
    assert re.search(r"CUDA: registered at .*ops\.py:\d+", out), out


def test_invalid_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(native.ENV, "yes")
    with pytest.raises(ValueError, match="XQAGEN_NATIVE_OP='yes' is invalid; expected one of auto, 0, 1"):
        native.setting()


def test_pointer_order_matches_the_python_side():
    """The C++ kernel rewrites REWRITTEN_POINTERS at the word indices bind_for_native lists, in its
    own enum's order: the two orders must be the same."""
    from xqagen.api import REWRITTEN_POINTERS

    source = native.SOURCE.read_text()
    enum = re.search(r"enum Pointer \{([^}]*)\}", source).group(1)
    names = [name.strip() for name in enum.split(",") if name.strip() != "kNumPointers"]
    snake = [re.sub(r"(?<!^)(?=[A-Z])", "_", name[1:]).lower() for name in names]
    assert snake == list(REWRITTEN_POINTERS)


def test_a_failed_build_warns_and_keeps_the_python_kernel(monkeypatch):
    """Without a compiler the op keeps its Python kernel, with a warning that says how to skip the
    build; XQAGEN_NATIVE_OP=1 turns the failure into an error."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setenv(native.ENV, "auto")
    monkeypatch.setattr(native.torch.version, "cuda", "13.0")  # a CUDA build of torch builds by default
    with pytest.warns(RuntimeWarning, match=r"could not be built \(no C\+\+ compiler found\).*XQAGEN_NATIVE_OP=0"):
        assert native.load() is False
    monkeypatch.setenv(native.ENV, "1")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        native.load()
    monkeypatch.setenv(native.ENV, "0")
    assert native.load() is False
