"""eval.subsample (evomerge/racing.py): promotion, the optimiser's losses, the journal, resume.

The loop is the real one; the pool is the deterministic fake one, with a subset score that is the
full score plus a per-trial error, so a subset ranking differs from the full one."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from evomerge.config import validate
from evomerge.errors import ConfigError, EvalError
from evomerge.genome import GenomeLayout, Recipe
from evomerge.racing import fitness, promoted
from evomerge.run_dir import SUBSAMPLE, RunDir, canonical
from evomerge.search import run_loop
from evomerge.trial import Trial, TrialResult, TrialState

from conftest import says
from fakes import FakePool, make_config

BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0)}
SUBSET_ERROR = 0.05  # a subset score is the full one plus up to this much, per trial


def subsample_config(generations: int = 4, fraction: float = 0.25, promote: float = 0.5, strategy: str = "cma"):
    raw = make_config(strategy, generations).to_yaml_dict()
    raw["eval"].update(limit=100, subsample={"fraction": fraction, "promote": promote})
    return validate(raw)


class SubsetPool(FakePool):
    """FakePool whose score on a subset (trial.limit set) is off by a deterministic per-trial error."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scored: list[tuple[int, int | float | None]] = []  # (trial, limit) in evaluation order

    def run(self, trials, then=()):
        for trial, result in super().run(trials, then):
            self.scored.append((trial.id, trial.limit))
            if trial.limit is not None and result.ok:
                error = SUBSET_ERROR * math.sin(7.0 * trial.id)
                result = dataclasses.replace(result, quality=result.quality + error,
                                             metrics={"t": result.quality + error})
            yield trial, result


def start(tmp_path: Path, config, name: str = "run") -> tuple[RunDir, GenomeLayout]:
    layout = GenomeLayout.build("task_arithmetic", "layer", 3, 2, BOUNDS)
    return RunDir.create(tmp_path / name, config, layout.describe()), layout


# -- config ---------------------------------------------------------------------------------

def test_subset_limit_and_defaults() -> None:
    assert subsample_config().eval.subset_limit == 25
    assert subsample_config(fraction=0.3).eval.subset_limit == 30
    raw = make_config().to_yaml_dict()
    raw["eval"].update(limit=10, subsample={})
    config = validate(raw)
    assert (config.eval.subsample.fraction, config.eval.subsample.promote) == (0.25, 0.5)
    assert config.eval.subset_limit == 3  # ceil(2.5)
    raw["eval"].update(limit=None)
    assert validate(raw).eval.subset_limit == 0.25  # lm-eval: the first quarter of each task
    assert make_config().eval.subsample is None and make_config().eval.subset_limit is None


@pytest.mark.parametrize("limit, subsample, message", [
    (100, {"fraction": 0.0}, says("eval.subsample.fraction", "0")),
    (100, {"fraction": 1.0}, says("eval.subsample.fraction", "1")),
    (100, {"promote": 1.5}, says("eval.subsample.promote", "1")),
    (100, {"promote": 0}, says("eval.subsample.promote", "0")),
    (100, {"fraction": 0.5, "rungs": 3}, "eval.subsample.rungs: unknown key; expected one of: fraction, promote"),
    (2, {"fraction": 0.6}, "eval.subsample: fraction 0.6 of limit 2 leaves 2 documents per task, expected fewer"),
])
def test_bad_subsample_is_one_line_naming_the_field(limit, subsample, message) -> None:
    raw = make_config().to_yaml_dict()
    raw["eval"].update(limit=limit, subsample=subsample)
    with pytest.raises(ConfigError, match="^config: 1 error") as info:
        validate(raw)
    assert re.search(message, str(info.value)) and "\n" not in str(info.value)


# -- promotion and losses ---------------------------------------------------------------------

def trials(n: int) -> list[Trial]:
    return [Trial(i, 1, Recipe("linear", "global", 1, {}), (0.5,)) for i in range(n)]


def ok(trial_id: int, quality: float) -> TrialResult:
    return TrialResult(trial_id, TrialState.COMPLETE, quality=quality)


def failed(trial_id: int) -> TrialResult:
    return TrialResult(trial_id, TrialState.FAILED, error="ValueError: injected")


def test_promotion_takes_the_best_share_by_subset_quality() -> None:
    subset = {0: ok(0, 0.2), 1: ok(1, 0.9), 2: failed(2), 3: ok(3, 0.5), 4: ok(4, 0.5), 5: ok(5, 0.1)}
    assert promoted(trials(6), subset, 0.5) == {1, 3, 4}
    assert promoted(trials(6), subset, 0.3) == {1, 3}  # ceil(1.8)
    assert promoted(trials(6), subset, 0.25) == {1, 3}  # ceil(1.5); 3 and 4 tie: the earlier trial
    assert promoted(trials(6), subset, 0.01) == {1}  # at least one
    assert promoted(trials(6), subset, 1.0) == {0, 1, 3, 4, 5}  # a failed one never
    assert promoted(trials(10), {i: ok(i, i / 10) for i in range(10)}, 0.3) == {7, 8, 9}  # 0.3 x 10 is 3


