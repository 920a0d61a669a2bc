"""GPU correctness grid: every kernel variant against the float64 reference on fresh random data.

Skipped without a CUDA GPU.  Outputs are poisoned with NaN before each launch, sequence lengths are
not multiples of the page or the KV tile, page tables are shuffled, and every feature is combined
with the others.  All variants the grid needs are compiled up front in parallel processes.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import pytest
import torch

from xqagen.api import TORCH_DTYPES
from xqagen.masks import causal_mask, random_tree_mask
from xqagen.reference import FP8_VALUE_SCALE, make_paged_kv, relative_l2_error, xqa_reference
from xqagen.spec import HEAD_DIMS

pytestmark = pytest.mark.gpu

# Relative L2 error bounds (issue contract): bf16/fp16 rounding of the output and of P.
# The fp8 MMA mode quantises Q and P to e4m3 (3 mantissa bits): its bound, well above the others,
# is what docs/benchmarks.md documents for it.
TOLERANCE = {"16bit": 5e-3, "fp8": 1e-2, "fp8_out": 4e-2, "fp8_mma": 5e-2}
# The head dims besides 64, 128 and 256: odd multiples of 16 end in a 16-wide MMA step, and rows
# that are not powers of two take a swizzle over fewer than 8 chunks.
NEW_HEAD_DIMS = tuple(d for d in HEAD_DIMS if d not in (64, 128, 256))


@dataclass(frozen=True)
class Case:
    q_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    out_dtype: str | None = None
    head_dim: int = 128
    group: int = 8
    num_kv_heads: int = 2
    page_size: int = 64
    kv_layout: str = "NHD"
    q_seq_len: int = 1
    mask: str = "causal"  # causal | tree (q_seq_len > 1)
    sinks: bool = False
    window: int = 0
    seq_lens: tuple[int, ...] = (1000, 77, 4133)
    num_splits: int | None = None
    tile: str | None = None  # None: the one xqagen.plan chooses for the shape
    path: str = "generic"
    fp8_mma: bool = False  # the opt-in fp8 MMA mode (Hopper path)

    @property
    def id(self) -> str:
        fields = [] if self.path == "generic" else [self.path]
        fields += [f"q{self.q_dtype}", f"kv{self.kv_dtype}", f"d{self.head_dim}", f"g{self.group}",
                  f"p{self.page_size}", self.kv_layout, f"s{self.q_seq_len}"]
        if self.out_dtype:
            fields.append(f"o{self.out_dtype}")
        if self.q_seq_len > 1:
            fields.append(self.mask)
        if self.sinks:
            fields.append("sinks")
        if self.window:
            fields.append(f"win{self.window}")
        fields.append(f"b{len(self.seq_lens)}max{max(self.seq_lens)}")
        if self.num_splits:
            fields.append(f"split{self.num_splits}")
        if self.tile:
            fields.append(self.tile)
        if self.fp8_mma:
            fields.append("fp8mma")
        return "-".join(fields)

    def spec(self):
        from xqagen.spec import KernelSpec

        features = {"sinks"} if self.sinks else set()
        if self.window:
            features.add("sliding_window")
        if self.fp8_mma:
            features.add("fp8_mma")
        return KernelSpec(q_dtype=self.q_dtype, kv_dtype=self.kv_dtype, out_dtype=self.out_dtype,
                          head_dim=self.head_dim, group=self.group, page_size=self.page_size,
                          q_seq_len=self.q_seq_len, features=frozenset(features), path=self.path, tile=self.tile)

    def launched_spec(self, sm_count: int):
        """The variant xqa_decode runs for this case (xqagen.plan applied to its shape)."""
        from xqagen.emitters import LaunchShape
        from xqagen.plan import plan_launch

        page_capacity = -(-max(self.seq_lens) // self.page_size) * self.page_size  # make_paged_kv's table
        kv_len = min(page_capacity, self.window) if self.window else page_capacity
        shape = LaunchShape(len(self.seq_lens), self.num_kv_heads, kv_len, sm_count)
        return plan_launch(self.spec(), shape, tile_given=self.tile is not None).spec


BASE = Case()
# One axis at a time from the base case ...
AXES = {
    "dtypes": [dict(q_dtype="fp16", kv_dtype="fp16"), dict(kv_dtype="e4m3"), dict(q_dtype="fp16", kv_dtype="e4m3"),
               dict(kv_dtype="e4m3", out_dtype="e4m3")],
    "layout": [dict(kv_layout="HND"), dict(kv_layout="HND", kv_dtype="e4m3")],
    "page": [dict(page_size=p) for p in (16, 32, 128)] + [dict(page_size=16, kv_dtype="e4m3")],
    "head_dim": [dict(head_dim=64), dict(head_dim=256), dict(head_dim=64, kv_dtype="e4m3"),
                 dict(head_dim=256, kv_dtype="e4m3")],
    "group": [dict(group=g) for g in (1, 4, 5, 16, 32)] + [dict(group=5, kv_dtype="e4m3")],
    "lengths": [dict(seq_lens=(1,)), dict(seq_lens=(37,)), dict(seq_lens=(20011,)),
                dict(seq_lens=(1, 2, 3, 65, 129)), dict(seq_lens=(33000, 5), num_splits=None)],
    "splits": [dict(num_splits=s, seq_lens=(5000, 300, 1)) for s in (2, 7, 16)],
    "specdec": [dict(q_seq_len=s, mask=m, seq_lens=(900, 33, 4000)) for s, m in
                ((2, "causal"), (4, "tree"), (7, "tree"), (8, "causal"), (13, "tree"), (32, "causal"))],
    "new_head_dims": [dict(head_dim=d, **change) for d, change in (
        (32, dict()), (32, dict(kv_dtype="e4m3")), (48, dict(kv_dtype="e4m3")),
        (48, dict(q_dtype="fp16", kv_dtype="fp16", num_splits=3)),
        (48, dict(tile="split", num_splits=7, seq_lens=(9000, 1, 200))),
        (80, dict()), (80, dict(kv_dtype="e4m3", kv_layout="HND", page_size=16)),
        (96, dict(kv_dtype="e4m3", out_dtype="e4m3")), (96, dict(q_dtype="fp16", kv_dtype="fp16", q_seq_len=4, mask="tree")),
        (112, dict(kv_dtype="e4m3", group=32)), (112, dict(kv_layout="HND", sinks=True, window=1000)),
        (144, dict(num_splits=7, seq_lens=(5000, 300, 1))),
        (144, dict(q_dtype="fp16", kv_dtype="e4m3", seq_lens=(20011,))),  # dispatched to the split tile
        (144, dict(kv_dtype="e4m3", group=32, sinks=True)),  # the widest fp8 rows with 32-row warps
        (160, dict(kv_dtype="e4m3", q_seq_len=8, mask="causal", sinks=True)),
        (176, dict(group=5, page_size=128)), (176, dict(kv_dtype="e4m3", tile="split", seq_lens=(9000, 130))),
        (192, dict(group=16, num_splits=2)), (208, dict(kv_dtype="e4m3", group=4, window=300, num_splits=4)),
        (224, dict(q_dtype="fp16", kv_dtype="fp16", seq_lens=(33000, 5))),
        (240, dict(kv_dtype="e4m3", seq_lens=(1, 2, 3, 65, 129))),
        (240, dict(q_seq_len=13, mask="tree", seq_lens=(900, 33, 4000))))],
    "sinks": [dict(sinks=True), dict(sinks=True, kv_dtype="e4m3", head_dim=64)],
    "window": [dict(window=w) for w in (1, 128, 1000, 5000)],
    # The split tile (8 warps, 128-token stages) that small batches of long sequences dispatch to,
    # forced here on every feature; seq_lens (20011,) and (33000, 5) above reach it by dispatch.
    "split_tile": [dict(tile="split", **change) for change in (
        dict(), dict(kv_dtype="e4m3", seq_lens=(9000, 130)), dict(kv_dtype="e4m3", out_dtype="e4m3"),
        dict(kv_layout="HND", page_size=16), dict(page_size=128, kv_dtype="e4m3", kv_layout="HND"),
        dict(head_dim=64, sinks=True, window=1000), dict(head_dim=256, kv_dtype="e4m3"),
        dict(group=5), dict(group=32, kv_dtype="e4m3"), dict(group=16, q_seq_len=8, mask="tree"),
        dict(q_seq_len=4, mask="tree", kv_dtype="e4m3", sinks=True, window=300),
        dict(q_seq_len=13, mask="tree", seq_lens=(20000,)), dict(num_splits=7, seq_lens=(9000, 1, 200)),
        dict(seq_lens=(70000,), kv_dtype="e4m3"))],
}
SINGLE_AXIS = [replace(BASE, **change) for changes in AXES.values() for change in changes]


def _combinations(count: int, seed: int = 2026, head_dims: tuple[int, ...] = (64, 128, 256)) -> list[Case]:
    """... and a seeded sample of cases that combine every feature with the others."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        kv_dtype = rng.choice(["bf16", "fp16", "e4m3"])
        q_dtype = kv_dtype if kv_dtype != "e4m3" else rng.choice(["bf16", "fp16"])
        q_seq_len = rng.choice([1, 1, 3, 4, 8])
        cases.append(Case(
            q_dtype=q_dtype, kv_dtype=kv_dtype,
            out_dtype="e4m3" if kv_dtype == "e4m3" and rng.random() < 0.25 else None,
            head_dim=rng.choice(head_dims), group=rng.choice([1, 4, 5, 8, 16]),
            num_kv_heads=rng.choice([1, 2, 3]), page_size=rng.choice([16, 32, 64, 128]),
            kv_layout=rng.choice(["NHD", "HND"]), q_seq_len=q_seq_len, mask=rng.choice(["causal", "tree"]),
            sinks=rng.random() < 0.5, window=rng.choice([0, 0, 17, 300]),
            seq_lens=tuple(rng.randint(q_seq_len, 3000) for _ in range(rng.randint(1, 4))),
            num_splits=rng.choice([None, None, 1, 3, 8]),
        ))
    return cases


