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


def test_tools_name_an_unknown_case_before_any_gpu_work():
    result = subprocess.run([sys.executable, str(TOOLS / "tile_sweep.py"), "--case", "llama70b_fp8_b64_s8k",
                             "--case", "no_such_case"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unknown bench case(s) ['no_such_case']" in result.stderr
