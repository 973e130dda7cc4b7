"""Pareto dominance, non-dominated sorting and the exact 2-D hypervolume.

Points are sequences of objective values; ``maximize[k]`` says whether objective ``k`` is
maximised.  The default ``(True, False)`` is this project's (quality, FLOPs): quality up,
inference FLOPs down.  Internally every point is turned into a minimisation problem by
negating the maximised objectives.

Conventions
-----------
* ``a`` dominates ``b`` when ``a`` is no worse in every objective and strictly better in at
  least one.  Equal points do not dominate each other, so **exact duplicates all stay on
  the front** (and in the same front of ``non_dominated_sort``).
* Hypervolume reference point (for (quality, FLOPs)): quality reference = the worst
  possible quality (0.0 for metrics in [0, 1]; otherwise the worst observed), FLOPs
  reference = 1.1 x the largest observed FLOPs unless the user gives one
  (``default_reference``).  Only points strictly better than the reference in *every*
  objective add volume; the others contribute nothing.  Moving the reference towards
  worse values never shrinks the volume, so a reference derived from "worst observed"
  values keeps the archive's hypervolume non-decreasing as trials are added.
* NaN objective values are refused (``ValueError``): a failed trial has no point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "QUALITY_FLOPS",
    "ArchiveEntry",
    "ParetoArchive",
    "default_reference",
    "dominates",
    "hypervolume_2d",
    "non_dominated_sort",
    "pareto_front",
]

QUALITY_FLOPS: tuple[bool, bool] = (True, False)  # maximise quality, minimise FLOPs


def _as_minimised(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> np.ndarray:
    """(n, m) float array with maximised objectives negated, so that lower is better everywhere."""
    array = np.asarray(points, dtype=float).reshape(len(points), -1)
    if array.shape[1] != len(maximize):
        raise ValueError(f"points have {array.shape[1]} objectives, maximize has {len(maximize)}")
    if np.isnan(array).any():
        raise ValueError("objective values must not be NaN")
    signs = np.where(np.asarray(maximize, dtype=bool), -1.0, 1.0)
    return array * signs


def dominates(a: Sequence[float], b: Sequence[float], maximize: Sequence[bool] = QUALITY_FLOPS) -> bool:
    """True when ``a`` is no worse than ``b`` in every objective and strictly better in one."""
    sa, sb = _as_minimised([a, b], maximize)
    return bool(np.all(sa <= sb) and np.any(sa < sb))


def _dominance_matrix(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> np.ndarray:
    """``D[i, j]`` is True when point i dominates point j."""
    s = _as_minimised(points, maximize)
    no_worse = np.all(s[:, None, :] <= s[None, :, :], axis=2)
    better = np.any(s[:, None, :] < s[None, :, :], axis=2)
    return no_worse & better


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool] = QUALITY_FLOPS) -> list[int]:
    """Indices (ascending) of the points no other point dominates; duplicates are all kept."""
    if len(points) == 0:
        return []
    dominated = _dominance_matrix(points, maximize).any(axis=0)
    return [int(i) for i in np.flatnonzero(~dominated)]


def non_dominated_sort(points: Sequence[Sequence[float]],
                       maximize: Sequence[bool] = QUALITY_FLOPS) -> list[list[int]]:
    """Fronts 0, 1, 2, ... (Deb et al. 2002): front k holds the points dominated only by points of
    fronts < k.  Each front's indices are ascending; every index appears exactly once."""
    if len(points) == 0:
        return []
    matrix = _dominance_matrix(points, maximize)
    remaining_dominators = matrix.sum(axis=0)
    fronts: list[list[int]] = []
    current = np.flatnonzero(remaining_dominators == 0)
    while current.size:
        fronts.append([int(i) for i in current])
        remaining_dominators = remaining_dominators - matrix[current].sum(axis=0)
        remaining_dominators[current] = -1  # placed
        current = np.flatnonzero(remaining_dominators == 0)
    return fronts


def hypervolume_2d(points: Sequence[Sequence[float]], reference: Sequence[float],
                   maximize: Sequence[bool] = QUALITY_FLOPS) -> float:
    """Exact area dominated by ``points`` and bounded by ``reference`` (2 objectives).

    In minimisation form, sort the points that beat the reference in both objectives by the
    first objective (ties: better second first), and sweep: each point whose second objective
    improves on the best so far (``y_best``, starting at ``r_y``) adds the rectangle
    ``(r_x - x) * (y_best - y)``.
    """
    if len(maximize) != 2:
        raise ValueError("hypervolume_2d needs exactly 2 objectives")
    if len(points) == 0:
        return 0.0
    s = _as_minimised(points, maximize)
    r = _as_minimised([reference], maximize)[0]
    inside = s[np.all(s < r, axis=1)]
    area, y_best = 0.0, r[1]
    for x, y in sorted(map(tuple, inside)):
        if y < y_best:
            area += (r[0] - x) * (y_best - y)
            y_best = y
    return float(area)


