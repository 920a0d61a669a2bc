"""The measurement tools under tools/: each parses its options, the L2 floor's page-table
rewrite keeps every entry inside the pool it claims, and the tile sweep's case options build the
cases they name."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

TOOLS = Path(__file__).resolve().parent.parent / "tools"


@pytest.mark.parametrize("tool", sorted(p.name for p in TOOLS.glob("*.py")))
def test_tool_parses_its_options(tool):
    result = subprocess.run([sys.executable, str(TOOLS / tool), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kv_dtype, page_size", [("e4m3", 64), ("bf16", 16), ("bf16", 128)])
def test_l2_floor_points_every_page_into_a_small_pool(kv_dtype, page_size):
    from xqagen.bench import BenchCase

    floor = _tool("compute_floor")
    case = BenchCase("t", 4, 8192, kv_dtype=kv_dtype, page_size=page_size)
    pages_per_request = 8192 // page_size
    table = torch.randperm(4 * pages_per_request, dtype=torch.int32).reshape(4, pages_per_request)
    table[3, -5:] = -1  # past a shorter request's end
    cache = torch.empty(0)
    resident = floor.l2_resident(SimpleNamespace(sets=[(cache, cache, table)], q=None), case)

    (k, v, pt), = resident.sets
    assert k is cache and v is cache
    page_bytes = 2 * page_size * case.num_kv_heads * case.head_dim * (1 if kv_dtype == "e4m3" else 2)
    pool = floor.POOL_BYTES // page_bytes
    live = table >= 0
    assert torch.equal(pt[~live], table[~live])
    assert int(pt[live].min()) >= 0 and int(pt[live].max()) < pool
    assert pool * page_bytes <= floor.POOL_BYTES
    assert len(torch.unique(pt[live])) == min(pool, int(live.sum()))  # the whole pool is used


def test_tile_sweep_runs_cases_at_other_batches_windows_and_page_orders():
    select_cases = _tool("tile_sweep").select_cases
    cases = select_cases(["llama70b_fp8_b64_s8k", "sweep_e4m3_b256_s64k"], "33,264", "in-order")
    assert [(c.name, c.batch) for c in cases] == [
        ("llama70b_fp8_b64_s8k@b33", 33), ("llama70b_fp8_b64_s8k@b264", 264),
        ("sweep_e4m3_b256_s64k@b33", 33), ("sweep_e4m3_b256_s64k@b264", 264)]
    assert all(not c.shuffled_pages and c.seq_len in (8192, 65536) and c.kv_dtype == "e4m3" for c in cases)
    windowed = select_cases(["gptoss_window_bf16_b64_s8k"], "16", "shuffled", "128,1024")
    assert [(c.name, c.batch, c.window) for c in windowed] == [
        ("gptoss_window_bf16_b64_s8k@b16@w128", 16, 128), ("gptoss_window_bf16_b64_s8k@b16@w1024", 16, 1024)]
    design = select_cases(None, None, "shuffled")
    assert design and all(c.shuffled_pages for c in design)
    assert [c.name for c in design] == [c.name for c in _tool("tile_sweep").bench.DESIGN_CASES]


def test_tile_sweep_refuses_fewer_than_one_round_before_any_gpu_work():
    result = subprocess.run([sys.executable, str(TOOLS / "tile_sweep.py"), "--rounds", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--rounds 0: expected at least 1" in result.stderr


def test_tools_name_an_unknown_case_before_any_gpu_work():
    result = subprocess.run([sys.executable, str(TOOLS / "tile_sweep.py"), "--case", "llama70b_fp8_b64_s8k",
                             "--case", "no_such_case"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown bench case(s) ['no_such_case']" in result.stderr


# Hopper kernels of every kind the instrumenting tools meet
HOPPER_KINDS = [
    dict(kv_dtype="e4m3", tile="tma2x1"),                               # one consumer warpgroup
    dict(kv_dtype="e4m3", tile="tma6x2"),                               # two, and the split merge
    dict(kv_dtype="e4m3", q_seq_len=8, tile="tma4x2r"),                 # the register split's producer warpgroup
    dict(kv_dtype="bf16", head_dim=64, features=frozenset({"sinks", "sliding_window"})),
    dict(kv_dtype="e4m3", tile="cpa4x2"),                               # the cp.async producer
]


@pytest.mark.parametrize("spec_fields", HOPPER_KINDS)
def test_cta_timeline_marks_the_hopper_kernel_at_each_phase(spec_fields):
    timeline = _tool("cta_timeline")
    source = _hopper_kernel(**spec_fields).source
    marked = timeline.instrument(source)
    for slot in range(len(timeline.MARKS)):
        assert marked.count(f"xq_mark({slot});") == 1, slot
    assert marked.rstrip().endswith("xq_mark(6);\n}")  # the merge's stores come before it
    with pytest.raises(timeline.TemplateChanged, match="pipeline.consumer_wait"):
        timeline.instrument(source.replace("      pipeline.consumer_wait(state);\n", ""))


def _hopper_kernel(**spec_fields):
    """An emitted Hopper kernel: bf16 Q, head_dim 128, group 8, page 64 unless the fields say otherwise."""
    from xqagen.emitters import PATHS
    from xqagen.spec import KernelSpec

    return PATHS["hopper"].emit(KernelSpec(**{**dict(q_dtype="bf16", head_dim=128, group=8, page_size=64,
                                                     path="hopper"), **spec_fields}))


@pytest.mark.parametrize("tool, spec_fields", [
    ("cta_timeline", dict(kv_dtype="e4m3", tile="tma2x1")),
    ("loop_phases", dict(kv_dtype="e4m3", q_seq_len=8, tile="tma6x2r")),
])
def test_instrumented_kernel_compiles(tool, spec_fields):
    from xqagen.compiler import compile_kernel, supported_archs

    if "sm_90" not in supported_archs():
        pytest.skip("NVRTC cannot build sm_90a")
    emitted = _hopper_kernel(**spec_fields)
    compiled = compile_kernel(_tool(tool).instrument(emitted.source), emitted.kernel_name, "sm_90a")
    assert compiled.resources.spill_stores == 0


def test_cta_timeline_summarises_phases_over_the_grid():
    np = pytest.importorskip("numpy")
    timeline = _tool("cta_timeline")
    ctas = 4
    marks = np.zeros((ctas, 16), dtype=np.uint64)
    base = 10_000_000
    for cta in range(ctas):  # ns: start, first TMA, first data, loop end, stored; CTA 3 merges
        times = [base + 100 * cta, base + 100 * cta + 500, base + 100 * cta + 2000, base + 12_000 + 100 * cta,
                 base + 13_000 + 100 * cta, 0, 0]
        if cta == 3:
            times[5:] = [base + 14_300, base + 15_300]
        marks[cta, :7] = times
        marks[cta, 8:15] = [t * 18 // 10 for t in times]  # 1.8 cycles per ns
        marks[cta, timeline.SMID_SLOT] = cta
    row = timeline.summarize(marks, ms=0.02)
    assert row["ctas"] == ctas and row["sms"] == ctas
    assert row["phases_us"]["to first TMA"] == [0.5] * 5
    assert row["phases_us"]["main loop"] == [10.0] * 5
    assert row["phases_us"]["split arrival"] == [1.0] * 5  # the merging CTA only
    assert row["phases_us"]["split merge"] == [1.0] * 5
    assert row["span_us"] == 15.3
    assert row["tail_us"] == 3.0  # from the last loop's end (CTA 3's, 12.3 us) to the merge's store
    assert row["sm_clock_mhz"] == 1800


@pytest.mark.parametrize("spec_fields", HOPPER_KINDS)
def test_loop_phases_marks_each_phase_of_the_consumer_loop(spec_fields):
    phases = _tool("loop_phases")
    source = _hopper_kernel(**spec_fields).source
    marked = phases.instrument(source)
    for i in range(len(phases.PHASES)):
        assert marked.count(f"XQ_PHASE({i});") == 1, i
    # in a tile's order, inside the loop, and the sums added after it
    order = [marked.index(f"XQ_PHASE({i});") for i in range(len(phases.PHASES))]
    assert order == sorted(order)
    assert marked.index("xq_cycles[6] = {}") < order[0] < order[-1] < marked.index("atomicAdd(&xq_loop_phases[6]")
    with pytest.raises(phases.TemplateChanged, match="mma_scores"):
        phases.instrument(source.replace("      mma_scores<kKvFp8>(&sK(0, 0), fp8_at, q_desc, acc_s);\n", ""))


def test_loop_phases_gives_cycles_per_tile():
    phases = _tool("loop_phases")
    counters = [1000, 2000, 500, 700, 100, 2200, 4, 0]  # the phases' sums over the warps, then 4 tiles
    row = phases.per_tile(counters)
    assert row["cycles_per_tile"] == {"wait": 250.0, "S^T": 500.0, "vote": 125.0, "exp": 175.0, "barrier": 25.0,
                                      "P V": 550.0}
    assert row["total"] == 1625.0 and row["warp_tiles"] == 4
    with pytest.raises(ValueError, match="no consumer warp"):
        phases.per_tile([0] * 8)


def test_template_ab_emits_from_the_base_tree_then_from_its_own(tmp_path):
    import shutil

    from xqagen import runtime

    ab = _tool("template_ab")
    base = tmp_path / "templates"
    shutil.copytree(Path(__file__).resolve().parent.parent / "emitters" / "templates", base)
    template = base / "hopper_decode.cu.j2"
    template.write_text("// base tree\n" + template.read_text())
    runtime._handles[("stale", None)] = object()
    try:
        ab.use_templates(str(base))
        assert not runtime._handles  # launches after the switch load the base tree's kernels
        assert _hopper_kernel(kv_dtype="e4m3").source.startswith("// base tree\n")
    finally:
        ab.use_templates(None)
    assert "// base tree" not in _hopper_kernel(kv_dtype="e4m3").source
    case, path = ab.parse_case("llama70b_fp8_b1_s32k")
    assert (case.name, path) == ("llama70b_fp8_b1_s32k", None)  # dispatched
    assert ab.parse_case("llama70b_fp8_b1_s32k:generic") == (case, "generic")
