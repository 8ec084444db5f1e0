"""Pareto ranking of objective vectors: non-dominated sorting and crowding distance (NSGA-II,
Deb et al. 2002), shared by the MO-ASHA scheduler and the sweep's results; the hypervolume of
a two-objective front, by which benchmarks/search_quality.py compares search strategies.

Every function takes "gains": one row per point, one column per objective, larger is
better (`gains(values, modes)` turns max/min objectives into that form). Points are few (the
trials at one rung, or of one sweep), so the plain O(n^2) sort is the clear choice.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def gains(values: Sequence[float], modes: Sequence[str]) -> tuple[float, ...]:
    """One point's objective values as gains: a `min` objective is negated."""
    return tuple(float(v) if mode == "max" else -float(v) for v, mode in zip(values, modes))


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` is at least as good as `b` in every objective and better in one."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_ranks(points: Sequence[Sequence[float]]) -> list[int]:
    """Each point's non-dominated front: 0 for the Pareto front, 1 for the front once that is
    removed, and so on."""
    ranks = [-1] * len(points)
    remaining = set(range(len(points)))
    front = 0
    while remaining:
        current = {i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining if j != i)}
        for i in current:
            ranks[i] = front
        remaining -= current
        front += 1
    return ranks


def crowding_distances(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance of each point within `points` (one front): per objective,
    the gap between its two neighbours over the objective's range, summed; the extremes of
    any objective get infinity (so do all points of a front of two or fewer)."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    distance = [0.0] * n
    for k in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][k])
        low, high = points[order[0]][k], points[order[-1]][k]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for before, here, after in zip(order, order[1:], order[2:]):
            distance[here] += (points[after][k] - points[before][k]) / (high - low)
    return distance


def selection_keys(points: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """Each point's (front, -crowding distance within its front): sorting by it puts the
    points NSGA-II would keep first."""
    ranks = pareto_ranks(points)
    keys: list[tuple[int, float]] = [(0, 0.0)] * len(points)
    for front in set(ranks):
        members = [i for i, rank in enumerate(ranks) if rank == front]
        for i, distance in zip(members, crowding_distances([points[i] for i in members])):
            keys[i] = (front, -distance)
    return keys


def hypervolume_2d(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The area that `points` (gains, two objectives) dominate and that dominates `reference`
    (gains): the union of the rectangles spanned by each point and the reference. Points not
    better than the reference in both objectives add nothing. Exact: a sweep down the first
    objective adds, per point, the strip its second objective gains over the best so far.
    (Optuna computes hypervolumes only in its private `optuna._hypervolume`.)"""
    if len(reference) != 2 or any(len(point) != 2 for point in points):
        raise ValueError("hypervolume_2d takes two objectives")
    ref_x, ref_y = reference
    inside = sorted(((x, y) for x, y in points if x > ref_x and y > ref_y), reverse=True)
    area, covered_y = 0.0, ref_y
    for x, y in inside:
        if y > covered_y:
            area += (x - ref_x) * (y - covered_y)
            covered_y = y
    return area
