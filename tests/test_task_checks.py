"""The configured tasks are loaded once in the driver before any worker starts: what cannot load
is one line naming the task (a worker that cannot load its tasks cannot start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.config import EvalConfig
from evomerge.errors import EvalError
from evomerge.evaluate import check_tasks

MC = {"dataset_path": "json", "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
      "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}


def tasks_folder(folder: Path, data: str = "mc.jsonl") -> Path:
    """Two multiple-choice tasks sharing a tag, a group of both, and their data (relative paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps({"q": f"{i}+1=", "choices": [str(i + 1), "0"], "label": 0})
                                             + "\n" for i in range(4)))
    for name in ("mc_a", "mc_b"):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(
            {"task": name, "tag": "mc_tag", **MC, "dataset_kwargs": {"data_files": {"test": data}}}))
    (folder / "mc_group.yaml").write_text(yaml.safe_dump(
        {"group": "mc_group", "task": ["mc_a", "mc_b"],
         "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}]}))
    return folder


def config(folder: Path, *names: str) -> EvalConfig:
    return EvalConfig(include_path=[str(folder)], tasks=[{"name": n, "metric": "acc"} for n in names])


def test_tasks_named_directly_load_from_any_working_directory(tmp_path, monkeypatch) -> None:
    folder = tasks_folder(tmp_path / "tasks")
    monkeypatch.chdir(tmp_path)
    check_tasks(config(folder, "mc_a", "mc_b"))


def test_a_tag_is_refused_with_what_to_name_instead(tmp_path) -> None:
    with pytest.raises(EvalError, match="eval.tasks.mc_tag: an lm-eval tag, which has no score of its own"):
        check_tasks(config(tasks_folder(tmp_path), "mc_a", "mc_tag"))


def test_a_missing_data_file_names_the_task_and_the_file(tmp_path) -> None:
    folder = tasks_folder(tmp_path, data="gone.jsonl")
    # named where evomerge looked: beside the task YAML (issue 19), not in the working directory
    expected = (rf"eval.tasks.mc_a: data file\(s\) '{folder / 'gone.jsonl'}' not found "
                rf"\(data_files are read relative to the task YAML's folder '{folder}'\)")
    with pytest.raises(EvalError, match=expected) as caught:
        check_tasks(config(folder, "mc_a"))
    assert "\n" not in str(caught.value)


def test_a_group_loads_with_absolute_data_files_and_says_why_not_with_relative_ones(tmp_path, monkeypatch) -> None:
    relative = tasks_folder(tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EvalError, match="eval.tasks.mc_group: lm-eval could not load it: .*give absolute paths there"):
        check_tasks(config(relative, "mc_group"))
    absolute = tmp_path / "abs"
    tasks_folder(absolute, data=str(absolute / "mc.jsonl"))
    check_tasks(config(absolute, "mc_group"))


def test_an_unknown_task_is_named(tmp_path) -> None:
    with pytest.raises(EvalError, match="unknown lm-eval task.*nosuchtask"):
        check_tasks(config(tasks_folder(tmp_path), "nosuchtask"))


def test_a_metric_or_filter_the_task_does_not_list_is_named_before_any_worker_starts(tmp_path) -> None:
    folder = tasks_folder(tmp_path)
    with pytest.raises(EvalError, match="eval.tasks.mc_a.metric: 'f1' is not among the task's metrics: acc"):
        check_tasks(EvalConfig(include_path=[str(folder)], tasks=[{"name": "mc_a", "metric": "f1"}]))
    filtered = EvalConfig(include_path=[str(folder)], tasks=[{"name": "mc_a", "metric": "acc", "filter": "digits"}])
    check_tasks(EvalConfig(include_path=[str(folder)], tasks=[{"name": "mc_a", "metric": "acc"}]))
    (folder / "mc_a.yaml").write_text((folder / "mc_a.yaml").read_text() + yaml.safe_dump(
        {"filter_list": [{"name": "first", "filter": [{"function": "take_first"}]}]}))
    with pytest.raises(EvalError, match="eval.tasks.mc_a.filter: 'digits' is not among the task's filters: first"):
        check_tasks(filtered)


def test_a_group_without_aggregation_says_so() -> None:
    from evomerge.config import TaskSpec
    from evomerge.evaluate import read_score

    with pytest.raises(EvalError, match="eval.tasks.g: lm-eval reports no metric for it"):
        read_score({"results": {"g": {"alias": "g", " ": " "}}}, TaskSpec(name="g", metric="acc"))
