"""Emitters: render a KernelSpec into CuTe C++ source (importable as ``xqagen.emitters``)."""

from __future__ import annotations

from dataclasses import dataclass

from xqagen.spec import KernelSpec


@dataclass(frozen=True)
class EmittedKernel:
    """Generated source plus the launch geometry the runtime needs."""

    spec: KernelSpec
    source: str
    kernel_name: str
    threads: int
    smem_bytes: int
    arches: tuple[str, ...]  # cubin targets built by default for this variant


def emit(spec: KernelSpec) -> EmittedKernel:
    if spec.path == "generic":
        from .generic import emit_generic

        return emit_generic(spec)
    raise NotImplementedError(f"path {spec.path!r} has no emitter yet")
