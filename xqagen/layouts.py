"""The two page-pool layouts, in one place for the API, the reference and the FlashInfer layer.

A page pool is 4-D: ``[num_pages, page_size, num_kv_heads, head_dim]`` ("NHD", as vLLM keeps it)
or ``[num_pages, num_kv_heads, page_size, head_dim]`` ("HND", as FlashInfer can).  Kernels read
either through strides, so the layout is a launch argument, not part of a kernel's identity.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_LAYOUT_NAMES = ("NHD", "HND")


@dataclass(frozen=True)
class KvLayout:
    name: str
    token_dim: int  # the dimension that holds a page's tokens
    head_dim_index: int  # the dimension that holds the KV heads

    @property
    def dims(self) -> str:
        """The pool's dimensions, for messages."""
        names = ["num_pages", "", "", "head_dim"]
        names[self.token_dim], names[self.head_dim_index] = "page_size", "num_kv_heads"
        return f"[{', '.join(names)}]"

    def shape(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
        shape = [num_pages, 0, 0, head_dim]
        shape[self.token_dim], shape[self.head_dim_index] = page_size, num_kv_heads
        return tuple(shape)

    def page_size(self, shape) -> int:
        return shape[self.token_dim]

    def num_kv_heads(self, shape) -> int:
        return shape[self.head_dim_index]

    def strides(self, pool) -> tuple[int, int, int]:
        """(page, token, head) strides of a pool tensor, in elements."""
        return pool.stride(0), pool.stride(self.token_dim), pool.stride(self.head_dim_index)

    def heads_pages_tokens(self, blocks):
        """Gathered pages ``[pages, ...]`` of this layout as ``[num_kv_heads, pages, page_size, head_dim]``."""
        return blocks.permute(self.head_dim_index, 0, self.token_dim, 3)


LAYOUTS = {"NHD": KvLayout("NHD", token_dim=1, head_dim_index=2), "HND": KvLayout("HND", token_dim=2, head_dim_index=1)}


def kv_layout(name: object) -> KvLayout:
    """The layout named ``name``; ``ValueError`` naming ``kv_layout`` otherwise."""
    layout = LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise ValueError(f"kv_layout: expected 'NHD' or 'HND', got {name!r}")
    return layout
