"""PyTorch, for the modules that launch kernels or work on tensors.

Generating and compiling kernels does not need torch, so it is an optional dependency; this
module turns its absence into one message that says how to install it.
"""

try:
    import torch
except ModuleNotFoundError as err:
    if err.name != "torch":
        raise
    raise ModuleNotFoundError(
        "xqagen's launch API needs PyTorch, which is not installed: pip install 'xqagen[torch]' "
        "(or the torch build you serve with); generate, build and list work without it",
        name="torch") from None

__all__ = ["torch"]
