"""xqagen: generate, compile and launch XQA decode-attention kernels written with CuTe."""

from .spec import KernelSpec, SpecError

__all__ = ["KernelSpec", "SpecError"]
__version__ = "0.1.0"
