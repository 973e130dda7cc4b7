"""Issue 19, item 7 (and 6's unknown task): errors that point where the user must look, through the CLI."""

from __future__ import annotations

import logging
import shutil

import yaml

from evomerge.cli import main
from tests.conftest import DEMO_TASKS, write_config


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    return err[-1]


def test_missing_data_file_is_named_beside_the_task_yaml(zoo, tmp_path, capsys) -> None:
    tasks = tmp_path / "tasks"
    shutil.copytree(DEMO_TASKS, tasks)
    data = yaml.safe_load((tasks / "demo_add.yaml").read_text())["dataset_kwargs"]["data_files"]
    name = data if isinstance(data, str) else next(iter(data.values()))
    (tasks / name).unlink()
    config = write_config(tmp_path, zoo, eval={"include_path": str(tasks)})
    assert main(["search", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert f"eval.tasks.demo_add: data file(s) {str(tasks / name)!r} not found" in line, line
    assert f"relative to the task YAML's folder {str(tasks)!r}" in line
    assert not (tmp_path / "run").exists()


def test_every_task_problem_in_one_pass_with_close_matches(zoo, tmp_path, capsys) -> None:
    config = write_config(tmp_path, zoo, eval={"tasks": [{"name": "demo_ad", "metric": "exact_match"},
                                                         {"name": "demo_rev", "metric": "exact_match"},
                                                         {"name": "demo_sort", "metric": "acc"}]})
    assert main(["search", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert line.startswith("evomerge: error: 2 task errors: "), line
    assert "unknown lm-eval task(s) demo_ad (did you mean demo_add" in line
    assert "eval.tasks.demo_sort.metric: 'acc' is not among the task's metrics: exact_match" in line


def test_a_missing_local_folder_is_not_looked_up_on_the_hub(zoo, tmp_path, capsys) -> None:
    (tmp_path / "models").mkdir()
    config = write_config(tmp_path, zoo, models={"experts": ["models/add", str(zoo["rev"])]})
    assert main(["search", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert f"models.experts.0: no such model folder {str(tmp_path / 'models' / 'add')!r}" in line, line
    assert "huggingface" not in line.lower()


def test_settings_the_strategy_ignores_are_warned(zoo, tmp_path, caplog) -> None:
    from evomerge.config import load_config

    config = write_config(tmp_path, zoo, search={"strategy": "tpe", "sigma0": 0.3, "population": 4})
    with caplog.at_level(logging.WARNING, logger="evomerge.config"):
        load_config(config)
    assert "search.sigma0: set to 0.3, but strategy tpe ignores it" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evomerge.config"):
        load_config(write_config(tmp_path, zoo, search={"strategy": "cma", "sigma0": 0.3}))
    assert "ignores" not in caplog.text


def test_merge_records_its_seed(zoo, tmp_path, capsys) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(zoo["base"]),
                                      "models": [{"model": str(zoo["add"]), "parameters": {"weight": 1.0,
                                                                                           "density": 0.5}}]}))
    assert main(["merge", str(config), "--out", str(tmp_path / "out"), "--seed", "3"]) == 0
    copied = (tmp_path / "out" / "mergekit.yaml").read_text()
    assert "# evomerge merge --seed 3" in copied
    assert yaml.safe_load(copied) == yaml.safe_load(config.read_text())  # still the same config for mergekit


def test_relative_data_files_say_how_plain_lm_eval_reads_them(tmp_path, caplog, monkeypatch) -> None:
    from evomerge.config import EvalConfig
    from evomerge.evaluate import check_tasks

    monkeypatch.chdir(tmp_path)  # not the task folder: plain lm-eval would not find demo_add.jsonl here
    config = EvalConfig(include_path=[str(DEMO_TASKS)], tasks=[{"name": "demo_add", "metric": "exact_match"}])
    with caplog.at_level(logging.INFO, logger="evomerge.evaluate"):
        check_tasks(config)
    assert "tasks demo_add: relative data_files read from each task YAML's folder" in caplog.text


def test_config_and_task_errors_in_one_pass(zoo, tmp_path, capsys) -> None:
    config = write_config(tmp_path, zoo, search={"strategy": "cmaes"},
                          eval={"tasks": [{"name": "demo_add", "metric": "acc"}]})
    assert main(["search", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "search.strategy: Input should be 'cma'" in line, line
    assert "eval.tasks.demo_add.metric: 'acc' is not among the task's metrics: exact_match" in line
