"""The GPU tests' own machinery, checked without a GPU: which variants the session compiles up front."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace


def _item(name: str, **params) -> SimpleNamespace:
    return SimpleNamespace(originalname=name, callspec=SimpleNamespace(params=params))


def test_precompile_takes_the_grid_cases_of_every_module_and_nothing_else():
    from test_gpu_decode import BASE, launched_specs

    hopper = replace(BASE, path="hopper", kv_dtype="e4m3")
    items = [
        _item("test_matches_reference", case=BASE),
        _item("test_matches_reference", case=hopper),
        _item("test_xqa_matches_flashinfer", case=("sm90", "bf16", "e4m3", 128)),  # another module's tuple
        _item("test_sm80_code_path_through_ptx_jit", case=replace(BASE, q_seq_len=4)),  # builds its own
        SimpleNamespace(originalname="test_without_parameters"),
    ]
    assert launched_specs(items, 132, "sm_90") == {BASE.launched_spec(132), hopper.launched_spec(132)}
    assert launched_specs(items, 132, "sm_80") == {BASE.launched_spec(132)}  # the Hopper path runs on sm_90 only