# The Hopper path (sm_90 only) over the same axes (the new head dims included), combinations of its
# own, and two consumer warpgroups taking alternate tiles on every feature.
HOPPER_CASES = [replace(case, path="hopper") for case in SINGLE_AXIS if case.tile is None] + [
    replace(case, path="hopper") for case in _combinations(16, seed=90)] + [
    replace(case, path="hopper") for case in _combinations(8, seed=91, head_dims=NEW_HEAD_DIMS)] + [
    replace(BASE, path="hopper", tile=tile, **change) for tile, change in (
        ("tma4x2", dict()), ("tma4x2", dict(kv_dtype="e4m3", seq_lens=(9000, 130, 1, 64))),
        ("tma6x2", dict(kv_dtype="e4m3", out_dtype="e4m3", page_size=16, kv_layout="HND")),
        ("tma2x2", dict(head_dim=256, kv_dtype="e4m3", seq_lens=(3001, 65))),
        ("tma4x2", dict(q_seq_len=4, mask="tree", kv_dtype="e4m3", sinks=True, window=300, num_splits=3)),
        ("tma2x2", dict(group=32, q_seq_len=2, mask="causal", seq_lens=(20000, 3), num_splits=5)),
        ("tma4x2", dict(group=5, kv_dtype="e4m3", head_dim=64, seq_lens=(127,))),
        # one consumer warpgroup holds 64 rows: a full row tile, two of them, and partial ones
        ("tma4x1", dict(q_seq_len=8, mask="tree", kv_dtype="e4m3", seq_lens=(900, 33, 4000))),
        ("tma6x1", dict(q_seq_len=13, mask="tree", kv_dtype="e4m3", sinks=True, window=300, num_splits=3,
                        seq_lens=(900, 33, 4000))),
        ("tma2x1", dict(q_seq_len=8, mask="causal", sinks=True, head_dim=96, kv_layout="HND", page_size=16)),
        ("tma3x1", dict(group=16, q_seq_len=4, mask="tree", kv_dtype="e4m3", out_dtype="e4m3", num_splits=5,
                        seq_lens=(20000, 5))),
        ("tma4x1", dict(group=5, q_seq_len=8, mask="tree", head_dim=64, window=17, seq_lens=(8, 9, 65, 129))),
        # a producer warpgroup gives its registers to two consumer warpgroups of 64 rows each
        ("tma4x2r", dict(q_seq_len=8, mask="tree", kv_dtype="e4m3", seq_lens=(900, 33, 4000))),
        ("tma6x2r", dict(q_seq_len=13, mask="tree", kv_dtype="e4m3", sinks=True, window=300, num_splits=3,
                         seq_lens=(900, 33, 4000))),
        ("tma2x2r", dict(q_seq_len=8, mask="causal", sinks=True, head_dim=96, kv_layout="HND", page_size=16)),
        ("tma4x2r", dict(group=16, q_seq_len=4, mask="tree", kv_dtype="e4m3", out_dtype="e4m3", num_splits=5,
                         seq_lens=(20000, 5))),
        ("tma6x2r", dict(group=5, q_seq_len=8, mask="tree", head_dim=64, window=17, seq_lens=(8, 9, 65, 129))),
        ("tma4x2r", dict(head_dim=256, kv_dtype="e4m3", seq_lens=(3001, 1))),  # d256 beside the register split
        ("tma6x2r", dict(kv_dtype="e4m3", seq_lens=(33000, 64), num_splits=None)))] + [
    # full grids of 8 KV heads, as dispatch tiles them on the H200: two stages and one consumer
    # warpgroup for short KV ranges, four stages beyond 8k tokens
    replace(BASE, path="hopper", kv_dtype=kv_dtype, num_kv_heads=8, q_seq_len=q_seq_len, mask="tree",
            seq_lens=tuple(1 + (i * 7919) % longest for i in range(34)))
    for kv_dtype, q_seq_len, longest in (("e4m3", 1, 8000), ("e4m3", 4, 3000), ("bf16", 1, 8000), ("e4m3", 1, 8300))]
