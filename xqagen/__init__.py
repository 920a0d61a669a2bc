"""xqagen: generate, compile and launch XQA decode-attention kernels written with CuTe."""

from .spec import KernelSpec, SpecError, TileConfig, get_tile, register_tile

__all__ = ["KernelSpec", "SpecError", "TileConfig", "get_tile", "register_tile"]
__version__ = "0.1.0"
