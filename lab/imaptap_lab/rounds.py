"""Figures from interleaved rounds on a shared machine: the order of each round, medians,
quartiles, and ratios taken within a round.

A shared VM's speed drifts by up to 2x between runs of the same command, so the benchmarks run
every arm once per round, rotate the order so that no arm always follows the same one, and
trust medians and per-round ratios more than any single run.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def rotated(arms: Sequence[T], round_index: int) -> list[T]:
    """The order of round ``round_index``: ``arms`` rotated left by that many places."""
    shift = round_index % len(arms)
    return list(arms[shift:]) + list(arms[:shift])


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of each arm's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), inclusive method; one sample is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def format_quartiles(q: tuple[float, float, float], spec: str = ".3f") -> str:
    """``median [q1-q3]`` with each number in the format ``spec``."""
    return f"{q[1]:{spec}} [{q[0]:{spec}}-{q[2]:{spec}}]"


def per_round_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """numerator / denominator of each round, smallest first: the ratio where both arms met the
    same machine."""
    return sorted(a / b for a, b in zip(numerators, denominators, strict=True))


def percentile(values: Sequence[float], fraction: float) -> float:
    """The sample at ``fraction`` (0 to 1) of the sorted values, nearest rank below; 0 for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0
