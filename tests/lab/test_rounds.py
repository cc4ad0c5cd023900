"""imaptap_lab.rounds: the order of interleaved rounds and the figures taken over them."""

from __future__ import annotations

import pytest

from imaptap_lab import rounds


def test_rotation_puts_every_arm_first_once_and_never_behind_the_same_one_twice():
    arms = ["imaptap", "imaptap --flows-only", "tshark"]
    orders = [rounds.rotated(arms, r) for r in range(3)]
    assert orders == [["imaptap", "imaptap --flows-only", "tshark"],
                      ["imaptap --flows-only", "tshark", "imaptap"],
                      ["tshark", "imaptap", "imaptap --flows-only"]]
    assert rounds.rotated(arms, 3) == arms
    assert rounds.rotated(arms, 7) == orders[1]
    assert arms == ["imaptap", "imaptap --flows-only", "tshark"], "the arms themselves stay as they were"


def test_two_directions_alternate():
    directions = ("egress", "ingress")
    assert [rounds.rotated(directions, r) for r in range(3)] == [
        ["egress", "ingress"], ["ingress", "egress"], ["egress", "ingress"]]


def test_medians_per_arm():
    assert rounds.medians({"a": [3.0, 1.0, 2.0], "b": [4.0, 10.0]}) == {"a": 2.0, "b": 7.0}


def test_quartiles_of_one_sample_and_of_several():
    assert rounds.quartiles([2.5]) == (2.5, 2.5, 2.5)
    assert rounds.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    q1, median, q3 = rounds.quartiles([10.0, 1.0, 4.0, 7.0])
    assert (q1, median, q3) == (3.25, 5.5, 7.75)


def test_format_quartiles_puts_the_median_first():
    assert rounds.format_quartiles((0.9, 1.02, 1.1)) == "1.020 [0.900-1.100]"
    assert rounds.format_quartiles((12.0, 19.4, 25.0), ".0f") == "19 [12-25]"


def test_per_round_ratios_pair_rounds_not_sorted_samples():
    tshark = [6.0, 3.0, 9.0]
    imaptap = [2.0, 2.0, 3.0]
    # round by round: 3.0, 1.5, 3.0; pairing the sorted samples would give 1.5, 2.0, 3.0
    assert rounds.per_round_ratios(tshark, imaptap) == [1.5, 3.0, 3.0]


def test_per_round_ratios_need_one_sample_of_each_per_round():
    with pytest.raises(ValueError):
        rounds.per_round_ratios([1.0, 2.0], [1.0])


def test_percentile_is_the_nearest_rank_below():
    values = [float(v) for v in range(1, 101)]
    assert rounds.percentile(values, 0.95) == 96.0
    assert rounds.percentile(values, 0.0) == 1.0
    assert rounds.percentile(values, 1.0) == 100.0
    assert rounds.percentile([5.0, 1.0, 3.0], 0.5) == 3.0
    assert rounds.percentile([], 0.95) == 0.0
