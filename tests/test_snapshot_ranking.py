"""stable_ranking: snapshot ranks only where neighbours are apart by more than the tolerance."""

from __future__ import annotations

import json

import pytest

from neuronspec.snapshot import FindingsSnapshotExtension, stable_ranking

EXT = FindingsSnapshotExtension()


def _matches(a, b) -> bool:
    return EXT.matches(serialized_data=EXT.serialize(a), snapshot_data=EXT.serialize(b))


def test_distinct_values_keep_every_rank():
    ranking = stable_ranking([7, 3, 9, 1], [0.5, 0.4, 0.3, 0.2], 3)
    assert ranking == [
        {"neurons": [7], "values": [0.5]},
        {"neurons": [3], "values": [0.4]},
        {"neurons": [9], "values": [0.3]},
    ]


def test_values_within_tolerance_form_one_group_whose_order_is_not_pinned():
    """tiny-mamba layer 0: top values within 2e-7 of each other; their order is noise."""
    values = [3.55e-5, 3.2067e-5, 3.1992e-5, 3.1773e-5, 2.0e-5, 1.0e-5]
    a = stable_ranking([142, 57, 37, 251, 8, 9], values, 5)
    assert a == [
        {"neurons": [142], "values": [3.55e-5]},
        {"neurons": [37, 57, 251], "values": values[1:4]},
        {"neurons": [8], "values": [2.0e-5]},
    ]
    noisy = [3.55e-5, 3.2067e-5 - 1e-7, 3.1992e-5 + 2e-7, 3.1773e-5, 2.0e-5, 1.0e-5]
    order = [142, 251, 57, 37, 8, 9]  # the tied neurons come out in another order
    b = stable_ranking(order, sorted(noisy, reverse=True), 5)
    assert _matches(b, a)
    assert not _matches(a, stable_ranking([142, 57, 37, 251, 9, 8], values, 5))  # 8 vs 9


def test_group_across_the_cut_leaves_its_members_open():
    ranking = stable_ranking([1, 2, 3, 4], [0.9, 0.5, 0.5 - 1e-9, 0.5 - 2e-9], 2)
    assert ranking == [{"neurons": [1], "values": [0.9]}, {"neurons": None, "values": [0.5]}]


def test_a_real_rank_change_fails_the_snapshot():
    before = stable_ranking([4, 5], [0.30, 0.20], 2)
    after = stable_ranking([5, 4], [0.30, 0.20], 2)
    assert not _matches(after, before)
    assert json.loads(EXT.serialize(before)) == before


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="2 ids but 1 values"):
        stable_ranking([1, 2], [0.5], 2)
