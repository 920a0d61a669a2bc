"""The GPU grid's cases are well formed: checked here, without a GPU, so that CI catches a bad edit."""

from __future__ import annotations

from test_gpu_decode import CASES, LAST_BLOCK_CASES, SM80_CASES


def test_case_ids_are_unique():
    for cases in (CASES, SM80_CASES, LAST_BLOCK_CASES):
        ids = [c.id for c in cases]
        assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


def test_every_case_is_a_valid_spec():
    for case in CASES + SM80_CASES + LAST_BLOCK_CASES:
        case.spec()  # raises SpecError for a combination no path implements
