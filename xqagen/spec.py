"""Kernel specifications: the frozen, validated description of one compiled XQA variant.

A :class:`KernelSpec` fixes everything that is a compile-time constant of a kernel (dtypes, head
dim, GQA group, page size, KV layout, query tokens per request, optional features, code path and
tile configuration).  Everything else (batch, number of KV heads, sequence lengths, scales, the
sliding-window size, the split-KV count) is a launch argument.

Tile configurations are plain data: kernel authors register new ones in Python
(:func:`register_tile`) or in a recipe's ``tiles:`` section, never by editing a kernel.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

PATHS = ("generic", "hopper")
Q_DTYPES = ("fp16", "bf16")
KV_DTYPES = ("fp16", "bf16", "e4m3")
OUT_DTYPES = ("fp16", "bf16", "e4m3")
HEAD_DIMS = (64, 128, 256)
PAGE_SIZES = (16, 32, 64, 128)
KV_LAYOUTS = ("NHD", "HND")
MAX_GROUP = 32
MAX_Q_SEQ_LEN = 32
FEATURES = ("sinks", "sliding_window")


class SpecError(ValueError):
    """An invalid kernel specification or tile configuration; names the field and what it allows."""


def _check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise SpecError(f"{owner}.{name} = {value!r} is invalid; allowed values: {', '.join(map(repr, allowed))}")


def _check_int_range(owner: str, name: str, value: Any, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise SpecError(f"{owner}.{name} = {value!r} is invalid; expected an integer in [{lo}, {hi}]")


@dataclass(frozen=True)
class TileConfig:
    """How a CTA walks the KV sequence.

    kv_tile: KV tokens per pipeline stage (a multiple of 16 * warps_kv).
    stages: depth of the cp.async (or TMA) pipeline, in KV tiles.
    warps: warps per CTA; they split the query rows (16 per warp) and the tile's tokens.
    max_rows: most query rows (group * q_seq_len) one CTA holds; larger groups tile over rows.
    warp_rows: most query rows one warp computes (16 or 32): each K/V fragment a warp loads feeds
      that many rows, at the cost of as many accumulators.
    """

    name: str
    kv_tile: int = 64
    stages: int = 3
    warps: int = 4
    max_rows: int = 64
    warp_rows: int = 16

    def __post_init__(self) -> None:
        owner = f"TileConfig({self.name!r})"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise SpecError(f"TileConfig.name = {self.name!r} is invalid; expected an identifier")
        _check_choice(owner, "warps", self.warps, (4, 8))
        _check_choice(owner, "kv_tile", self.kv_tile, (16, 32, 64, 128))
        _check_int_range(owner, "stages", self.stages, 2, 8)
        _check_choice(owner, "max_rows", self.max_rows, (16, 32, 64, 128))
        _check_choice(owner, "warp_rows", self.warp_rows, (16, 32))
        if self.max_rows // self.warp_rows > self.warps:
            raise SpecError(f"{owner}.max_rows = {self.max_rows} needs {self.max_rows // self.warp_rows} warps "
                            f"({self.warp_rows} rows each); warps = {self.warps}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_TILES: dict[str, TileConfig] = {}


def register_tile(tile: TileConfig, *, replace: bool = False) -> TileConfig:
    """Make a tile configuration available by name to specs and recipes."""
    if not isinstance(tile, TileConfig):
        raise SpecError(f"register_tile expects a TileConfig, got {type(tile).__name__}")
    known = _TILES.get(tile.name)
    if known is not None and known != tile and not replace:
        raise SpecError(f"tile {tile.name!r} is already registered as {known}; pass replace=True to redefine it")
    _TILES[tile.name] = tile
    return tile


def get_tile(name: str) -> TileConfig:
    try:
        return _TILES[name]
    except KeyError:
        raise SpecError(f"unknown tile configuration {name!r}; registered: {', '.join(sorted(_TILES))}") from None


def tiles() -> dict[str, TileConfig]:
    return dict(_TILES)


# Shipped configurations (see default_tile); `deep` trades residency for a longer pipeline, and
# `split` is what xqagen.dispatch picks for batches too small to fill the GPU without split-KV.
register_tile(TileConfig("decode", kv_tile=64, stages=3, warps=4, max_rows=64))
register_tile(TileConfig("decode_fp8", kv_tile=64, stages=3, warps=4, max_rows=64, warp_rows=32))
register_tile(TileConfig("many_rows", kv_tile=64, stages=2, warps=4, max_rows=64))
register_tile(TileConfig("deep", kv_tile=64, stages=5, warps=4, max_rows=64))
register_tile(TileConfig("wide_head", kv_tile=64, stages=2, warps=4, max_rows=64))
register_tile(TileConfig("split", kv_tile=128, stages=3, warps=8, max_rows=64))


def default_tile(head_dim: int, kv_dtype: str, rows: int = 1) -> TileConfig:
    """The shipped tile of a variant with ``rows`` query rows per KV head (group * q_seq_len);
    H100 measurements in docs/benchmarks.md.

    - fp8 KV: `decode_fp8`, whose warps take 32 rows each where there are that many, so that every
      K/V fragment is converted from fp8 once for 32 rows (group 32: 0.398 against 0.457 ms).
    - 16-bit head_dim 256: `wide_head`, 2 stages, since a 64-token stage is 64 KiB.
    - 16-bit KV and more than 32 rows (speculative decoding): `many_rows`, 2 stages (q_seq_len 8:
      0.367 against 0.377 ms).
    - Otherwise `decode`: 3 stages of 64 tokens.
    """
    if kv_dtype == "e4m3":
        return get_tile("decode_fp8")
    if head_dim > 128:
        return get_tile("wide_head")
    return get_tile("many_rows" if rows > 32 else "decode")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant.  Construct with keyword arguments; invalid values raise SpecError."""

    q_dtype: str
    kv_dtype: str
    head_dim: int
    group: int
    page_size: int
    out_dtype: str | None = None  # defaults to q_dtype
    kv_layout: str = "NHD"
    q_seq_len: int = 1
    features: frozenset = field(default_factory=frozenset)
    path: str = "generic"
    tile: TileConfig | str | None = None  # None: default_tile(head_dim, kv_dtype, rows)

    def __post_init__(self) -> None:
        owner = "KernelSpec"
        _check_choice(owner, "path", self.path, PATHS)
        _check_choice(owner, "q_dtype", self.q_dtype, Q_DTYPES)
        _check_choice(owner, "kv_dtype", self.kv_dtype, KV_DTYPES)
        if self.out_dtype is None:
            object.__setattr__(self, "out_dtype", self.q_dtype)
        _check_choice(owner, "out_dtype", self.out_dtype, OUT_DTYPES)
        _check_choice(owner, "head_dim", self.head_dim, HEAD_DIMS)
        _check_int_range(owner, "group", self.group, 1, MAX_GROUP)
        _check_choice(owner, "page_size", self.page_size, PAGE_SIZES)
        _check_choice(owner, "kv_layout", self.kv_layout, KV_LAYOUTS)
        _check_int_range(owner, "q_seq_len", self.q_seq_len, 1, MAX_Q_SEQ_LEN)
        if self.tile is None:
            object.__setattr__(self, "tile", default_tile(self.head_dim, self.kv_dtype, self.group * self.q_seq_len))
        elif isinstance(self.tile, str):
            object.__setattr__(self, "tile", get_tile(self.tile))
        if not isinstance(self.tile, TileConfig):
            raise SpecError(f"KernelSpec.tile = {self.tile!r} is invalid; expected a TileConfig or a registered name")
        features = frozenset(self.features)
        for f in features:
            _check_choice(owner, "features", f, FEATURES)
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
        if self.path == "hopper" and self.kv_dtype != "e4m3":
            raise SpecError("KernelSpec.path = 'hopper' is invalid with a 16-bit KV cache; the Hopper path is fp8-KV only")
        if self.tile.kv_tile % 16:
            raise SpecError(f"KernelSpec.tile.kv_tile = {self.tile.kv_tile} must be a multiple of 16")

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

    def to_dict(self) -> dict:
        return {
            "path": self.path, "q_dtype": self.q_dtype, "kv_dtype": self.kv_dtype, "out_dtype": self.out_dtype,
            "head_dim": self.head_dim, "group": self.group, "page_size": self.page_size,
            "kv_layout": self.kv_layout, "q_seq_len": self.q_seq_len, "features": sorted(self.features),
            "tile": self.tile.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KernelSpec":
        d = dict(d)
        tile = d.pop("tile", None)
        if isinstance(tile, Mapping):
            tile = TileConfig(**tile)
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
                f"_p{self.page_size}_{self.kv_layout.lower()}_s{self.q_seq_len}{feats}_{self.tile.name}"
                f"_{self.content_hash[:8]}")
