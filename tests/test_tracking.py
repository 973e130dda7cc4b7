"""Tracking: the real search loop logs into a real local MLflow store, read back with MlflowClient."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mlflow
import pytest

from evomerge.config import validate
from evomerge.genome import GenomeLayout
from evomerge.run_dir import RunDir, canonical
from evomerge.search import run_loop

from fakes import FakePool, make_config

BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0)}


def tracked(generations: int = 3, **tracking):
    raw = make_config("cma", generations=generations).to_yaml_dict()
    raw["tracking"] = {"report_to": ["mlflow"], **tracking}
    return validate(raw)


def start(folder: Path, config) -> tuple[RunDir, GenomeLayout]:
    layout = GenomeLayout.build("task_arithmetic", "layer", 3, 2, BOUNDS)
    return RunDir.create(folder, config, layout.describe()), layout


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_resumed_run_logs_every_trial_once_into_one_tracker_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tracked(tracking_uri=uri, experiment="evo")
    run, layout = start(tmp_path / "run", config)
    with pytest.raises(KeyboardInterrupt):  # stopped in the middle of generation 1
        run_loop(run, config, layout, FakePool(stop_after=4 + 6 + 3))
    state = json.loads((run.path / "tracking.json").read_text())["mlflow"]
    client = mlflow.MlflowClient(uri)
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    logged_before = {step for step, _ in history(client, state["run_id"], "trial_state")}
    assert logged_before == set(range(4 + 6))  # generation 0 (references + 6 candidates), logged at its end

    summary = run_loop(RunDir.open(run.path), config, layout, FakePool())
    records = run.records()
    (experiment,) = [e for e in client.search_experiments() if e.name == "evo"]
    (tracker_run,) = client.search_runs([experiment.experiment_id])  # one tracker run for the evomerge run
    assert tracker_run.info.run_id == state["run_id"] and tracker_run.info.status == "FINISHED"
    steps = Counter(step for step, _ in history(client, state["run_id"], "trial_state"))
    assert set(steps) == {r["trial"] for r in records} and set(steps.values()) == {1}  # every trial, once
    assert history(client, state["run_id"], "trial_quality") == sorted((r["trial"], r["quality"]) for r in records)
    assert history(client, state["run_id"], "task_t") == sorted((r["trial"], r["metrics"]["t"]) for r in records)
    per_generation = history(client, state["run_id"], "best_so_far")
    assert per_generation == [(g["generation"], g["best_so_far"]) for g in summary["generations"]]
    assert [step for step, _ in history(client, state["run_id"], "hypervolume")] == [0, 1, 2]
    assert history(client, state["run_id"], "front_size")[-1] == (2, len(summary["pareto"]))
    params = client.get_run(state["run_id"]).data.params
    assert params["search.strategy"] == "cma" and params["seed"] == "0"
    artifacts = {a.path for a in client.list_artifacts(state["run_id"])}
    assert {"summary.json", "config.yaml", "journal.jsonl", "report.md"} <= artifacts
    assert tracker_run.data.tags["best_trial"] == str(summary["best"]["trial"])

    straight, layout = start(tmp_path / "straight", config.model_copy(update={"tracking": config.tracking.model_copy(
        update={"experiment": "straight"})}))
    run_loop(straight, straight.config(), layout, FakePool())
    assert canonical(straight.records()) == canonical(records)  # tracking changes nothing in the search


def test_the_default_store_lives_in_the_run_directory(tmp_path: Path) -> None:
    config = tracked(generations=1)
    run, layout = start(tmp_path / "run", config)
    run_loop(run, config, layout, FakePool())
    client = mlflow.MlflowClient(f"sqlite:///{run.path.resolve() / 'mlflow.db'}")
    run_id = json.loads((run.path / "tracking.json").read_text())["mlflow"]["run_id"]
    assert len(history(client, run_id, "trial_state")) == len(run.records())
    assert (run.path / "mlflow-artifacts").is_dir()


def test_an_unknown_tracker_is_refused_by_name() -> None:
    from evomerge.errors import ConfigError

    raw = make_config().to_yaml_dict()
    raw["tracking"] = {"report_to": ["mlflow", "comet"]}
    with pytest.raises(ConfigError, match="tracking.report_to"):
        validate(raw)