# The cp.async producer (tiles "cpa..."): pages of 16 to 128 tokens, HND, padded head dims, sequence
# ends inside and outside a page, splits, row tiles, and both wgmma forms that read K or V from
# shared memory (16-bit KV, the fp8 MMA mode).
CP_ASYNC_CASES = [replace(BASE, path="hopper", tile=tile, **change) for tile, change in (
    ("cpa4x2", dict()), ("cpa4x2", dict(kv_dtype="e4m3", seq_lens=(9000, 130, 1, 64))),
    ("cpa6x2", dict(kv_dtype="e4m3", out_dtype="e4m3", page_size=16, kv_layout="HND")),
    ("cpa2x1", dict(kv_dtype="e4m3", head_dim=64, group=5, page_size=32, seq_lens=(127, 1, 64))),
    ("cpa2x1", dict(q_seq_len=8, mask="causal", sinks=True, head_dim=96, kv_layout="HND", page_size=16)),
    ("cpa2x1", dict(kv_dtype="e4m3", page_size=128, num_splits=3, seq_lens=(3001, 129, 2))),
    ("cpa4x2", dict(q_seq_len=13, mask="tree", kv_dtype="e4m3", sinks=True, window=300, num_splits=3,
                    seq_lens=(900, 33, 4000))),
    ("cpa2x1", dict(q_seq_len=8, mask="tree", seq_lens=(900, 33, 4000))),
    ("cpa4x2", dict(head_dim=256, kv_dtype="e4m3", seq_lens=(3001, 65))),
    ("cpa6x2", dict(kv_dtype="e4m3", seq_lens=(33000, 64), num_splits=None)),
    ("cpa4x2", dict(kv_dtype="e4m3", fp8_mma=True, q_seq_len=4, mask="tree", seq_lens=(900, 33, 4000))))]
# The opt-in fp8 MMA mode (Q and P in e4m3, 8-bit wgmmas) over the Hopper path's features and tiles.
FP8_MMA_CASES = [replace(BASE, path="hopper", kv_dtype="e4m3", fp8_mma=True, **change) for change in (
    dict(), dict(q_dtype="fp16", group=1, seq_lens=(1, 2, 3, 65, 129)), dict(seq_lens=(33000, 64)),
    dict(q_seq_len=4, mask="tree"), dict(q_seq_len=4, mask="tree", sinks=True, tile="tma4x2"),
    dict(q_seq_len=8, mask="tree", tile="tma6x2r"),
    dict(q_seq_len=8, mask="causal", tile="tma4x2r", seq_lens=(900, 33, 4000)),
    dict(q_seq_len=13, mask="tree", sinks=True, window=300, num_splits=3, seq_lens=(900, 33, 4000)),
    dict(q_seq_len=4, mask="tree", group=16, num_splits=5, seq_lens=(20000, 5), tile="tma2x1"),
    dict(head_dim=64, group=5, sinks=True, seq_lens=(127, 1, 64)), dict(head_dim=256, seq_lens=(3001, 65)),
    dict(head_dim=96, window=17, tile="tma4x1"), dict(page_size=16, kv_layout="HND", out_dtype="e4m3"),
    dict(group=32, num_splits=7, tile="tma2x2"))]
CASES = (SINGLE_AXIS + _combinations(24) + _combinations(16, seed=2027, head_dims=NEW_HEAD_DIMS) + HOPPER_CASES
         + CP_ASYNC_CASES + FP8_MMA_CASES)

