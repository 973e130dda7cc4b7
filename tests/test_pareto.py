"""Pareto dominance, fronts and 2-D hypervolume on hand-made (quality, FLOPs) point sets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.pareto import (
    ParetoArchive,
    default_reference,
    dominates,
    hypervolume_2d,
    non_dominated_sort,
    pareto_front,
)

# (quality up, flops down) staircase: each point trades quality for FLOPs, none dominates another
STAIRCASE = [(0.2, 1.0), (0.5, 2.0), (0.7, 4.0), (0.8, 8.0)]


def test_dominates():
    assert dominates((0.6, 1.0), (0.5, 2.0))  # better in both
    assert dominates((0.6, 2.0), (0.5, 2.0))  # better quality, equal flops
    assert dominates((0.5, 1.0), (0.5, 2.0))  # equal quality, fewer flops
    assert not dominates((0.5, 2.0), (0.5, 2.0))  # equal points do not dominate each other
    assert not dominates((0.6, 3.0), (0.5, 2.0))  # trade-off
    assert not dominates((0.5, 2.0), (0.6, 1.0))
    # the maximize mask flips what "better" means
    assert dominates((1.0, 1.0), (2.0, 2.0), maximize=(False, False))
    assert dominates((2.0, 2.0), (1.0, 1.0), maximize=(True, True))
    assert dominates((1, 2, 3), (1, 2, 4), maximize=(True, True, False))


def test_staircase_is_one_front():
    assert pareto_front(STAIRCASE) == [0, 1, 2, 3]
    assert non_dominated_sort(STAIRCASE) == [[0, 1, 2, 3]]


def test_dominated_points_leave_the_front():
    points = STAIRCASE + [(0.4, 3.0), (0.1, 9.0), (0.8, 8.5)]
    # (0.4, 3) is beaten by (0.5, 2); (0.1, 9) by everything; (0.8, 8.5) by (0.8, 8)
    assert pareto_front(points) == [0, 1, 2, 3]
    assert non_dominated_sort(points) == [[0, 1, 2, 3], [4, 6], [5]]


def test_ties_in_one_objective():
    # same flops: only the best quality stays; same quality: only the cheapest stays
    points = [(0.5, 2.0), (0.6, 2.0), (0.6, 3.0), (0.3, 1.0)]
    assert pareto_front(points) == [1, 3]
    assert non_dominated_sort(points) == [[1, 3], [0, 2]]


def test_exact_duplicates_all_stay():
    points = [(0.5, 2.0), (0.5, 2.0), (0.4, 3.0), (0.4, 3.0)]
    assert pareto_front(points) == [0, 1]
    assert non_dominated_sort(points) == [[0, 1], [2, 3]]


def test_single_and_empty():
    assert pareto_front([(0.3, 5.0)]) == [0]
    assert non_dominated_sort([(0.3, 5.0)]) == [[0]]
    assert pareto_front([]) == []
    assert non_dominated_sort([]) == []
    assert hypervolume_2d([], (0.0, 10.0)) == 0.0


def test_chain_gives_one_front_per_point():
    chain = [(0.1 * k, 10.0 - k) for k in range(6)]  # each point dominates all earlier ones
    assert pareto_front(chain) == [5]
    assert non_dominated_sort(chain) == [[5], [4], [3], [2], [1], [0]]


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(float("nan"), 1.0)])
    with pytest.raises(ValueError, match="objectives"):
        pareto_front([(0.1, 1.0, 2.0)])
    with pytest.raises(ValueError, match="2 objectives"):
        hypervolume_2d([(1, 2, 3)], (0, 0, 0), maximize=(True, False, False))


# --- hypervolume -------------------------------------------------------------------------------

def test_hypervolume_single_point():
    # reference (quality 0, flops 10): rectangle quality [0, 0.5] x flops [2, 10] = 0.5 * 8
    assert hypervolume_2d([(0.5, 2.0)], (0.0, 10.0)) == pytest.approx(4.0)


def test_hypervolume_staircase_by_hand():
    # reference (0, 10); sweep by flops ascending, each point adds (10 - flops) x (quality gain):
    #   (0.2, 1): (10 - 1) * (0.2 - 0.0) = 1.8
    #   (0.5, 2): (10 - 2) * (0.5 - 0.2) = 2.4
    #   (0.7, 4): (10 - 4) * (0.7 - 0.5) = 1.2
    #   (0.8, 8): (10 - 8) * (0.8 - 0.7) = 0.2         total 5.6
    assert hypervolume_2d(STAIRCASE, (0.0, 10.0)) == pytest.approx(5.6)
    # dominated points and duplicates add nothing
    assert hypervolume_2d(STAIRCASE + [(0.4, 3.0), (0.5, 2.0), (0.8, 8.0)], (0.0, 10.0)) == pytest.approx(5.6)
    # point order does not matter
    assert hypervolume_2d(STAIRCASE[::-1], (0.0, 10.0)) == pytest.approx(5.6)


def test_hypervolume_with_ties():
    # (0.5, 2) and (0.6, 2) share flops: only (0.6, 2) counts, 0.6 * 8 = 4.8;
    # (0.6, 3) shares quality with it and adds nothing; (0.3, 1) adds only the strip outside
    # (0.6, 2)'s rectangle: flops [1, 2] x quality [0, 0.3] = 0.3  -> 4.8 + 0.3 = 5.1
    assert hypervolume_2d([(0.5, 2.0), (0.6, 2.0), (0.6, 3.0), (0.3, 1.0)], (0.0, 10.0)) == pytest.approx(5.1)


def test_points_not_better_than_the_reference_add_nothing():
    reference = (0.2, 10.0)
    assert hypervolume_2d([(0.1, 1.0)], reference) == 0.0  # quality below the reference
    assert hypervolume_2d([(0.9, 12.0)], reference) == 0.0  # flops above the reference
    assert hypervolume_2d([(0.2, 1.0), (0.9, 10.0)], reference) == 0.0  # on the reference's edges
    # a point that is inside still counts: (0.5 - 0.2) * (10 - 4) = 1.8
    assert hypervolume_2d([(0.1, 1.0), (0.5, 4.0), (0.9, 12.0)], reference) == pytest.approx(1.8)


def test_hypervolume_with_other_masks():
    # both minimised, reference (4, 4): points (1, 3) and (2, 1)
    #   (1, 3): (4 - 1) * (4 - 3) = 3;   (2, 1): (4 - 2) * (3 - 1) = 4   -> 7
    assert hypervolume_2d([(1, 3), (2, 1)], (4, 4), maximize=(False, False)) == pytest.approx(7.0)
    # the same set mirrored into maximisation
    assert hypervolume_2d([(-1, -3), (-2, -1)], (-4, -4), maximize=(True, True)) == pytest.approx(7.0)


def test_default_reference():
    assert default_reference([0.3, 0.9], [2.0, 5.0]) == (0.0, pytest.approx(5.5))
    assert default_reference([0.3, 0.9], [2.0, 5.0], worst_quality=None) == (0.3, pytest.approx(5.5))
    assert default_reference([], [], flops_reference=7.0) == (0.0, 7.0)
    with pytest.raises(ValueError):
        default_reference([], [])


# --- archive -----------------------------------------------------------------------------------

def test_archive_by_hand():
    archive = ParetoArchive(flops_reference=10.0)
    assert archive.hypervolume() == 0.0
    assert archive.add(0, 0.5, 2.0)
    assert not archive.add(1, 0.4, 3.0)  # dominated by trial 0
    assert archive.add(2, 0.2, 1.0)  # cheaper
    assert archive.add(3, 0.5, 2.0)  # duplicate of a front member: on the front too
    assert archive.add(4, 0.6, 1.5)  # dominates trials 0 and 3, not 2
    assert [e.trial_id for e in archive.front()] == [2, 4]
    assert [e.flops for e in archive.front()] == [1.0, 1.5]
    # (0.2, 1): 9 * 0.2 = 1.8; (0.6, 1.5): 8.5 * 0.4 = 3.4
    assert archive.hypervolume() == pytest.approx(5.2)
    assert len(archive) == 5
    with pytest.raises(ValueError, match="already"):
        archive.add(4, 0.1, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        archive.add(5, float("nan"), 1.0)


def test_archive_json_round_trip():
    archive = ParetoArchive()
    for trial_id, (quality, flops) in enumerate(STAIRCASE + [(0.1, 9.0)]):
        archive.add(trial_id, quality, flops)
    data = json.loads(json.dumps(archive.to_json()))
    assert data["front"] == [0, 1, 2, 3]
    assert len(data["trials"]) == 5
    again = ParetoArchive.from_json(data)
    assert again.front() == archive.front()
    assert again.hypervolume() == archive.hypervolume()
    # default reference: quality 0, flops 1.1 * 9 = 9.9
    assert archive.reference() == (0.0, pytest.approx(9.9))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("worst_quality", [0.0, None])
def test_archive_agrees_with_pareto_front_and_hypervolume_never_drops(seed, worst_quality):
    rng = np.random.default_rng(seed)
    n = 60
    # coarse grids make ties and exact duplicates common
    points = np.column_stack([rng.integers(0, 10, n) / 10, rng.integers(1, 20, n).astype(float)])
    archive = ParetoArchive(worst_quality=worst_quality)
    volumes = []
    for trial_id, (quality, flops) in enumerate(points):
        entered = archive.add(trial_id, float(quality), float(flops))
        seen = points[: trial_id + 1]
        assert entered == (trial_id in pareto_front(seen))
        assert sorted(e.trial_id for e in archive.front()) == pareto_front(seen)
        volumes.append(archive.hypervolume())
    assert all(b >= a for a, b in zip(volumes, volumes[1:]))
    assert volumes[-1] > 0
    # fronts partition the points, and no point is dominated by one of its own front or a later one
    fronts = non_dominated_sort(points)
    assert sorted(i for front in fronts for i in front) == list(range(n))
    for k, front in enumerate(fronts):
        later = [i for f in fronts[k:] for i in f]
        assert not any(dominates(points[i], points[j]) for i in later for j in front)
        if k:
            assert all(any(dominates(points[i], points[j]) for i in fronts[k - 1]) for j in front)
