"""The pairwise covering arrays behind the GPU accuracy matrix (no GPU needed)."""

from __future__ import annotations

from covering import all_pairs, pairwise, uncovered_pairs


def test_pairwise_covers_every_pair_a_valid_case_holds():
    axes = {"a": (1, 2, 3), "b": ("x", "y"), "c": (True, False), "d": (10, 20, 30, 40)}
    valid = lambda case: not (case["a"] == 3 and case["d"] == 40)  # noqa: E731
    cases = pairwise(axes, valid, seed=1)
    assert all(valid(case) for case in cases)
    assert uncovered_pairs(cases, axes) == {(("a", 3), ("d", 40))}
    assert len(cases) < len(all_pairs(axes)) / 3  # far fewer cases than pairs
    assert cases == pairwise(axes, valid, seed=1)  # deterministic


def test_hopper_accuracy_matrix_covers_every_feasible_pair():
    from test_gpu_decode import MATRIX_AXES, matrix_values

    short = (1, 2, 3, 65, 129)  # lengths below q_seq_len are padding rows, tested apart
    infeasible = {(("rows", rows), ("seq_lens", short)) for rows in MATRIX_AXES["rows"] if rows != "s1"}
    assert uncovered_pairs(matrix_values(), MATRIX_AXES) == infeasible
    assert len(matrix_values()) <= 60
