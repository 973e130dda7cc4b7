"""Experiment tracking: a run logged to MLflow, as transformers' Trainer does with `report_to`.

    tracking:
      report_to: [mlflow]
      tracking_uri: sqlite:///path/mlflow.db   # default: RUN/mlflow.db; a server URL works too
      experiment: my-search                    # default: the run's name

What is logged, into one tracker run per evomerge run:
- at the start: the resolved config as flat parameters (`models.base`, `search.strategy`, ...);
- per trial, once, with the trial id as the step: `trial_state` (1 complete, 0 failed),
  `trial_quality`, `trial_flops`, `trial_generation` and each task's metric as `task_<name>`;
  a trial scored only on the `eval.subsample` subset is logged as `trial_subset_quality`;
- per generation, with the generation as the step: `best_quality`, `mean_quality`,
  `best_so_far`, `hypervolume`, `failed` and `front_size`;
- at the end: `summary.json`, `config.yaml`, `journal.jsonl`, `report.md` (the summary as
  Markdown) and whatever plots `evomerge report` drew, as artifacts.

Resume: the tracker run's id is kept in RUN/tracking.json, so a resumed run logs into the same
tracker run; the trials and generations it already holds are read back from the tracker
(`trial_state`'s steps) and never logged twice. Trials are logged when their generation ends
(from the journal), so a run killed mid-generation logs those trials at the next generation
end after resume.

Everything stays local by default (an SQLite file in the run directory); nothing here needs the
network. MLflow is imported only when a run asks for it (`pip install 'evomerge[track]'`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from evomerge.config import RunConfig
from evomerge.errors import ConfigError
from evomerge.run_dir import RunDir, write_atomic
from evomerge.trial import TrialState

logger = logging.getLogger(__name__)

STATE_FILE = "tracking.json"
REPORT_FILES = ("summary.json", "config.yaml", "journal.jsonl", "subsample.jsonl", "estimate.jsonl",
                "report.md", "pareto.png",
                "progress.png")


class Tracker:
    """What the search loop calls; this base class logs nothing (no `tracking.report_to`)."""

    def generation(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """After a generation's checkpoint: every journaled trial not logged yet, and the progress."""

    def finish(self, summary: dict[str, Any], run: RunDir) -> None:
        """The run reached the end of its budget: log the report files, close the tracker run."""

    def close(self, status: str = "KILLED") -> None:
        """The run stopped (an error, Ctrl-C): mark the tracker run; a later resume continues it."""


def open_tracker(run: RunDir, config: RunConfig) -> Tracker:
    """The tracker of `config.tracking` for `run` (the base class when nothing is configured)."""
    if not config.tracking.report_to:
        return Tracker()
    return MlflowTracker(run, config)


class MlflowTracker(Tracker):
    """One MLflow run per evomerge run, through `MlflowClient` (no global MLflow state is touched)."""

    def __init__(self, run: RunDir, config: RunConfig):
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise ConfigError("tracking.report_to: mlflow is not installed (pip install 'evomerge[track]')") from exc
        settings = config.tracking
        self.uri = settings.tracking_uri or f"sqlite:///{run.path.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        state = read_state(run.path)
        known = state.get("mlflow") if state.get("mlflow", {}).get("tracking_uri") == self.uri else None
        if known is not None:
            self.run_id = known["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            logger.info("tracking: continuing MLflow run %s at %s", self.run_id, self.uri)
        else:
            experiment_id = self._experiment(settings.experiment or config.name, run.path)
            created = self.client.create_run(experiment_id, run_name=settings.run_name or run.path.name,
                                             tags={"evomerge.run_dir": str(run.path.resolve())})
            self.run_id = created.info.run_id
            self._log_params(config)
            state["mlflow"] = {"tracking_uri": self.uri, "run_id": self.run_id, "experiment_id": experiment_id}
            write_atomic(run.path / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode())
            logger.info("tracking: MLflow run %s at %s", self.run_id, self.uri)
        self.trials = {m.step for m in self.client.get_metric_history(self.run_id, "trial_state")}
        self.generations = {m.step for m in self.client.get_metric_history(self.run_id, "best_so_far")}

    def _experiment(self, name: str, run_path: Path) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        # A local store keeps its artifacts beside it (MLflow's default would be ./mlruns in the working directory).
        location = (run_path.resolve() / "mlflow-artifacts").as_uri() if self.uri.startswith("sqlite:") else None
        return self.client.create_experiment(name, artifact_location=location)

    def _log_params(self, config: RunConfig) -> None:
        from mlflow.entities import Param

        flat = flatten(config.model_dump(mode="json", exclude_none=True))
        params = [Param(key, str(value)[:6000]) for key, value in flat.items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def generation(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for record in sorted(records, key=lambda r: r["trial"]):
            if record["trial"] in self.trials:
                continue
            metrics += trial_metrics(record, now)
            self.trials.add(record["trial"])
        for g in summary["generations"]:
            if g["generation"] in self.generations:
                continue
            values = {"best_quality": g["best_quality"], "mean_quality": g["mean_quality"],
                      "best_so_far": g["best_so_far"], "hypervolume": g["hypervolume"], "failed": g["failed"]}
            if g is summary["generations"][-1]:
                values["front_size"] = len(summary["pareto"])
            metrics += [Metric(key, float(value), now, g["generation"]) for key, value in values.items()
                        if value is not None and math.isfinite(float(value))]
            if g["best_so_far"] is None:  # the marker of a logged generation must exist
                metrics.append(Metric("best_so_far", float("nan"), now, g["generation"]))
            self.generations.add(g["generation"])
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def finish(self, summary: dict[str, Any], run: RunDir) -> None:
        from evomerge.report import format_markdown

        self.generation(summary, run.records())
        if summary.get("best"):
            self.client.set_tag(self.run_id, "best_trial", str(summary["best"]["trial"]))
        for name in REPORT_FILES:
            path = run.path / name
            if path.is_file() and name != "report.md":
                self.client.log_artifact(self.run_id, str(path))
        plots = [name for name in ("pareto.png", "progress.png") if (run.path / name).is_file()]
        self.client.log_text(self.run_id, format_markdown(summary, plots), "report.md")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def close(self, status: str = "KILLED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            self.run_id = None


def trial_metrics(record: dict[str, Any], timestamp: int) -> list[Any]:
    """One trial's metrics, its id as the step."""
    from mlflow.entities import Metric

    step = record["trial"]
    subset = record["state"] == TrialState.PRUNED.value  # scored on eval.subsample's subset only
    complete = record["state"] == TrialState.COMPLETE.value or subset
    values = {"trial_state": 1.0 if complete else 0.0, "trial_generation": record["generation"]}
    if complete:
        values["trial_subset_quality" if subset else "trial_quality"] = record["quality"]
        if record.get("flops") is not None:
            values["trial_flops"] = record["flops"]
        if not subset:
            values.update({f"task_{task}": value for task, value in (record.get("metrics") or {}).items()})
    return [Metric(key, float(value), timestamp, step) for key, value in values.items()
            if value is not None and math.isfinite(float(value))]


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a.b.c` keys; lists kept as their JSON text."""
    if not isinstance(data, dict):
        return {prefix: json.dumps(data) if isinstance(data, (list, tuple)) else data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else
                   {f"{prefix}{key}": json.dumps(value) if isinstance(value, (list, tuple)) else value})
    return out


def read_state(run_path: Path) -> dict[str, Any]:
    path = run_path / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc}); delete it to start a new tracker run") from exc
