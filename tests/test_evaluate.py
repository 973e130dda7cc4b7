"""Reading lm-eval results: metric keys, directions, NaN, quality."""

import pytest

from evomerge.config import TaskSpec
from evomerge.errors import EvalError
from evomerge.evaluate import TaskScore, quality, read_score

RESULTS = {
    "results": {"a": {"alias": "a", "exact_match,none": 0.5, "exact_match_stderr,none": 0.1},
                "p": {"word_perplexity,none": 12.0},
                "n": {"acc,none": float("nan")}},
    "higher_is_better": {"a": {"exact_match": True}, "p": {"word_perplexity": False}, "n": {"acc": True}},
}


def test_metric_and_direction() -> None:
    assert read_score(RESULTS, TaskSpec(name="a", metric="exact_match")) == TaskScore(0.5, True)
    assert read_score(RESULTS, TaskSpec(name="p", metric="word_perplexity")) == TaskScore(12.0, False)
    assert read_score(RESULTS, TaskSpec(name="p", metric="word_perplexity", higher_is_better=True)).higher_is_better


def test_missing_metric_lists_what_lm_eval_reports() -> None:
    with pytest.raises(EvalError, match="'acc,none' not reported; lm-eval reports: exact_match,none"):
        read_score(RESULTS, TaskSpec(name="a", metric="acc"))
    with pytest.raises(EvalError, match="eval.tasks.zz: lm-eval returned no results"):
        read_score(RESULTS, TaskSpec(name="zz", metric="acc"))


def test_nan_metric_fails_the_candidate() -> None:
    with pytest.raises(EvalError, match="metric 'acc,none' is nan"):
        read_score(RESULTS, TaskSpec(name="n", metric="acc"))


def test_quality_is_a_weighted_mean_with_lower_is_better_negated() -> None:
    tasks = [TaskSpec(name="a", metric="exact_match", weight=3.0), TaskSpec(name="p", metric="x", weight=1.0)]
    scores = {"a": TaskScore(0.5, True), "p": TaskScore(2.0, False)}
    assert quality(scores, tasks) == pytest.approx((3 * 0.5 - 2.0) / 4)


def test_relative_data_files_resolve_against_the_task_folder(tmp_path, monkeypatch) -> None:
    from evomerge.config import EvalConfig
    from evomerge.evaluate import task_manager, task_spec

    repo_tasks = __import__("pathlib").Path(__file__).resolve().parents[1] / "evals" / "demo"
    monkeypatch.chdir(tmp_path)  # anywhere but the task folder
    config = EvalConfig(include_path=[str(repo_tasks)], tasks=[TaskSpec(name="demo_add", metric="exact_match")])
    manager = task_manager(config)
    spec = task_spec(manager, "demo_add")
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(repo_tasks / "demo_add.jsonl")
    loaded = manager.load([spec])
    assert len(list(loaded["tasks"]["demo_add"].test_docs())) == 200