# The accuracy matrix of the Hopper path: every pair of values of any two of these axes in some case
# (tests/covering.py), each case held to the bounds (TOLERANCE_CONTRACT).
MATRIX_DTYPES = {"bf16": dict(q_dtype="bf16", kv_dtype="bf16"), "fp16": dict(q_dtype="fp16", kv_dtype="fp16"),
                 "bf16-e4m3": dict(q_dtype="bf16", kv_dtype="e4m3"), "fp16-e4m3": dict(q_dtype="fp16", kv_dtype="e4m3")}
MATRIX_ROWS = {"s1": dict(q_seq_len=1), "s2-causal": dict(q_seq_len=2, mask="causal"),
               "s4-tree": dict(q_seq_len=4, mask="tree"), "s8-tree": dict(q_seq_len=8, mask="tree"),
               "s13-causal": dict(q_seq_len=13, mask="causal")}
MATRIX_AXES = {
    "dtypes": tuple(MATRIX_DTYPES), "rows": tuple(MATRIX_ROWS), "head_dim": (32, 64, 96, 128, 176, 256),
    "group": (1, 4, 5, 8, 16), "page_size": (16, 32, 64, 128), "kv_layout": ("NHD", "HND"), "sinks": (False, True),
    "window": (0, 17, 300), "num_splits": (None, 1, 3, 8), "num_kv_heads": (1, 2, 3),
    "seq_lens": ((1000, 77, 4133), (37,), (1, 2, 3, 65, 129), (20011,), (13, 300, 64, 2000)),
    "tile": (None, "tma2x1", "tma4x1", "tma4x2", "tma2x2r", "tma4x2r"),
}
TOLERANCE_CONTRACT = {"16bit": 3e-3, "fp8": 5e-3}


def _matrix_case(values: dict) -> Case:
    fields = {k: v for k, v in values.items() if k not in ("dtypes", "rows")}
    return Case(path="hopper", **MATRIX_DTYPES[values["dtypes"]], **MATRIX_ROWS[values["rows"]], **fields)


def _matrix_case_runs(values: dict) -> bool:
    """Whether the case is one xqa_decode takes on the Hopper path: its variant fits shared memory,
    and every request is at least q_seq_len long (shorter ones are padding, tested apart)."""
    return _matrix_variant_runs(values["dtypes"], values["rows"], values["head_dim"], values["group"],
                                values["tile"], min(values["seq_lens"]))


@functools.lru_cache(maxsize=None)
def _matrix_variant_runs(dtypes, rows, head_dim, group, tile, shortest) -> bool:
    from xqagen.emitters.hopper import plan_of
    from xqagen.spec import SpecError

    case = Case(path="hopper", **MATRIX_DTYPES[dtypes], **MATRIX_ROWS[rows], head_dim=head_dim, group=group, tile=tile)
    if shortest < case.q_seq_len:
        return False
    try:
        plan_of(case.spec())
    except SpecError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def matrix_values() -> tuple[dict, ...]:
    from covering import pairwise

    return tuple(pairwise(MATRIX_AXES, _matrix_case_runs, seed=11, candidates=20))


MATRIX = [_matrix_case(values) for values in matrix_values()]


def _compile_one(spec_dict: dict) -> str:
    from xqagen.compiler import compile_kernel
    from xqagen.emitters import path_of
    from xqagen.spec import KernelSpec

    spec = KernelSpec.from_dict(spec_dict)
    path = path_of(spec)
    emitted = path.emit(spec)
    compile_kernel(emitted.source, emitted.kernel_name, path.target_arch(os.environ["XQAGEN_TEST_DEVICE_ARCH"]))
    return spec.name


def launched_specs(items, sm_count: int, arch: str) -> set:
    """The variants that the selected tests' grid cases launch on a GPU of ``arch``: the ``case``
    parameters that are Cases (other modules name other things ``case``), less the PTX test's, which
    builds its own, and less those whose path does not run on ``arch``."""
    from xqagen.emitters import path_of

    selected = [case for item in items
                if isinstance(case := getattr(getattr(item, "callspec", None), "params", {}).get("case"), Case)
                and item.originalname != "test_sm80_code_path_through_ptx_jit"]
    return {spec for spec in (case.launched_spec(sm_count) for case in selected) if path_of(spec).target_arch(arch)}


@pytest.fixture(scope="session", autouse=True)
def precompiled(request):
    """Compile the variants of the selected grid cases in parallel processes (the cubin cache serves
    the tests)."""
    if not torch.cuda.is_available():
        return
    from xqagen.runtime import device_arch

    os.environ["XQAGEN_TEST_DEVICE_ARCH"] = arch = device_arch(torch.device("cuda"))
    specs = launched_specs(request.session.items, torch.cuda.get_device_properties(0).multi_processor_count, arch)
    spawn = multiprocessing.get_context("spawn")  # CUDA is initialised here: never fork
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1), mp_context=spawn) as pool:
        list(pool.map(_compile_one, [spec.to_dict() for spec in specs]))


def _inputs(case: Case, seed: int):
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = len(case.seq_lens)
    num_q_heads = case.num_kv_heads * case.group
    kv_dtype = TORCH_DTYPES[case.kv_dtype]
    k_cache, v_cache, page_table = make_paged_kv(batch, case.seq_lens, case.num_kv_heads, case.head_dim,
                                                 case.page_size, kv_dtype, case.kv_layout, generator=gen,
                                                 device=device)
    q_shape = (batch, 1, num_q_heads, case.head_dim) if case.q_seq_len == 1 else \
        (batch, 1, case.q_seq_len, num_q_heads, case.head_dim)
    q = torch.randn(q_shape, generator=gen, device=device).to(TORCH_DTYPES[case.q_dtype])
    seq_lens = torch.tensor(case.seq_lens, dtype=torch.int32, device=device)
    kwargs = dict(kv_layout=case.kv_layout, q_scale=0.7)
    if case.kv_dtype == "e4m3":
        kwargs["kv_scale"] = 1.3 / FP8_VALUE_SCALE
    if case.out_dtype == "e4m3":
        kwargs["rcp_out_scale"] = 2.0
    if case.sinks:
        kwargs["sinks"] = torch.randn(case.num_kv_heads, case.group, generator=gen, device=device) * 2
    if case.window:
        kwargs["sliding_window"] = case.window
    if case.q_seq_len > 1:
        kwargs["mask"] = (causal_mask(batch, case.q_seq_len, device=device) if case.mask == "causal" else
                          random_tree_mask(batch, case.q_seq_len, generator=torch.Generator().manual_seed(seed)).to(device))
    return q, k_cache, v_cache, page_table, seq_lens, kwargs