def test_held_back_candidates_rank_below_every_promoted_one() -> None:
    subset = [ok(0, 0.90), ok(1, 0.80), ok(2, 0.70), ok(3, 0.60), failed(4)]
    full = [ok(0, 0.50), ok(1, 0.55), None, None, None]  # the subset flattered 0 and 1
    losses = fitness(subset, full, generation=1)
    assert losses[:2] == [-0.50, -0.55]  # promoted: -full quality
    assert losses[2] == pytest.approx(-0.50)  # held back: no better than the worst promoted one
    assert losses[3] == pytest.approx(-0.40)  # ... keeping the subset's spacing (0.1 behind 2)
    assert losses[4] == pytest.approx(0.60)  # failed: the worst finite loss plus one
    order = sorted(range(5), key=lambda i: (losses[i], i))
    assert order == [1, 0, 2, 3, 4]


def test_no_penalty_when_the_subset_already_ranks_held_back_ones_lower() -> None:
    losses = fitness([ok(0, 0.5), ok(1, 0.2)], [ok(0, 0.6), None], generation=0)
    assert losses == [-0.6, -0.2]


def test_a_promoted_candidate_failing_on_the_full_limit_is_worst() -> None:
    losses = fitness([ok(0, 0.9), ok(1, 0.2)], [failed(0), None], generation=0)
    assert losses == [pytest.approx(0.8), -0.2]


def test_every_candidate_failing_on_the_subset_stops_the_run() -> None:
    with pytest.raises(EvalError, match="every candidate of generation 3 failed .*injected"):
        fitness([failed(0), failed(1)], [None, None], generation=3)


# -- the loop ---------------------------------------------------------------------------------

def test_subsample_run_journals_limits_and_ranks_full_qualities_only(tmp_path: Path) -> None:
    config = subsample_config()
    run, layout = start(tmp_path, config)
    pool = SubsetPool()
    summary = run_loop(run, config, layout, pool)
    records = run.lines()
    assert len(records) == len({r["trial"] for r in records}) == 4 + 4 * 6  # one line per trial, as always
    references = [r for r in records if r["label"] is not None]
    assert all(r["state"] == "complete" and r["limit"] == 100 and "subset" not in r for r in references)
    stage = {r["trial"]: r for r in run.records(SUBSAMPLE)}
    assert sorted(stage) == sorted(r["trial"] for r in records if r["label"] is None)
    assert all(r["limit"] == 25 for r in stage.values())
    for generation in range(4):
        candidates = [r for r in records if r["generation"] == generation and r["label"] is None]
        climbed = [r for r in candidates if r["state"] == "complete"]
        held = [r for r in candidates if r["state"] == "pruned"]
        assert len(climbed) == 3 and len(held) == 3  # ceil(0.5 x 6)
        assert min(stage[r["trial"]]["quality"] for r in climbed) >= max(r["quality"] for r in held)
        for r in climbed:
            assert r["limit"] == 100 and r["subset"]["limit"] == 25
            assert r["subset"]["quality"] == stage[r["trial"]]["quality"] != r["quality"]
        for r in held:
            assert r["limit"] == 25 and r["quality"] == stage[r["trial"]]["quality"]
    # the pool saw every candidate on the subset, the promoted ones and references on the full limit
    full_ids = {r["trial"] for r in records if r["state"] == "complete"}
    assert sorted(t for t, limit in pool.scored if limit is None) == sorted(full_ids)
    assert sorted(t for t, limit in pool.scored if limit == 25) == sorted(stage)
    # the report ranks full-limit qualities only
    held_ids = {r["trial"] for r in records if r["state"] == "pruned"}
    assert summary["subset_only"] == len(held_ids) == 12
    assert summary["best"]["trial"] in full_ids
    assert not {e["trial"] for e in summary["pareto"]} & held_ids
    assert sum(g.get("subset_only", 0) for g in summary["generations"]) == 12
    assert sum(g["trials"] for g in summary["generations"]) == len(records)


def test_without_subsample_nothing_changes(tmp_path: Path) -> None:
    config = make_config()
    run, layout = start(tmp_path, config)
    pool = SubsetPool()
    summary = run_loop(run, config, layout, pool)
    assert all(limit is None for _, limit in pool.scored)
    assert not any({"limit", "subset"} & set(r) for r in run.records())
    assert not (run.path / SUBSAMPLE).exists() and "subset_only" not in summary