def default_reference(qualities: Sequence[float], flops: Sequence[float], *, worst_quality: float | None = 0.0,
                      flops_reference: float | None = None, margin: float = 1.1) -> tuple[float, float]:
    """The (quality, FLOPs) reference point.

    quality: ``worst_quality`` (the worst possible value, 0.0 for metrics in [0, 1]), or the
    worst observed quality when None.  FLOPs: ``flops_reference``, or ``margin`` x the largest
    observed FLOPs when None.
    """
    if (worst_quality is None and len(qualities) == 0) or (flops_reference is None and len(flops) == 0):
        raise ValueError("no observations to derive the reference point from")
    quality_ref = float(min(qualities)) if worst_quality is None else float(worst_quality)
    flops_ref = margin * float(max(flops)) if flops_reference is None else float(flops_reference)
    return (quality_ref, flops_ref)


@dataclass(frozen=True)
class ArchiveEntry:
    trial_id: int
    quality: float
    flops: float


class ParetoArchive:
    """Trials added one at a time; keeps every trial and the current (quality up, FLOPs down) front.

    ``worst_quality`` and ``flops_reference`` give the hypervolume reference (see
    ``default_reference``).  Left as None they follow the trials added so far (worst quality,
    1.1 x largest FLOPs); those only move towards worse values, so ``hypervolume()`` never
    decreases as trials are added.
    """

    def __init__(self, *, worst_quality: float | None = 0.0, flops_reference: float | None = None) -> None:
        self.worst_quality = None if worst_quality is None else float(worst_quality)
        self.flops_reference = None if flops_reference is None else float(flops_reference)
        self._trials: dict[int, ArchiveEntry] = {}
        self._front: dict[int, ArchiveEntry] = {}

    def __len__(self) -> int:
        return len(self._trials)

    def __contains__(self, trial_id: int) -> bool:
        return trial_id in self._trials

    def add(self, trial_id: int, quality: float, flops: float) -> bool:
        """Record a trial; True when it enters the front (no front member dominates it).

        Front members it dominates leave the front.  A trial equal to a front member enters too.
        """
        if trial_id in self._trials:
            raise ValueError(f"trial {trial_id} is already in the archive")
        if math.isnan(quality) or math.isnan(flops):
            raise ValueError(f"trial {trial_id}: quality and flops must not be NaN")
        entry = ArchiveEntry(trial_id, float(quality), float(flops))
        self._trials[trial_id] = entry
        point = (entry.quality, entry.flops)
        if any(dominates((m.quality, m.flops), point) for m in self._front.values()):
            return False
        for other in [m for m in self._front.values() if dominates(point, (m.quality, m.flops))]:
            del self._front[other.trial_id]
        self._front[trial_id] = entry
        return True

    def front(self) -> list[ArchiveEntry]:
        """Front members by FLOPs ascending (then quality descending, then trial id)."""
        return sorted(self._front.values(), key=lambda e: (e.flops, -e.quality, e.trial_id))

    def reference(self) -> tuple[float, float]:
        trials = self._trials.values()
        return default_reference([e.quality for e in trials], [e.flops for e in trials],
                                 worst_quality=self.worst_quality, flops_reference=self.flops_reference)

    def hypervolume(self) -> float:
        """``hypervolume_2d`` of the front against ``reference()``; 0.0 when empty."""
        if not self._trials:
            return 0.0
        return hypervolume_2d([(e.quality, e.flops) for e in self._front.values()], self.reference())

    def to_json(self) -> dict[str, Any]:
        """Plain data: the reference settings, every trial (in insertion order) and the front's ids."""
        return {
            "worst_quality": self.worst_quality,
            "flops_reference": self.flops_reference,
            "trials": [asdict(e) for e in self._trials.values()],
            "front": [e.trial_id for e in self.front()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParetoArchive:
        archive = cls(worst_quality=data["worst_quality"], flops_reference=data["flops_reference"])
        for item in data["trials"]:
            archive.add(int(item["trial_id"]), item["quality"], item["flops"])
        return archive