def _tolerance(case: Case) -> float:
    if case.fp8_mma:
        return TOLERANCE["fp8_mma"]
    if case.out_dtype == "e4m3":
        return TOLERANCE["fp8_out"]
    return TOLERANCE["fp8"] if case.kv_dtype == "e4m3" else TOLERANCE["16bit"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case: Case, record_property):
    record_property("rel_l2_error", _check_against_reference(case))


def _skip_unless_the_path_runs_here(case: Case) -> None:
    from xqagen.emitters import PATHS
    from xqagen.runtime import device_arch

    if PATHS[case.path].target_arch(device_arch(torch.device("cuda"))) is None:
        pytest.skip(f"the {case.path} path does not run on this GPU")


def _check_against_reference(case: Case, edit_inputs=None) -> float:
    """``edit_inputs(q, kwargs)``, if given, changes the random inputs in place before the launches;
    returns the relative L2 error."""
    from xqagen.api import xqa_decode

    _skip_unless_the_path_runs_here(case)

    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=zlib.crc32(case.id.encode()))
    if edit_inputs is not None:
        edit_inputs(q, kwargs)
    out_dtype = TORCH_DTYPES[case.out_dtype] if case.out_dtype else q.dtype
    ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                        out_dtype=torch.float64, compute_dtype=torch.float64, **kwargs)
    if case.out_dtype == "e4m3":  # the float64 reference leaves out the fp8-only output scale
        ref = (ref * kwargs["rcp_out_scale"]).clamp(-448, 448)
    out = torch.full(q.shape, float("nan"), dtype=torch.float32, device=q.device).to(out_dtype)
    xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=case.num_splits, tile=case.tile,
               path=case.path, fp8_mma=case.fp8_mma, **kwargs)
    torch.cuda.synchronize()
    err = relative_l2_error(out.float(), ref)
    assert err < _tolerance(case), f"relative L2 error {err:.3e} for {case.id}"
    # Each 16-wide block of head_dim on its own, so that a wrong column (a head_dim's last block,
    # the fp8 output-column order) cannot hide in the norm of the others.
    for d0 in range(0, case.head_dim, 16):
        block_err = relative_l2_error(out[..., d0:d0 + 16].float(), ref[..., d0:d0 + 16])
        assert block_err < _tolerance(case), f"relative L2 error {block_err:.3e} in head-dim elements {d0}..{d0 + 15}"
    # The same inputs again: a race shows as a result that moves between launches.
    out2 = torch.full_like(out.float(), float("nan")).to(out_dtype)
    xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out2, num_splits=case.num_splits, tile=case.tile,
               path=case.path, fp8_mma=case.fp8_mma, **kwargs)
    assert torch.equal(out.view(torch.uint8), out2.view(torch.uint8)), "non-deterministic output"
    _assert_semaphores_at_zero(q.device)
    return err


def _assert_semaphores_at_zero(device):
    """Every launch leaves the split-KV semaphores at zero (the next launch and graph replays rely on it)."""
    from xqagen.runtime import default_workspace

    torch.cuda.synchronize()
    left = default_workspace(device).semaphores.nonzero().flatten().tolist()
    assert not left, f"split-KV semaphores left non-zero at {left[:8]}"


@pytest.mark.parametrize("case", MATRIX, ids=lambda c: f"{c.id}-kvh{c.num_kv_heads}")
def test_hopper_accuracy_matrix(case: Case, record_property):
    err = _check_against_reference(case)
    record_property("rel_l2_error", err)
    bound = TOLERANCE_CONTRACT["fp8" if case.kv_dtype == "e4m3" else "16bit"]
    assert err <= bound, f"relative L2 error {err:.3e} above {bound:.0e} for {case.id}"


# The sm_80 code path (software e4m3 conversion, no fp8 output instruction) on every kind of tile.
SM80_CASES = [
    replace(BASE, kv_dtype="e4m3", q_seq_len=4, mask="tree", sinks=True, window=900, num_splits=3),
    replace(BASE, kv_dtype="e4m3", out_dtype="e4m3", group=32, kv_layout="HND", page_size=16),
    replace(BASE, q_dtype="fp16", kv_dtype="e4m3", head_dim=256, seq_lens=(3001, 1)),
    replace(BASE, q_dtype="fp16", kv_dtype="fp16", q_seq_len=8, mask="causal", seq_lens=(900, 33, 4000)),
    replace(BASE, kv_dtype="e4m3", head_dim=64, seq_lens=(20011,)),  # dispatched to the split tile
    replace(BASE, kv_dtype="e4m3", head_dim=80, sinks=True, num_splits=3),  # a last 16-wide fp8 step
    replace(BASE, kv_dtype="e4m3", out_dtype="e4m3", head_dim=112, group=32, kv_layout="HND"),
    replace(BASE, q_dtype="fp16", kv_dtype="fp16", head_dim=48, q_seq_len=4, mask="tree"),
]


