"""Emitters: render a KernelSpec into CuTe C++ source (importable as ``xqagen.emitters``).

``PATHS`` is the registry of kernel paths (:class:`~xqagen.emitters.path.KernelPath`); everything
outside this package asks a path, never a path's plan or tile class.  A new path is one module
beside ``generic.py``, its templates, and one line here.
"""

from __future__ import annotations

from collections.abc import Mapping

from .generic import GenericPath
from .hopper import HopperPath
from .path import EmittedKernel, KernelPath, LaunchShape, WorkspaceSize

PATHS: Mapping[str, KernelPath] = {path.name: path for path in (GenericPath(), HopperPath())}

__all__ = ["PATHS", "EmittedKernel", "KernelPath", "LaunchShape", "WorkspaceSize", "emit", "path_of"]


def path_of(spec) -> KernelPath:
    """The path that emits and launches ``spec``."""
    return PATHS[spec.path]


def emit(spec) -> EmittedKernel:
    return path_of(spec).emit(spec)
