from __future__ import annotations

import pytest

from kvmem.fleet.cores import split_cores


def test_equal_disjoint_shares_by_default():
    assert split_cores(2, available=[0, 1, 2, 3, 4]) == [[0, 1], [2, 3]]
    assert split_cores(2, available=[4, 6]) == [[4], [6]]


def test_explicit_cores_per_replica():
    assert split_cores(3, 1, available=[0, 1, 2, 3]) == [[0], [1], [2]]


@pytest.mark.parametrize("replicas, per, message", [(3, None, "--replicas 3"), (2, 2, "--replicas 2 x 2"),
                                                     (0, None, "--replicas must be"),
                                                     (1, 0, "--cores-per-replica must be")])
def test_what_does_not_fit_is_an_error_naming_the_flag(replicas, per, message):
    with pytest.raises(ValueError, match=message):
        split_cores(replicas, per, available=[0, 1])