@pytest.mark.parametrize("case", SM80_CASES, ids=lambda c: c.id)
def test_sm80_code_path_through_ptx_jit(case: Case, monkeypatch):
    """The kernels as NVRTC builds them for sm_80, run on this GPU through PTX the driver compiles."""
    from xqagen import runtime
    from xqagen.compiler import compile_ptx

    def load_from_ptx(kernel: runtime.DecodeKernel, index: int) -> runtime._Loaded:
        ptx = compile_ptx(kernel.emitted.source, kernel.emitted.kernel_name, "compute_80")
        library, function = runtime.load_function(ptx, kernel.emitted.kernel_name, index,
                                                  dynamic_smem_bytes=kernel.emitted.smem_bytes)
        return runtime._Loaded(library, function)

    monkeypatch.setattr(runtime.DecodeKernel, "_load", load_from_ptx)
    monkeypatch.setattr(runtime, "_handles", {})  # handles made here load PTX and leave with the test
    _check_against_reference(case)


# Head dims whose last MMA step is 16 wide (and two that are not), with q kept to their last 16
# elements (test_last_head_dim_block_alone_decides_the_scores).
LAST_BLOCK_CASES = [
    replace(BASE, head_dim=48, seq_lens=(700, 33, 2100)),
    replace(BASE, head_dim=48, kv_dtype="e4m3", seq_lens=(700, 33, 2100), num_splits=3),
    replace(BASE, head_dim=80, q_dtype="fp16", kv_dtype="fp16", seq_lens=(700, 33, 2100), group=32),
    replace(BASE, head_dim=112, kv_dtype="e4m3", seq_lens=(700, 33, 2100), group=32, num_splits=1),
    replace(BASE, head_dim=176, kv_dtype="e4m3", seq_lens=(9000, 130), tile="split"),
    replace(BASE, head_dim=240, seq_lens=(700, 33, 2100), num_splits=4),
    replace(BASE, head_dim=240, kv_dtype="e4m3", seq_lens=(700, 33, 2100), q_seq_len=4, mask="tree"),
    replace(BASE, head_dim=96, kv_dtype="e4m3", seq_lens=(700, 33, 2100)),
    replace(BASE, head_dim=160, seq_lens=(700, 33, 2100)),
]
LAST_BLOCK_CASES += [replace(case, path="hopper", tile=None) for case in LAST_BLOCK_CASES]


@pytest.mark.parametrize("case", LAST_BLOCK_CASES, ids=lambda c: c.id)
def test_last_head_dim_block_alone_decides_the_scores(case: Case):
    """q is zero outside head_dim's last 16 elements and the scale makes the softmax peaked (score
    standard deviation about 2), so the weights come from the Q K^T step of that block alone: a
    dropped, repeated or misplaced last step (or a wrong fp8 k-slot order in it) weighs the wrong
    tokens."""
    def keep_last_block(q, kwargs):
        q[..., :case.head_dim - 16] = 0
        kwargs["q_scale"] = 0.5 * case.head_dim ** 0.5

    _check_against_reference(case, keep_last_block)


# Masks and windows read off the output: requests no longer than head_dim, so that V can be one-hot
# in the token position.  Both paths, pages shorter than the requests, several splits.
VISIBILITY_CASES = [replace(BASE, head_dim=64, page_size=16, seq_lens=(50, 7, 64), **change) for change in (
    dict(q_seq_len=4, mask="tree"), dict(q_seq_len=8, mask="causal", window=5), dict(q_seq_len=3, mask="tree", window=20),
    dict(window=9, num_splits=3), dict(kv_dtype="e4m3", q_seq_len=4, mask="tree", num_splits=3),
    dict(kv_dtype="e4m3", group=5, q_seq_len=5, mask="tree", window=30))]
VISIBILITY_CASES += [replace(case, path="hopper") for case in VISIBILITY_CASES] + [
    replace(VISIBILITY_CASES[1], path="hopper", tile="tma4x1"),  # 64 rows in one CTA
    replace(VISIBILITY_CASES[4], path="hopper", tile="tma6x1", group=16, q_seq_len=5),  # 80 rows: two row tiles
    replace(VISIBILITY_CASES[1], path="hopper", tile="tma6x2r"),
    replace(VISIBILITY_CASES[4], path="hopper", tile="tma6x2r", group=16, q_seq_len=5)] + [
    replace(VISIBILITY_CASES[i], path="hopper", fp8_mma=True, **change)  # e4m3 P of 1 and V of 0 or 1: exact
    for i, change in ((4, {}), (5, {}), (4, dict(tile="tma6x2r", group=16, q_seq_len=5)))]


@pytest.mark.parametrize("case", VISIBILITY_CASES, ids=lambda c: c.id)
def test_zero_scores_average_exactly_the_visible_values(case: Case):
    """q = 0 makes every visible score 0, so each output row is the plain mean of the V rows it sees.
    With the V row of token t the unit vector e_t, an output element is nonzero exactly where its row
    sees that token, and equals 1 / (the tokens it sees): a mask bit, window edge or page the kernel
    gets wrong moves a zero."""
    from xqagen.api import xqa_decode

    _skip_unless_the_path_runs_here(case)
    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=zlib.crc32(case.id.encode()))
    q.zero_()
    kwargs["kv_scale"] = 1.0
    v_cache.zero_()  # NHD: [page, token in page, KV head, head_dim]
    for b, length in enumerate(case.seq_lens):
        for t in range(length):
            v_cache[page_table[b, t // case.page_size], t % case.page_size, :, t] = 1
    ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                        out_dtype=torch.float64, compute_dtype=torch.float64, **kwargs)
    out = torch.full_like(q, float("nan"))
    xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=case.num_splits, path=case.path,
               fp8_mma=case.fp8_mma, **kwargs)
    torch.cuda.synchronize()
    assert torch.equal(out != 0, ref != 0), f"visible positions differ for {case.id}"
    assert torch.allclose(out.double(), ref, rtol=2 ** -8, atol=0), f"visible means differ for {case.id}"


