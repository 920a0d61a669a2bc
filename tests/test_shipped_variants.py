"""Every variant the shipped recipes name compiles with NVRTC for each of its path's targets, and its
SASS and resource usage show the kernel its path means (the path's ``sass_features``: for the
generic path, tensor-core MMAs fed by ldmatrix, a cp.async gather, the hardware fp8 converter on
sm_89+) and no local memory.  Compiles go through the default cubin cache (`xqagen build --all`
fills it first in CI), in parallel processes when cold.
"""

from __future__ import annotations

import multiprocessing
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from xqagen.compiler import compile_kernel, disassemble
from xqagen.emitters import emit, path_of
from xqagen.recipes import load_recipe, shipped_recipes
from xqagen.spec import KernelSpec

pytestmark = pytest.mark.slow

SPECS = sorted({spec for path in shipped_recipes() for spec in load_recipe(path).variants}, key=lambda s: s.name)
JOBS = [(spec, arch) for spec in SPECS for arch in emit(spec).arches]
OPCODE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)


def _compile(job: tuple[dict, str]):
    spec_dict, arch = job
    emitted = emit(KernelSpec.from_dict(spec_dict))
    return compile_kernel(emitted.source, emitted.kernel_name, arch)


@pytest.fixture(scope="module")
def compiled() -> dict:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        results = pool.map(_compile, [(spec.to_dict(), arch) for spec, arch in JOBS])
        return {job: result for job, result in zip(JOBS, results)}


def test_shipped_recipes_name_variants():
    assert len(SPECS) >= 20
    assert {s.kv_dtype for s in SPECS} >= {"bf16", "fp16", "e4m3"} and {s.head_dim for s in SPECS} >= {64, 128}


@pytest.mark.parametrize("spec, arch", JOBS, ids=[f"{s.name}-{a}" for s, a in JOBS])
def test_variant_sass_and_resources(compiled, spec, arch):
    result = compiled[(spec, arch)]
    res = result.resources
    assert (res.spill_stores, res.spill_loads, res.stack_bytes) == (0, 0, 0), f"local memory: {res}"
    assert 0 < res.registers <= 255
    ops = Counter(OPCODE.findall(disassemble(result.cubin)))
    missing = {op: meaning for op, meaning in path_of(spec).sass_features(spec, arch).items() if not ops[op]}
    assert not missing, f"SASS lacks {missing}"
    assert ops["LDL"] == 0 and ops["STL"] == 0, "local-memory traffic"