def test_subsample_search_still_improves(tmp_path: Path) -> None:
    config = subsample_config(generations=12)
    run, layout = start(tmp_path, config)
    summary = run_loop(run, config, layout, SubsetPool())
    references = max(r["quality"] for r in summary["references"])
    assert summary["best_evolved"]["quality"] > references


# evaluation order: generation 0 subset 1-6, references + promoted 7-13; generation 1 subset 14-19, full 20-22; ...
@pytest.mark.parametrize("stop_after", [3, 9, 12, 16, 21, 30])
def test_resume_mid_generation_equals_uninterrupted(tmp_path: Path, stop_after: int) -> None:
    config = subsample_config(generations=4)
    run, layout = start(tmp_path, config, "straight")
    run_loop(run, config, layout, SubsetPool())
    expected, expected_stage = canonical(run.records()), canonical(run.records(SUBSAMPLE))

    run, layout = start(tmp_path, config, "interrupted")
    first = SubsetPool(stop_after=stop_after)
    with pytest.raises(KeyboardInterrupt):
        run_loop(run, config, layout, first)
    second = SubsetPool()
    run_loop(RunDir.open(run.path), config, layout, second)
    assert canonical(run.records()) == expected
    assert canonical(run.records(SUBSAMPLE)) == expected_stage
    assert not set(first.scored) & set(second.scored)  # nothing scored twice at the same limit


def test_torn_subset_line_is_scored_again(tmp_path: Path) -> None:
    config = subsample_config(generations=2)
    run, layout = start(tmp_path, config, "straight")
    run_loop(run, config, layout, SubsetPool())
    expected = canonical(run.records())

    run, layout = start(tmp_path, config, "torn")
    with pytest.raises(KeyboardInterrupt):
        run_loop(run, config, layout, SubsetPool(stop_after=2))  # two subset lines of generation 0
    with open(run.path / SUBSAMPLE, "a") as handle:
        handle.write('{"trial": 5, "qual')
    second = SubsetPool()
    run_loop(RunDir.open(run.path), config, layout, second)
    assert canonical(run.records()) == expected
    assert sorted(t for t, limit in second.scored if limit == 25 and t < 10) == [4, 5, 6, 7]  # 9, 8 kept
    assert len(run.records(SUBSAMPLE)) == 2 * 6


def test_the_report_tells_how_alike_subset_and_full_limit_ranked_the_promoted(tmp_path: Path) -> None:
    from evomerge.report import format_markdown, format_text

    config = subsample_config()
    run, layout = start(tmp_path, config)
    summary = run_loop(run, config, layout, SubsetPool())
    promoted_lines = [r for r in run.lines() if "subset" in r]
    assert summary["subsample"]["pairs"] == len(promoted_lines) == 12
    pairs = [(r["subset"]["quality"], r["quality"]) for r in promoted_lines]
    assert summary["subsample"]["spearman"] == pytest.approx(spearman_reference(pairs))
    assert -1.0 <= summary["subsample"]["spearman"] < 1.0  # the fake subset error reorders some
    assert f"Spearman {summary['subsample']['spearman']:.2f} over the 12 promoted" in format_text(summary)
    assert "Spearman" in format_markdown(summary)


def spearman_reference(pairs: list[tuple[float, float]]) -> float:
    """Pearson's correlation of the ranks, written out independently (no ties in these pairs)."""
    a, b = zip(*pairs)
    ra = [sorted(a).index(x) for x in a]
    rb = [sorted(b).index(y) for y in b]
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


@pytest.mark.parametrize("a,b,expected", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 1, 2, 3], [1, 2, 3, 4], 0.9486832980505138),  # a tie at its mean rank (scipy's value)
    ([1, 2], [1, 2], None),  # too few
    ([1, 1, 1], [1, 2, 3], None),  # a constant side
])
def test_spearman(a, b, expected) -> None:
    from evomerge.racing import spearman

    got = spearman(a, b)
    assert got == (None if expected is None else pytest.approx(expected))


def test_an_older_journals_subset_only_lines_read_as_pruned(tmp_path: Path) -> None:
    run, _ = start(tmp_path, subsample_config())
    line = {"trial": 0, "generation": 0, "stage": "ps", "label": None, "quality": 0.9, "limit": 25}
    run.append({**line, "state": "complete", "fidelity": "subset"})  # how subset-only trials were written
    run.append({**line, "trial": 1, "state": "complete", "fidelity": "full", "limit": 100})
    assert [r["state"] for r in run.records()] == ["pruned", "complete"]