@pytest.mark.parametrize("kv_dtype, head_dim, tile, ctas_per_sm", [
    ("e4m3", 128, "tma2x1", 4),  # the short-KV tile of full grids (HopperPath.choose_tile)
    ("bf16", 64, "tma2x1", 4),
    ("e4m3", 128, "tma4x2", 2),  # the four-stage tile beside it
])
def test_hopper_tiles_fit_the_ctas_per_sm_dispatch_counts_on(kv_dtype, head_dim, tile, ctas_per_sm):
    """Dispatch picks tiles by how many of their CTAs share an SM: the runtime asks for all of the
    unified memory as shared memory, and the kernel's registers and shared memory fit that many."""
    from cuda.bindings import driver

    from xqagen.runtime import get_kernel
    from xqagen.spec import KernelSpec

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Hopper path's tiles are sized for sm_90")
    spec = KernelSpec(q_dtype="bf16", kv_dtype=kv_dtype, head_dim=head_dim, group=8, page_size=64, path="hopper",
                      tile=tile)
    kernel = get_kernel(spec)
    function = kernel.load(torch.device("cuda")).function
    err, carveout = driver.cuFuncGetAttribute(
        driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, function)
    assert err == driver.CUresult.CUDA_SUCCESS and carveout == 100
    err, resident = driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(function, kernel.emitted.threads,
                                                                       kernel.emitted.smem_bytes)
    assert err == driver.CUresult.CUDA_SUCCESS and resident == ctas_per_sm


@pytest.mark.parametrize("kv_dtype, q_scale, kv_scale", [
    ("bf16", -0.7, 1.0),    # a negative scale product: the kernel negates Q instead
    ("e4m3", 0.7, -1.3),
    ("e4m3", 0.0, 1.3),     # all scores zero: uniform weights over the visible positions
], ids=["neg_q_scale-bf16", "neg_kv_scale-e4m3", "zero_q_scale-e4m3"])
def test_scale_signs(kv_dtype, q_scale, kv_scale):
    """Scores are scaled inside the exponent; any sign of q_scale * kv_scale gives the reference."""
    from xqagen.api import xqa_decode

    case = replace(BASE, kv_dtype=kv_dtype, q_seq_len=4, sinks=True, window=900, seq_lens=(1000, 77, 4133),
                   num_splits=3)
    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=5)
    kwargs["q_scale"] = q_scale
    kwargs["kv_scale"] = kv_scale / FP8_VALUE_SCALE if kv_dtype == "e4m3" else kv_scale
    ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                        out_dtype=torch.float32, **kwargs)
    out = torch.full_like(q, float("nan"))
    xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=3, **kwargs)
    torch.cuda.synchronize()
    assert relative_l2_error(out.float(), ref) < _tolerance(case)


def test_cuda_graph_capture_and_replay():
    """A launch captured in a CUDA graph replays on new inputs written into the same buffers."""
    from xqagen.api import xqa_decode

    case = replace(BASE, seq_lens=(3000, 17, 9000), kv_dtype="e4m3", num_splits=4, sinks=True)
    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=7)
    out = torch.empty_like(q)
    xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=4, **kwargs)  # warm-up: load
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=4, **kwargs)
    for trial in range(3):
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(q.dtype))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                            out_dtype=torch.float32, **kwargs)
        assert relative_l2_error(out.float(), ref) < TOLERANCE["fp8"], f"replay {trial}"


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_programmatic_dependent_launches_wait_for_their_inputs(graph):
    """With programmatic dependent launch, each decode reads the output of the one before it as its
    query (and shares its split-KV workspace): a launch that read memory before its predecessor's
    writes were visible would be off the reference."""
    from xqagen.api import prepare_decode
    from xqagen.runtime import supports_pdl

    if not supports_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90+")
    case = replace(BASE, kv_dtype="e4m3", seq_lens=(20000, 3000), num_splits=8, sinks=True)
    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=13)
    chain = [q] + [torch.full_like(q, float("nan")) for _ in range(4)]
    calls = [prepare_decode(src, k_cache, v_cache, page_table, seq_lens, out=dst, num_splits=8, enable_pdl=True,
                            **kwargs) for src, dst in zip(chain, chain[1:])]
    for call in calls:  # load every kernel before timing-sensitive launches or capture
        call.launch()
    torch.cuda.synchronize()
    for t in chain[1:]:
        t.fill_(float("nan"))
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for call in calls:
                call.launch()
        for t in chain[1:]:
            t.fill_(float("nan"))
        g.replay()
    else:
        for call in calls:
            call.launch()
    torch.cuda.synchronize()
    for step, (src, dst) in enumerate(zip(chain, chain[1:])):
        ref = xqa_reference(src, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                            out_dtype=torch.float32, **kwargs)
        assert relative_l2_error(dst.float(), ref) < TOLERANCE["fp8"], f"launch {step}"


def test_split_kv_is_exact_across_split_counts():
    """Every split count computes the same function (merges are exact up to fp32 rounding)."""
    from xqagen.api import xqa_decode

    case = replace(BASE, seq_lens=(7777,), sinks=True)
    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=11)
    outs = []
    for splits in (1, 2, 5, 31):
        out = torch.full_like(q, float("nan"))
        xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=splits, **kwargs)
        outs.append(out.float())
    for splits, out in zip((2, 5, 31), outs[1:]):
        assert relative_l2_error(out, outs[0]) < 4e-3, f"{splits} splits"


@pytest.mark.parametrize("path", ["hopper", "generic"])
def test_split_merges_over_several_waves(path):
    """Grids of many waves, 16 splits per output tile: the last split of each tile to arrive merges
    them; results are exact, repeated launches bit-identical, and the semaphores back at zero."""
    case = replace(BASE, path=path, kv_dtype="e4m3", num_kv_heads=4, sinks=True,
                   seq_lens=tuple(random.Random(17).choices(range(1, 6000), k=72)), num_splits=16)
    _check_against_reference(case)


