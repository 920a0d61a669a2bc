"""``torch.ops.xqagen.decode``: the decode as a PyTorch custom op, for ``torch.compile`` and CUDA graphs.

Schema (the mutated buffers declared with ``(a!)``; optional tensors as ``Tensor?``)::

    xqagen::decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor seq_lens,
                   Tensor(a!) out, Tensor(b!)? workspace, Tensor(c!)? semaphores, Tensor? sinks,
                   Tensor? mask, Tensor? q_scale_tensor, Tensor? kv_scale_tensor, float q_scale,
                   float kv_scale, float rcp_out_scale, int sliding_window, str kv_layout,
                   int num_splits, int sm_count, bool enable_pdl, Tensor? q_cu_seq_lens=None,
                   int q_seq_len=0, bool fp8_mma=False) -> ()

A scale is a float, or a one-element float32 tensor that the kernel reads on the device (no host
sync; the float is then ignored).  ``workspace``/``semaphores``: the caller's split-KV buffers
(semaphores zero before first use; every launch leaves them zero; their last int32 is the fault
word), or None for the device's default workspace.  ``q_cu_seq_lens``/``q_seq_len``: ragged
speculative decoding (a packed q), or None/0.  ``fp8_mma``: the opt-in fp8 MMA mode
(:func:`xqagen.api.xqa_decode`).  ``num_splits`` and ``sm_count``: 0 for the defaults.
Every argument is checked the first time a geometry is seen, and the op never synchronises.  Its
CUDA kernel is C++ (:mod:`xqagen.native`: it launches geometries seen before without Python, and
hands new ones to ``xqagen::decode_bind``), or :func:`xqagen.api.launch_decode` where that cannot
be built.  Its fake implementation returns nothing, so a compiled graph holds the op as one node
that writes ``out``.

:func:`decode` is the Python entry with :func:`xqagen.api.xqa_decode`'s keyword arguments.  The
FlashInfer-compatible entry points (:mod:`xqagen.flashinfer_compat`) lower to the same op, through
:func:`launch`.
"""

from __future__ import annotations

import torch

from . import native
from .api import bind_for_native, launch_decode
from .runtime import Workspace

__all__ = ["decode", "launch"]

_SCHEMA_ARGS = (
    "Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor seq_lens, Tensor(a!) out, "
    "Tensor(b!)? workspace, Tensor(c!)? semaphores, Tensor? sinks, Tensor? mask, Tensor? q_scale_tensor, "
    "Tensor? kv_scale_tensor, float q_scale, float kv_scale, float rcp_out_scale, int sliding_window, "
    "str kv_layout, int num_splits, int sm_count, bool enable_pdl, Tensor? q_cu_seq_lens=None, int q_seq_len=0, "
    "bool fp8_mma=False")
_LIB = torch.library.Library("xqagen", "DEF")
_LIB.define(f"decode({_SCHEMA_ARGS}) -> ()")
# The C++ kernel's call for a geometry it has not bound (xqagen.api.bind_for_native); internal.
_LIB.define(f"decode_bind({_SCHEMA_ARGS.replace('=None', '').replace('=0', '').replace('=False', '')}, "
            "int[] release) -> int[]")
_LIB.impl("decode_bind", bind_for_native, "CUDA")
NATIVE = native.load()  # registers the C++ kernel for CUDA
# Python kernels are registered with Library.impl rather than torch.library.custom_op: the latter's
# wrapper costs far more per eager call than the launch itself.  On CPU tensors the same function
# reports what is wrong with the arguments (kernels run on GPUs only).
for _key in ("CPU",) if NATIVE else ("CUDA", "CPU"):
    _LIB.impl("decode", launch_decode, _key)


@torch.library.register_fake("xqagen::decode", lib=_LIB)
def _decode_fake(q, k_cache, v_cache, page_table, seq_lens, out, workspace, semaphores, sinks, mask,
                 q_scale_tensor, kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout,
                 num_splits, sm_count, enable_pdl, q_cu_seq_lens=None, q_seq_len=0, fp8_mma=False) -> None:
    if out.shape != q.shape:  # the one check a graph needs to stay shape-correct; the launch checks the rest
        raise ValueError(f"out: expected q's shape {tuple(q.shape)}, got {tuple(out.shape)}")


def launch(*args) -> None:
    """Run the op on its schema's positional arguments.  With the C++ kernel every call goes through
    ``torch.ops.xqagen.decode``.  Without it an eager call on CUDA tensors goes straight to the
    Python kernel (the dispatcher's boxing of twenty arguments costs more host time than the
    launch), and anything traced (torch.compile, export, fake or meta tensors, subclasses) through
    the op, so graphs hold the op."""
    q = args[0]
    if not NATIVE and not torch.compiler.is_compiling() and type(q) is torch.Tensor and q.is_cuda:
        launch_decode(*args)
    else:
        torch.ops.xqagen.decode.default(*args)


def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
           seq_lens: torch.Tensor, out: torch.Tensor, *, workspace: Workspace | None = None, kv_layout: str = "NHD",
           q_scale: float | torch.Tensor = 1.0, kv_scale: float | torch.Tensor = 1.0, rcp_out_scale: float = 1.0,
           sinks: torch.Tensor | None = None, sliding_window: int = 0, mask: torch.Tensor | None = None,
           num_splits: int | None = None, sm_count: int | None = None, enable_pdl: bool = False,
           q_cu_seq_lens: torch.Tensor | None = None, q_seq_len: int | None = None,
           fp8_mma: bool = False) -> torch.Tensor:
    """:func:`xqagen.api.xqa_decode` into ``out`` through the op (no value checks, no sync); returns ``out``."""
    q_scale_tensor, q_scale = (q_scale, 1.0) if isinstance(q_scale, torch.Tensor) else (None, q_scale)
    kv_scale_tensor, kv_scale = (kv_scale, 1.0) if isinstance(kv_scale, torch.Tensor) else (None, kv_scale)
    scratch, semaphores = (None, None) if workspace is None else (workspace.scratch, workspace.buffer)
    launch(q, k_cache, v_cache, page_table, seq_lens, out, scratch, semaphores, sinks, mask, q_scale_tensor,
           kv_scale_tensor, q_scale, kv_scale, rcp_out_scale, sliding_window, kv_layout, num_splits or 0, sm_count or 0,
           enable_pdl, q_cu_seq_lens, q_seq_len or 0, fp8_mma)
    return out
