"""Kernel specifications: the frozen, validated description of one compiled XQA variant.

A :class:`KernelSpec` fixes everything that is a compile-time constant of a kernel and nothing
else: dtypes, head dim, GQA group, page size, query tokens per request, optional features, the
kernel path and the path's tile configuration.  Everything else (batch, number of KV heads, the
KV layout and strides, sequence lengths, scales, the sliding-window size, the split-KV count) is
a launch argument.

Each path (``xqagen.emitters``) owns its tile type and catalogue; a spec names a shipped tile, or
carries a tile object or a mapping of tile fields (a recipe's ``tiles:`` section, a kernel
author's experiment), never a global registry entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

Q_DTYPES = ("fp16", "bf16")
KV_DTYPES = ("fp16", "bf16", "e4m3")
OUT_DTYPES = ("fp16", "bf16", "e4m3")
# Every multiple of 16 from 32 to 256 (FlashInfer's range): a row of head_dim elements is a whole
# number of 16-byte chunks in either KV dtype and of 16-wide MMA k-steps.
HEAD_DIMS = tuple(range(32, 257, 16))
HEAD_DIMS_RULE = "a multiple of 16 in [32, 256]"
PAGE_SIZES = (16, 32, 64, 128)
MAX_GROUP = 32
MAX_Q_SEQ_LEN = 32
FEATURES = ("sinks", "sliding_window", "ragged_q", "fp8_mma")


class SpecError(ValueError):
    """An invalid kernel specification or tile configuration; names the field and what it allows."""


def check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise SpecError(f"{owner}.{name} = {value!r} is invalid; allowed values: {', '.join(map(repr, allowed))}")


def check_head_dim(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value not in HEAD_DIMS:
        raise SpecError(f"{owner}.{name} = {value!r} is invalid; expected {HEAD_DIMS_RULE}")


def check_int_range(owner: str, name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SpecError(f"{owner}.{name} = {value!r} is invalid; expected an integer in [{lo}, {hi}]")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant.  Construct with keyword arguments; invalid values raise SpecError."""

    q_dtype: str
    kv_dtype: str
    head_dim: int
    group: int
    page_size: int
    out_dtype: str | None = None  # defaults to q_dtype
    q_seq_len: int = 1
    features: frozenset = field(default_factory=frozenset)
    path: str = "generic"
    tile: Any = None  # the path's tile, a shipped tile's name or a mapping of tile fields; None: the path's default

    def __post_init__(self) -> None:
        from xqagen.emitters import PATHS  # the paths' modules import this one

        owner = "KernelSpec"
        check_choice(owner, "path", self.path, tuple(PATHS))
        check_choice(owner, "q_dtype", self.q_dtype, Q_DTYPES)
        check_choice(owner, "kv_dtype", self.kv_dtype, KV_DTYPES)
        if self.out_dtype is None:
            object.__setattr__(self, "out_dtype", self.q_dtype)
        check_choice(owner, "out_dtype", self.out_dtype, OUT_DTYPES)
        check_head_dim(owner, "head_dim", self.head_dim)
        check_int_range(owner, "group", self.group, 1, MAX_GROUP)
        check_choice(owner, "page_size", self.page_size, PAGE_SIZES)
        check_int_range(owner, "q_seq_len", self.q_seq_len, 1, MAX_Q_SEQ_LEN)
        features = frozenset(self.features)
        for f in features:
            check_choice(owner, "features", f, FEATURES)
        object.__setattr__(self, "features", features)
        if self.kv_dtype in ("fp16", "bf16") and self.kv_dtype != self.q_dtype:
            raise SpecError(f"KernelSpec.kv_dtype = {self.kv_dtype!r} is invalid with q_dtype = {self.q_dtype!r}; "
                            f"a 16-bit KV cache must have the query's dtype, or use 'e4m3'")
        if self.out_dtype == "e4m3" and self.kv_dtype != "e4m3":
            raise SpecError("KernelSpec.out_dtype = 'e4m3' is invalid with a 16-bit KV cache; "
                            "fp8 output needs kv_dtype = 'e4m3'")
        if self.out_dtype not in ("e4m3", self.q_dtype):
            raise SpecError(f"KernelSpec.out_dtype = {self.out_dtype!r} is invalid with q_dtype = {self.q_dtype!r}; "
                            f"allowed: {self.q_dtype!r} or 'e4m3'")
        path = PATHS[self.path]
        tile = path.default_tile(self) if self.tile is None else path.tile(self.tile)
        object.__setattr__(self, "tile", tile)
        reason = path.unsupported(self)
        if reason:
            raise SpecError(f"KernelSpec: the {self.path} path cannot implement this variant: {reason}")

    # ---- derived, compile-time facts the emitters and launchers share ----
    @property
    def rows(self) -> int:
        """Query rows per (request, KV head): group * q_seq_len."""
        return self.group * self.q_seq_len

    @property
    def has_mask(self) -> bool:
        """Speculative decoding (q_seq_len > 1) always takes the packed mask, as in FlashInfer."""
        return self.q_seq_len > 1

    @property
    def sinks(self) -> bool:
        return "sinks" in self.features

    @property
    def sliding_window(self) -> bool:
        return "sliding_window" in self.features

    @property
    def ragged_q(self) -> bool:
        """Each request its own number of query tokens (q_cu_seq_lens), at most q_seq_len."""
        return "ragged_q" in self.features

    def to_dict(self) -> dict:
        return {
            "path": self.path, "q_dtype": self.q_dtype, "kv_dtype": self.kv_dtype, "out_dtype": self.out_dtype,
            "head_dim": self.head_dim, "group": self.group, "page_size": self.page_size,
            "q_seq_len": self.q_seq_len, "features": sorted(self.features),
            "tile": self.tile.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KernelSpec":
        d = dict(d)
        tile = d.pop("tile", None)
        fields = dataclasses.fields(cls)
        unknown = set(d) - {f.name for f in fields}
        if unknown:
            raise SpecError(f"KernelSpec has no field(s) {sorted(unknown)}; fields: "
                            f"{', '.join(f.name for f in fields)}")
        missing = [f.name for f in fields if f.name not in d and f.name != "tile"
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise SpecError(f"KernelSpec needs field(s) {', '.join(missing)}")
        return cls(tile=tile, **{**d, "features": frozenset(d.get("features", ()))})

    @property
    def content_hash(self) -> str:
        """Stable over Python runs and machines: a digest of the canonical JSON of the spec."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def name(self) -> str:
        """Readable and unique: every field that distinguishes variants, then a short hash."""
        feats = "".join(f"_{f}" for f in sorted(self.features))
        out = "" if self.out_dtype == self.q_dtype else f"_o{self.out_dtype}"
        return (f"xqa_{self.path}_q{self.q_dtype}_kv{self.kv_dtype}{out}_d{self.head_dim}_g{self.group}"
                f"_p{self.page_size}_s{self.q_seq_len}{feats}_{self.tile.name}"
                f"_{self.content_hash[:8]}")