def test_concurrent_streams_with_own_workspaces():
    """Two streams, each with its own workspace, run split-KV launches concurrently."""
    from xqagen.api import xqa_decode
    from xqagen.runtime import Workspace

    case = replace(BASE, seq_lens=(6000, 6000))
    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=3)
    ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                        out_dtype=torch.float32, **kwargs)
    streams = [torch.cuda.Stream() for _ in range(2)]
    outs = [torch.full_like(q, float("nan")) for _ in streams]
    workspaces = [Workspace.allocate(q.device) for _ in streams]
    torch.cuda.synchronize()
    for _ in range(5):
        for stream, out, ws in zip(streams, outs, workspaces):
            with torch.cuda.stream(stream):
                xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=6, workspace=ws, **kwargs)
    torch.cuda.synchronize()
    for out in outs:
        assert relative_l2_error(out.float(), ref) < TOLERANCE["16bit"]




@pytest.mark.parametrize("case", [
    replace(BASE, kv_dtype="e4m3", seq_lens=(0, 3000, 0, 17), num_splits=4, sinks=True),
    replace(BASE, q_seq_len=4, mask="tree", window=300, seq_lens=(0, 2, 1000, 3, 4)),  # some shorter than q_seq_len
], ids=["decode-split4", "specdec4-tree-window"])
def test_padding_and_short_rows_in_a_graph(case):
    """Rows of length 0 (a CUDA-graph batch's padding) give zeros and read no KV; requests shorter
    than q_seq_len follow the documented contract (xqagen.reference); both inside a captured graph."""
    from xqagen.api import prepare_decode

    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=21)
    out = torch.full_like(q, float("nan"))
    call = prepare_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, num_splits=case.num_splits, **kwargs)
    call.launch()  # loads the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call.launch()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                        out_dtype=torch.float32, **kwargs)
    for b, length in enumerate(case.seq_lens):
        if length == 0:
            assert torch.equal(out[b].float(), torch.zeros_like(out[b].float())), f"padding row {b}"
    assert relative_l2_error(out.float(), ref) < _tolerance(case)


def test_corrupt_page_tables_and_lengths_read_nothing_outside_and_raise_the_fault_word():
    """Without validation, lengths beyond the page table and page indices outside the pool read
    nothing there (compute-sanitizer's memcheck runs this test), set the fault word's bits, and
    leave the other requests' results exact."""
    from xqagen.api import xqa_decode
    from xqagen.emitters.params import FAULT_PAGE, FAULT_SEQ_LEN
    from xqagen.runtime import Workspace

    case = replace(BASE, kv_dtype="e4m3", seq_lens=(2000, 700, 1500, 900))
    q, k_cache, v_cache, page_table, seq_lens, kwargs = _inputs(case, seed=23)
    ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=case.num_kv_heads,
                        out_dtype=torch.float32, **kwargs)
    bad_table, bad_lens = page_table.clone(), seq_lens.clone()
    bad_lens[0] = page_table.shape[1] * case.page_size + 1  # beyond the table
    bad_table[1, 3] = k_cache.shape[0]                     # one past the pool
    bad_table[2, 0] = -7
    workspace = Workspace.allocate(q.device)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        workspace.clear_faults()
        xqa_decode(q, k_cache, v_cache, bad_table, bad_lens, out=out, num_splits=splits, workspace=workspace,
                   validate=False, **kwargs)
        assert workspace.fault_bits() == FAULT_SEQ_LEN | FAULT_PAGE
        assert torch.isfinite(out.float()).all()
        assert torch.equal(out[0].float(), torch.zeros_like(out[0].float())), "a bad length reads nothing"
        assert relative_l2_error(out[3].float(), ref[3]) < _tolerance(case), "a healthy request"
    workspace.clear_faults()
    xqa_decode(q, k_cache, v_cache, page_table, seq_lens, workspace=workspace, **kwargs)
    assert workspace.fault_bits() == 0


@pytest.mark.parametrize("kv_dtype, q_seq_len, counts, sinks, window, splits", [
    ("bf16", 4, (3, 0, 4, 1), False, 0, None),
    ("e4m3", 8, (8, 2, 5, 0, 7), True, 300, 3),
    ("bf16", 13, (13, 1, 9), True, 0, 1),
], ids=["bf16-s4", "fp8-s8-sinks-window-split3", "bf16-s13-sinks"])
def test_ragged_speculative_decoding(kv_dtype, q_seq_len, counts, sinks, window, splits):
    """q_cu_seq_lens: each request its own number of draft tokens (0 allowed) in a packed q, out and
    mask, against the reference; the same request run alone with a fixed q_seq_len agrees."""
    from xqagen.api import xqa_decode

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(31)
    num_kv_heads, group, head_dim = 2, 8, 128
    lens = [1700, 33, 4000, 61, 2500][:len(counts)]
    k_cache, v_cache, page_table = make_paged_kv(len(counts), lens, num_kv_heads, head_dim, 64,
                                                 TORCH_DTYPES[kv_dtype], generator=gen, device=device)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    q = torch.randn(total, num_kv_heads * group, head_dim, generator=gen, device=device).to(torch.bfloat16)
    tree = random_tree_mask(len(counts), q_seq_len, generator=torch.Generator().manual_seed(7)).to(device)
    mask = torch.cat([tree[b, :n] for b, n in enumerate(counts)])  # rows packed like q
    kwargs = dict(q_scale=0.7, mask=mask, sinks=torch.randn(num_kv_heads, group, generator=gen, device=device)
                  if sinks else None, sliding_window=window)
    if kv_dtype == "e4m3":
        kwargs["kv_scale"] = 1.3 / FP8_VALUE_SCALE
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = torch.full_like(q, float("nan"))
    xqa_decode(q, k_cache, v_cache, page_table, seq_lens, out=out, q_cu_seq_lens=cu, q_seq_len=q_seq_len,
               num_splits=splits, **kwargs)
    torch.cuda.synchronize()
    ref = xqa_reference(q, k_cache, v_cache, page_table, seq_lens, num_kv_heads=num_kv_heads, q_cu_seq_lens=cu,
                        out_dtype=torch.float32, **kwargs)
    assert relative_l2_error(out.float(), ref) < TOLERANCE["fp8" if kv_dtype == "e4m3" else "16bit"]
