"""The C++ kernel of ``torch.ops.xqagen.decode`` (``csrc/decode_op.cpp``), built on first use.

A Python kernel behind a custom op costs the dispatcher several microseconds per call (it boxes
twenty arguments into Python objects) on top of the Python launch; the C++ kernel takes the op's
arguments unboxed and launches a geometry it has seen before without Python.  torch's extension
builder compiles it once per source and torch version (a C++ compiler and ninja; about 20 s on
two cores) into torch's extension cache (``TORCH_EXTENSIONS_DIR``); later processes load it.

``XQAGEN_NATIVE_OP``: ``auto`` (the default) builds it with a CUDA build of torch, ``1`` always
(and an error if it cannot be built), ``0`` never.  Without it the op runs its Python kernel,
:func:`xqagen.api.launch_decode`, with the same results.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

from ._torch import torch

SOURCE = Path(__file__).with_name("csrc") / "decode_op.cpp"
ENV = "XQAGEN_NATIVE_OP"
SETTINGS = ("auto", "0", "1")


def setting() -> str:
    value = os.environ.get(ENV, "auto")
    if value not in SETTINGS:
        raise ValueError(f"{ENV}={value!r} is invalid; expected one of {', '.join(SETTINGS)}")
    return value


def extension_name() -> str:
    """One name per source and torch version, so that an upgrade of either builds anew."""
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return f"xqagen_decode_op_{digest}"


def _put_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ninja wheel's binary may not be there (a venv
    used without activating it)."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, path)) if path else ninja.BIN_DIR


def load() -> bool:
    """Build (if needed) and load the C++ kernel, which registers itself as the op's CUDA kernel;
    whether it did.  A failed build warns and returns False, unless ``XQAGEN_NATIVE_OP=1``."""
    mode = setting()
    if mode == "0" or (mode == "auto" and torch.version.cuda is None):
        return False
    try:
        from torch.utils import cpp_extension

        _put_ninja_on_path()
        cpp_extension.load(name=extension_name(), sources=[str(SOURCE)], extra_cflags=["-O2"],
                           is_python_module=False, verbose=False)
    except Exception as err:
        if mode == "1":
            raise
        warnings.warn(f"xqagen: the C++ kernel of torch.ops.xqagen.decode could not be built ({err}); the op "
                      f"runs its Python kernel, with more host time per call (set {ENV}=0 to skip the build)",
                      RuntimeWarning, stacklevel=2)
        return False
    return True
