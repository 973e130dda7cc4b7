"""RouteLLM's APGR and CPT(50%) for a two-member cascade, against hand-computed values."""

from __future__ import annotations

import re

import pytest

from evomerge.config import validate
from evomerge.report import apgr, cascade_gap, cpt, format_text, gap_curve, summarize

WEAK, STRONG = 0.4, 0.8


def metrics(points: list[tuple[float, float]]) -> tuple[float, float]:
    curve = gap_curve(points, WEAK, STRONG)
    return apgr(curve, WEAK, STRONG), cpt(curve, WEAK, STRONG, 0.5)


def test_the_straight_line_is_a_random_router() -> None:
    """Mixing weak and strong at random recovers the gap linearly: APGR 0.5, CPT(50%) 0.5."""
    assert metrics([]) == pytest.approx((0.5, 0.5))
    assert metrics([(0.25, 0.5), (0.5, 0.6), (0.75, 0.7)]) == pytest.approx((0.5, 0.5))


def test_one_point_above_the_line() -> None:
    # curve (0, .4) (.5, .7) (1, .8): area .5 * 1.1 / 2 + .5 * 1.5 / 2 = .65; APGR (.65 - .4) / .4
    # CPT(50%): quality .6 on the first segment at share .5 * (.2 / .3)
    assert metrics([(0.5, 0.7)]) == pytest.approx((0.625, 1 / 3))


def test_dominated_and_duplicate_points_change_nothing() -> None:
    assert metrics([(0.5, 0.7), (0.5, 0.7), (0.5, 0.6), (0.6, 0.65), (1.0, 0.5)]) == \
        pytest.approx((0.625, 1 / 3))
    assert gap_curve([(0.5, 0.7), (0.5, 0.7), (0.6, 0.65)], WEAK, STRONG) == [(0.0, 0.4), (0.5, 0.7), (1.0, 0.8)]


def test_a_cascade_beating_the_strong_model_stays_flat_after_its_best() -> None:
    # curve (0, .4) (.5, .9), then flat: area .5 * 1.3 / 2 + .5 * .9 = .775; APGR .375 / .4
    assert metrics([(0.5, 0.9)]) == pytest.approx((0.9375, 0.2))
    assert gap_curve([(0.5, 0.9)], WEAK, STRONG) == [(0.0, 0.4), (0.5, 0.9)]


def test_reaching_half_the_gap_without_the_strong_model() -> None:
    # curve (0, .65) (1, .8): area .725; APGR .325 / .4; CPT 0
    assert metrics([(0.0, 0.65)]) == pytest.approx((0.8125, 0.0))


def record(trial: int, quality: float, label: str | None = None, served: dict | None = None,
           state: str = "complete") -> dict:
    policy = None if label else {"kind": "cascade", "members": ["expert:0", "expert:1"], "params": {}}
    return {"trial": trial, "generation": 0 if label else 1, "label": label, "state": state, "quality": quality,
            "metrics": {"t": quality}, "flops": 1e6 * (1 + (served or {}).get("expert:1", 0.0)),
            "served": served or {}, "recipe": {"policy": policy} if policy else {}, "error": None}


REFERENCES = [record(0, 0.2, "base"), record(1, WEAK, "expert:0"), record(2, STRONG, "expert:1")]


def test_cascade_gap_from_a_journal() -> None:
    trials = [*REFERENCES, record(3, 0.7, served={"expert:0": 0.5, "expert:1": 0.5}),
              record(4, 0.65, served={"expert:0": 0.4, "expert:1": 0.6}),  # dominated by trial 3
              record(5, 0.0, state="failed", served={"expert:1": 0.0})]
    gap = cascade_gap(trials, "expert:0", "expert:1")
    assert gap["apgr"] == pytest.approx(0.625) and gap["cpt50"] == pytest.approx(1 / 3)
    assert (gap["weak_quality"], gap["strong_quality"]) == (WEAK, STRONG)
    assert gap["curve"] == [[0.0, 0.4], [0.5, 0.7], [1.0, 0.8]]


@pytest.mark.parametrize("members, trials, reason", [
    (("merged", "expert:1"), REFERENCES, "merged member changes"),
    (("expert:0", "expert:1"), REFERENCES[:2], "no complete reference trial for expert:1"),
    (("expert:1", "expert:0"), REFERENCES, "expert:0 \\(0.4000\\) does not score above expert:1"),
])
def test_no_apgr_says_why(members, trials, reason) -> None:
    gap = cascade_gap(trials, *members)
    assert gap["apgr"] is None and gap["cpt50"] is None
    assert re.search(reason, gap["reason"])


def test_report_adds_it_for_a_two_member_cascade_only() -> None:
    raw = {"models": {"base": "b", "experts": ["e0", "e1"]}, "eval": {"tasks": [{"name": "t", "metric": "acc"}]},
           "policy": {"kind": "cascade", "members": ["expert:0", "expert:1"]}}
    trials = [*REFERENCES, record(3, 0.7, served={"expert:0": 0.5, "expert:1": 0.5})]
    summary = summarize(trials, validate(raw))
    assert summary["routellm"]["apgr"] == pytest.approx(0.625)
    assert "cascade expert:0 -> expert:1: APGR 0.625, CPT(50%) 0.333" in format_text(summary)
    raw["policy"]["members"] = ["expert:0", "expert:1", "base"]
    assert "routellm" not in summarize(trials, validate(raw))
    raw["policy"] = {"kind": "blend", "members": ["expert:0", "expert:1"]}
    assert "routellm" not in summarize(trials, validate(raw))
