"""The real path: Ray actors, transformers models on disk, lm-eval, pycma, export and reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.config import load_config
from evomerge.export import evaluate_folder, export
from evomerge.genome import Recipe
from evomerge.run_dir import RunDir, canonical
from evomerge.search import search
from evomerge.trial import Trial, TrialState
from evomerge.workers import WorkerPool

from conftest import REPO, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(zoo, ray_cluster, tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("search")
    config = load_config(write_config(folder, zoo))
    summary = search(config, folder / "run")
    return folder / "run", summary


def test_search_runs_through_ray_and_lm_eval(finished_run) -> None:
    run_dir, summary = finished_run
    records = RunDir.open(run_dir).records()
    num_experts = len(load_config(run_dir / "config.yaml").models.experts)
    references = 1 + num_experts + 1
    assert len(records) == references + 2 * 4
    assert all(r["state"] == "complete" for r in records), [r["error"] for r in records]
    experts = [f"expert:{i}" for i in range(num_experts)]
    assert {r["label"] for r in records if r["label"]} == {"base", "uniform", *experts}
    assert len({r["worker"] for r in records}) == 2  # both actors served trials
    for r in records:
        assert 0.0 <= r["quality"] <= 1.0 and set(r["metrics"]) == set(summary["tasks"])
        seconds = r["seconds"]  # every trial merged and ran the model; the phases add up
        assert seconds["merge"] > 0 and seconds["forward"] > 0, seconds
        assert seconds["merge"] + seconds["eval"] == pytest.approx(seconds["total"]), seconds
        phases = seconds["eval_setup"] + seconds["forward"] + seconds["serving"] + seconds["scoring"]
        assert phases <= seconds["eval"] + 1e-9, seconds
    assert [g["generation"] for g in summary["generations"]] == [0, 1]
    checkpoint = RunDir.open(run_dir).load_checkpoint()
    assert checkpoint.generation == 2 and checkpoint.next_trial_id == len(records)
    assert json.loads((run_dir / "summary.json").read_text())["trials"] == len(records)


def test_report_json(finished_run, capsys) -> None:
    run_dir, summary = finished_run
    assert main(["report", str(run_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trials"] == summary["trials"] and report["failed"] == 0
    assert {"trial", "quality", "recipe"} <= set(report["best"])
    assert [r["label"] for r in report["references"]][0] == "base"
    assert len(report["generations"]) == 2
    assert report["pareto"] and report["hypervolume"] > 0
    assert (run_dir / "pareto.png").stat().st_size > 0 and (run_dir / "progress.png").stat().st_size > 0
    page = (run_dir / "report.md").read_text()
    best = report["best_evolved"] or report["best"]
    error = best["stderr"]["quality"]  # issue 19: the quality with its standard error
    assert f"| **best evolved** | {best['trial']} | {best['quality']:.4f} ± {error:.4f} |" in page
    assert "## Pareto front" in page and "![pareto](pareto.png)" in page
    assert all(f"| {r['label']} | {r['trial']} |" in page for r in report["references"])


def test_export_reproduces_the_recorded_quality(finished_run, tmp_path) -> None:
    run_dir, summary = finished_run
    config = RunDir.open(run_dir).config()
    record = export(run_dir, tmp_path / "best")
    assert record["trial"] == summary["best"]["trial"]
    assert (tmp_path / "best" / "model.safetensors").is_file() and (tmp_path / "best" / "tokenizer.json").is_file()
    assert evaluate_folder(config, tmp_path / "best") == record["quality"]

    mergekit = yaml.safe_load((tmp_path / "best" / "mergekit.yaml").read_text())
    assert mergekit["merge_method"] == record["recipe"]["method"]
    assert json.loads((tmp_path / "best" / "recipe.json").read_text())["recipe"] == record["recipe"]


def test_export_of_a_reference_equals_the_source(finished_run, zoo, tmp_path) -> None:
    from safetensors.torch import load_file

    run_dir, _ = finished_run
    trial = next(r for r in RunDir.open(run_dir).records() if r["label"] == "expert:1")
    export(run_dir, tmp_path / "expert", trial_id=trial["trial"])
    exported = load_file(tmp_path / "expert" / "model.safetensors")
    source = load_file(Path(load_config(run_dir / "config.yaml").models.experts[1]) / "model.safetensors")
    assert exported.keys() == source.keys()
    assert all(torch.equal(exported[k], source[k]) for k in source)


def test_export_refuses_a_non_empty_folder(finished_run, tmp_path, capsys) -> None:
    run_dir, _ = finished_run
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "x"), "--trial", "999"]) == 2


def test_same_seed_gives_the_same_journal(finished_run, zoo, ray_cluster, tmp_path) -> None:
    run_dir, _ = finished_run
    config = load_config(write_config(tmp_path, zoo))
    search(config, tmp_path / "again")
    assert canonical(RunDir.open(tmp_path / "again").records()) == canonical(RunDir.open(run_dir).records())


def test_nsga2_uses_the_same_workers_and_journal(finished_run, zoo, ray_cluster, tmp_path) -> None:
    """Changing only search.strategy: an NSGA-II run journals trials of the same shape as the CMA-ES run."""
    run_dir, cma_summary = finished_run
    config = load_config(write_config(tmp_path, zoo, search={"strategy": "nsga2"}))
    summary = search(config, tmp_path / "nsga2")
    nsga2 = sorted(RunDir.open(tmp_path / "nsga2").records(), key=lambda r: r["trial"])
    cma = sorted(RunDir.open(run_dir).records(), key=lambda r: r["trial"])
    assert all(r["state"] == "complete" for r in nsga2), [r["error"] for r in nsga2]
    assert [(r["trial"], r["generation"], r["label"], sorted(r)) for r in nsga2] == \
        [(r["trial"], r["generation"], r["label"], sorted(r)) for r in cma]
    references = [r for r in canonical(nsga2) if r["label"] is not None]
    assert references == [r for r in canonical(cma) if r["label"] is not None]  # same recipes, same scores
    candidates = [r for r in nsga2 if r["label"] is None]
    assert all(len(r["genome"]) == len(cma[-1]["genome"]) and 0 <= min(r["genome"]) <= max(r["genome"]) <= 1
               and r["flops"] > 0 and 0.0 <= r["quality"] <= 1.0 for r in candidates)
    assert [r["genome"] for r in candidates] != [r["genome"] for r in cma if r["label"] is None]
    assert summary["tasks"] == cma_summary["tasks"] and summary["pareto"] and summary["hypervolume"] > 0
    assert RunDir.open(tmp_path / "nsga2").load_checkpoint().generation == 2


def test_a_worker_that_cannot_start_stops_the_run_with_the_reason(zoo, ray_cluster, tmp_path) -> None:
    """A worker whose tasks cannot load (here a data file gone after the driver's check) fails in
    its creation: not a lost worker to retry on every trial, but one error naming the cause."""
    from evomerge.errors import WorkerStartError

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gone_add.yaml").write_text((REPO / "evals" / "demo" / "demo_add.yaml").read_text()
                                         .replace("task: demo_add", "task: gone_add")
                                         .replace("test: demo_add.jsonl", f"test: {tasks / 'gone.jsonl'}"))
    config = load_config(write_config(tmp_path, zoo, workers={"count": 1},
                                      eval={"include_path": str(tasks), "tasks": [{"name": "gone_add",
                                                                                     "metric": "exact_match"}]}))
    recipe = Recipe("linear", "global", 2, {"all": {"weight": [1.0] + [0.0] * (len(config.models.experts) - 1)}})
    pool = WorkerPool(config)
    try:
        with pytest.raises(WorkerStartError, match=r"workers: a worker could not start: .*gone\.jsonl"):
            list(pool.run([Trial(0, 0, recipe)]))
    finally:
        pool.close()


def test_failures_come_back_as_data_through_ray(zoo, ray_cluster, tmp_path) -> None:
    config = load_config(write_config(tmp_path, zoo, workers={"count": 1}))
    good = Recipe("linear", "global", 2, {"all": {"weight": [1.0] + [0.0] * (len(config.models.experts) - 1)}})
    zero = Recipe("linear", "global", 2, {"all": {"weight": [0.0] * len(config.models.experts)}})
    missing_group = Recipe("linear", "layer", 2, {"layers.0": {"weight": [1.0] * len(config.models.experts)}})
    nan = Recipe("task_arithmetic", "global", 2, {"all": {"weight": [float("nan")] * len(config.models.experts)}})
    pool = WorkerPool(config)
    try:
        trials = [Trial(0, 0, zero), Trial(1, 0, missing_group), Trial(2, 0, good), Trial(3, 0, nan)]
        results = {t.id: r for t, r in pool.run(trials)}
    finally:
        pool.close()
    assert results[0].state is TrialState.FAILED and "sum" in results[0].error
    assert results[1].state is TrialState.FAILED and "no values for group" in results[1].error and results[1].traceback
    assert results[2].state is TrialState.COMPLETE
    assert results[3].state is TrialState.FAILED and "finite" in results[3].error


def test_cli_search_then_report(zoo, ray_cluster, tmp_path, capsys) -> None:
    path = write_config(tmp_path, zoo, search={"generations": 1, "population": 2, "references": False})
    assert main(["search", str(path), "--run-dir", str(tmp_path / "cli")]) == 0
    assert "best evolved" in capsys.readouterr().out
    assert main(["search", str(path), "--run-dir", str(tmp_path / "cli")]) == 2  # already holds a run
    assert "evomerge resume" in capsys.readouterr().err


def test_a_killed_worker_is_replaced_and_its_trial_retried(zoo, ray_cluster, tmp_path) -> None:
    import os
    import signal

    config = load_config(write_config(tmp_path, zoo))
    experts = len(config.models.experts)
    trials = [Trial(i, 0, Recipe("linear", "global", 2, {"all": {"weight": [1.0 + i] + [0.5] * (experts - 1)}}))
              for i in range(8)]
    pool = WorkerPool(config)
    try:
        pids = {name: int(name.rsplit(":", 1)[1]) for name in pool.identities()}
        results, killed = {}, None
        for trial, result in pool.run(trials):
            results[trial.id] = result
            if killed is None:  # the other worker is busy with a candidate: kill it mid-run
                killed = next(name for name in pids if name != result.worker)
                os.kill(pids[killed], signal.SIGKILL)
    finally:
        pool.close()
    assert sorted(results) == list(range(8))
    assert all(r.state is TrialState.COMPLETE for r in results.values()), [r.error for r in results.values()]
    assert len({r.worker for r in results.values()}) >= 2


def test_next_generation_trials_start_on_idle_workers_and_finish_in_a_later_call(zoo, ray_cluster,
                                                                                  tmp_path) -> None:
    """Steady dispatch through real actors: a call with one trial and four of `then` keeps the second
    worker busy with `then`; whatever of it is still running when the call returns is waited for by
    the next call, never run twice."""
    config = load_config(write_config(tmp_path, zoo))
    experts = len(config.models.experts)
    trials = [Trial(i, i // 5, Recipe("linear", "global", 2, {"all": {"weight": [1.0 + i] + [0.5] * (experts - 1)}}))
              for i in range(5)]
    pool = WorkerPool(config)
    try:
        first = [(t.id, r) for t, r in pool.run(trials[:1], then=trials[1:])]
        flying = {trial.id for trial, _ in pool._running.values()}
        assert 0 in dict(first) and (1 in dict(first) or 1 in flying)  # the idle worker started on `then` at once
        rest = [t for t in trials[1:] if t.id not in dict(first)]  # as the search asks: what is not journaled
        second = [(t.id, r) for t, r in pool.run(rest)]
    finally:
        pool.close()
    ids = [i for i, _ in first + second]
    assert sorted(ids) == list(range(5))  # each exactly once
    assert all(r.state is TrialState.COMPLETE for _, r in first + second)
    assert len({r.worker for _, r in first + second}) == 2


def test_a_killed_export_leaves_no_half_model(finished_run, tmp_path) -> None:
    import signal
    import subprocess
    import sys

    run_dir, summary = finished_run
    before = RunDir.open(run_dir).lines()
    out = tmp_path / "model"
    child = ("import os, signal, sys\n"
             "import evomerge.export as export\n"
             "export.move_into = lambda staging, out: os.kill(os.getpid(), signal.SIGKILL)  # die before the rename\n"
             "export.export(sys.argv[1], sys.argv[2])\n")
    code = subprocess.run([sys.executable, "-c", child, str(run_dir), str(out)], capture_output=True,
                          timeout=300).returncode
    assert code == -signal.SIGKILL and not out.exists()
    # The run is untouched: resuming it evaluates nothing and its journal is the same, line for line.
    assert main(["resume", str(run_dir)]) == 0
    assert RunDir.open(run_dir).lines() == before
    assert main(["report", str(run_dir)]) == 0
    assert export(run_dir, out)["trial"] == summary["best"]["trial"] and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("policy", [
    {"kind": "blend", "members": ["merged", "expert:0"]},
    {"kind": "cascade", "members": ["expert:1", "merged"]},
    {"kind": "prefix_router", "members": ["merged", "expert:0"], "scorers": ["routers/mix", "routers/add"],
     "bounds": {"k": [0, 3]}},
])
def test_routed_search_records_costs_and_exports_its_policy(zoo, ray_cluster, tmp_path, policy) -> None:
    if "scorers" in policy:  # the zoo's router models, one per member
        policy = {**policy, "scorers": [str(zoo["base"].parent / s) for s in policy["scorers"]]}
    path = write_config(tmp_path, zoo, policy=policy, merge={"granularity": "global"},
                        search={"generations": 1, "population": 3, "references": False},
                        workers={"count": 1})
    summary = search(load_config(path), tmp_path / "run")
    records = RunDir.open(tmp_path / "run").records()
    assert summary["failed"] == 0 and len(records) == 3
    for r in records:
        assert r["recipe"]["policy"]["kind"] == policy["kind"] and r["flops"] > 0
        assert set(r["served"]) == set(policy["members"]) and sum(r["served"].values()) == pytest.approx(1.0)
    assert summary["pareto"] and summary["hypervolume"] is not None

    best = export(tmp_path / "run", tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "policy.json").read_text())
    assert len(saved.get("scorers") or policy["members"]) == len(policy["members"])
    for folder in saved["members"] + (saved.get("scorers") or []):  # the export is self-contained
        assert not Path(folder).is_absolute() and (tmp_path / "out" / folder / "config.json").is_file()
    # --verify scores the export's own members: with the run's sources unreachable, the same quality
    config = load_config(tmp_path / "run" / "config.yaml")
    gone = config.models.model_copy(update={"experts": [str(tmp_path / "gone")] * len(config.models.experts)})
    assert evaluate_folder(config.model_copy(update={"models": gone, "policy": config.policy.model_copy(
        update={"scorers": None})}), tmp_path / "out") == best["quality"]


def test_routed_runs_repeat_and_resume_exactly(zoo, ray_cluster, tmp_path) -> None:
    """A routed search (prefix router with router models, k a gene) run twice gives the same
    journal, and stopped after one generation then resumed, the same journal again."""
    from evomerge.search import resume

    routers = zoo["base"].parent / "routers"
    policy = {"kind": "prefix_router", "members": ["merged", "expert:0", "expert:1"],
              "scorers": [str(routers / "mix"), str(routers / "add"), str(routers / "rev")], "bounds": {"k": [0, 2]}}
    path = write_config(tmp_path, zoo, policy=policy, merge={"granularity": "global"},
                        search={"generations": 2, "population": 3})
    config = load_config(path)
    search(config, tmp_path / "one")
    search(config, tmp_path / "two")
    journal = canonical(RunDir.open(tmp_path / "one").records())
    assert journal == canonical(RunDir.open(tmp_path / "two").records())
    assert {r["recipe"]["policy"]["params"]["k"] for r in journal if r["recipe"].get("policy")} != set()

    search(load_config(path, ["search.generations=1"]), tmp_path / "stopped")
    resume(tmp_path / "stopped", ["search.generations=2"])
    assert canonical(RunDir.open(tmp_path / "stopped").records()) == journal


def test_a_run_stopped_by_an_error_leaves_no_worker_behind(zoo, ray_cluster, tmp_path) -> None:
    """Every candidate fails (linear weights that sum to ~0), so the search stops with an error; the
    workers it started are gone and their CPUs free (a leak would starve every later search)."""
    import ray

    from evomerge.errors import EvalError

    path = write_config(tmp_path, zoo, merge={"method": "linear", "granularity": "global",
                                              "bounds": {"weight": [-1e-12, 0.0]}},
                        search={"generations": 2, "population": 2, "references": False})
    with pytest.raises(EvalError, match="every candidate of generation 0 failed .*expected a non-zero sum"):
        search(load_config(path), tmp_path / "run")
    for _ in range(50):  # killed actors hand their CPUs back asynchronously
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            break
        import time

        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


class InjectingPool:
    """The real Ray pool, with two candidates' recipes swapped for ones that fail on the worker:
    a linear merge whose weights sum to 0 (the merge raises) and weights of 1e300 (in float32 the
    task vectors become inf, and inf x 0 NaN: the merged model is NaN)."""

    def __init__(self, pool: WorkerPool, raising: int, nan: int):
        self.pool, self.raising, self.nan = pool, raising, nan

    def run(self, trials, then=()):
        from dataclasses import replace

        swapped = []
        for trial in trials:
            experts = len(trial.recipe.params[next(iter(trial.recipe.params))]["weight"])
            if trial.id == self.raising:  # a routed candidate keeps its policy: only its merge fails
                trial = replace(trial, recipe=replace(trial.recipe, method="linear", granularity="global",
                                                      params={"all": {"weight": [0.0] * experts}}))
            elif trial.id == self.nan:
                trial = replace(trial, recipe=replace(trial.recipe, method="task_arithmetic", granularity="global",
                                                      params={"all": {"weight": [1e300] * experts}}))
            swapped.append(trial)
        yield from self.pool.run(swapped, then)

    def close(self) -> None:
        self.pool.close()


@pytest.mark.parametrize("policy", [None, {"kind": "blend", "members": ["merged", "expert:0"]}])
def test_a_search_with_a_raising_and_a_nan_candidate_completes_and_reports_them(zoo, ray_cluster, tmp_path,
                                                                                 capsys, policy) -> None:
    sections = {"policy": policy} if policy else {}
    config = load_config(write_config(tmp_path, zoo, search={"generations": 2, "population": 3}, **sections))
    summary = search(config, tmp_path / "run", pool=InjectingPool(WorkerPool(config), raising=6, nan=9))
    records = {r["trial"]: r for r in RunDir.open(tmp_path / "run").records()}
    assert len(records) == 5 + 2 * 3 and summary["failed"] == 2
    assert records[6]["state"] == "failed" and "sum to 0" in records[6]["error"] and records[6]["traceback"]
    assert records[9]["state"] == "failed" and "non-finite" in records[9]["error"]
    assert all(r["state"] == "complete" for i, r in records.items() if i not in (6, 9))
    assert RunDir.open(tmp_path / "run").load_checkpoint().generation == 2  # the run went on to its end

    assert main(["report", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "11 trials, 2 failed" in out
    assert f"trial 6 FAILED: {records[6]['error']}" in out and f"trial 9 FAILED: {records[9]['error']}" in out
    page = (tmp_path / "run" / "report.md").read_text()
    assert "## Failed trials" in page and f"- trial 9: {records[9]['error']}" in page
