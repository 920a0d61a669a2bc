"""Pairwise covering arrays: few test cases in which every pair of values of any two axes occurs.

A full factorial of the kernel's axes (dtypes x head dims x groups x pages x layouts x masks x sinks x
windows x splits x lengths x tiles) has millions of cases; a pairwise array has a few dozen, and
faults that depend on the interaction of two axes (most do) still show.  ``pairwise`` builds one
greedily and deterministically; ``uncovered_pairs`` checks one.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence

Pair = tuple[tuple[str, object], tuple[str, object]]


def all_pairs(axes: Mapping[str, Sequence]) -> set[Pair]:
    names = list(axes)
    return {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2) for va in axes[a] for vb in axes[b]}


def pairs_of(case: Mapping[str, object], axes: Mapping[str, Sequence]) -> set[Pair]:
    names = list(axes)
    return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(names, 2)}


def pairwise(axes: Mapping[str, Sequence], valid: Callable[[dict], bool], *, seed: int = 0,
             candidates: int = 60) -> list[dict]:
    """Cases (one value per axis) that ``valid`` accepts, covering every pair of axis values that
    some valid case holds.  Each step keeps, of ``candidates`` random valid cases that each start
    from a still uncovered pair, the one that covers the most uncovered pairs."""
    rng = random.Random(seed)
    remaining = all_pairs(axes)
    cases: list[dict] = []
    while remaining:
        best, best_gain = None, 0
        starts = sorted(remaining, key=repr)[:64]
        for _ in range(candidates):
            (a, va), (b, vb) = rng.choice(starts)
            case = {name: rng.choice(list(values)) for name, values in axes.items()}
            case[a], case[b] = va, vb
            # fill the other axes greedily, in a random order, by the uncovered pairs each value adds
            for name in rng.sample([n for n in axes if n not in (a, b)], len(axes) - 2):
                def gain(value, name=name):
                    trial = {**case, name: value}
                    return len(pairs_of(trial, axes) & remaining) if valid(trial) else -1
                scored = [(gain(v), i, v) for i, v in enumerate(axes[name])]
                top = max(score for score, _, _ in scored)
                if top >= 0:
                    case[name] = rng.choice([v for score, _, v in scored if score == top])
            if not valid(case):
                continue
            covered = len(pairs_of(case, axes) & remaining)
            if covered > best_gain:
                best, best_gain = case, covered
        if best is None:  # no valid case holds the pairs left
            break
        cases.append(best)
        remaining -= pairs_of(best, axes)
    return cases


def uncovered_pairs(cases: Sequence[Mapping[str, object]], axes: Mapping[str, Sequence]) -> set[Pair]:
    covered = set().union(*(pairs_of(case, axes) for case in cases))
    return all_pairs(axes) - covered
