"""The search loop, top to bottom: ask -> dispatch -> journal -> tell -> checkpoint.

Each generation: the strategy proposes genomes (generation 0 also evaluates the sources and
the uniform merge as reference points), the pool evaluates them on whichever worker is free,
every finished trial is journaled at once, the strategy is told the losses (-quality; a
failed trial gets a loss worse than every finished one) and costs (FLOPs per example; a
failed trial gets the largest of its generation), and the optimiser state is checkpointed.
With steady dispatch (random, nsga2, tpe) the next generation is asked before this one is
told, and a worker this one leaves idle starts on it; the checkpoint keeps those genomes.
With `eval.subsample` a generation is scored in two rungs (evomerge/racing.py): every
candidate on a subset of the documents, the best share again on the full limit. Resuming
replays the same loop from the checkpoint: trials already in the journal are read back
instead of evaluated again.

A run goes through `config.stages` in order (`ps`: merge coefficients; `dfs`: layer paths,
evomerge/dataflow.py), each stage the same loop over its own genome and generations; the
checkpoint records the stage its strategy state belongs to.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
from tqdm import tqdm

from evomerge import estimate
from evomerge.config import RunConfig, SearchConfig
from evomerge.dataflow import DataflowLayout
from evomerge.errors import EvalError, ResumeError
from evomerge.estimate import ESTIMATE
from evomerge.evaluate import check_tasks
from evomerge.genome import GenomeLayout, Recipe, reference_recipes
from evomerge.models.sources import check_sources
from evomerge.pareto import ParetoArchive
from evomerge.racing import fitness, race
from evomerge.report import summarize
from evomerge.run_dir import JOURNAL, SUBSAMPLE, Checkpoint, RunDir, write_atomic
from evomerge.samples import ranked
from evomerge.strategies import make_strategy
from evomerge.tracking import Tracker, open_tracker
from evomerge.trial import Trial, TrialResult, TrialState, best, record, result_from_record

logger = logging.getLogger(__name__)


class Pool(Protocol):
    def run(self, trials: list[Trial], then: list[Trial] = ()) -> Iterator[tuple[Trial, TrialResult]]:
        """(trial, result) for every trial of `trials` as each finishes. A worker with none of them
        left to start may start one of `then` (the next generation); such a result is yielded
        when it comes, during this call or a later one, and a later call's `trials` may include a
        trial still in flight: it is waited for, never started twice."""

    def close(self) -> None: ...


def genome_layout(config: RunConfig) -> GenomeLayout | DataflowLayout:
    """Check the sources can be merged and the tasks load (before any worker starts) and lay out
    the first stage's genome."""
    start = time.perf_counter()
    sources = check_sources(config.models)
    checked = time.perf_counter()
    check_tasks(config.eval)
    logger.info("checks: sources %.1f s, tasks %.1f s", checked - start, time.perf_counter() - checked)
    if config.stages[0] == "dfs":
        base = replace(reference_recipes(len(config.models.experts), sources.num_layers)[0], label=None)
        return dataflow_layout(config, sources.num_layers, base)
    if config.moe is not None:
        from evomerge.moe import check_upcyclable

        check_upcyclable(config.models)
    merge = config.merge
    bounds = {gene: merge.bound(gene) for gene in merge.DEFAULT_BOUNDS}
    return GenomeLayout.build(merge.method, merge.granularity, sources.num_layers, len(config.models.experts), bounds,
                              config.policy, config.moe, modules=merge.modules, smooth=merge.smooth,
                              fixed=merge.fixed_genes(), extra=merge.evolved_extra_genes(),
                              parameter_names=list(sources.shapes))


def search(config: RunConfig, run_dir: str | Path, pool: Pool | None = None,
           on_created: Callable[[Path], None] | None = None) -> dict:
    """Start a new run in `run_dir` and search to the end of the budget; return the summary."""
    layout = genome_layout(config)
    run = RunDir.create(run_dir, config, layout.describe())
    if on_created is not None:
        on_created(run.path)
    logger.info("run %s: stages %s, %d genes in the first, strategy %s", run.path, "+".join(config.stages),
                layout.size, config.search.strategy)
    return run_loop(run, config, layout, pool)


def resume(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), force: bool = False,
           pool: Pool | None = None) -> dict:
    """Continue a run from its checkpoint and journal, with budget changes from `overrides`."""
    run = RunDir.open(run_dir)
    config = before = run.config()
    if overrides:
        run.lock()  # no config change under another driver's feet
        try:
            config = run.update_config(overrides, force=force)
        except BaseException:
            run.unlock()
            raise
    # a forced eval.limit change: the references are scored again on the new documents
    return run_loop(run, config, genome_layout(config), pool, rescore=config.eval.limit != before.eval.limit)


def dataflow_layout(config: RunConfig, num_layers: int, merge: Recipe) -> DataflowLayout:
    """The genome of a dfs stage over `config.dataflow_models` (every source has `num_layers` layers)."""
    flow = config.dataflow
    assert flow is not None  # the config refuses a dfs stage without a dataflow block
    members = tuple(config.dataflow_models)
    start = tuple(range(num_layers)) if flow.start == "first" else ()  # the first member's slots, first pass
    return DataflowLayout(members, (num_layers,) * len(members), flow.repeats,
                          flow.bound("scale") if flow.scaling else None, merge, start)


def stage_search(config: RunConfig, stage: str) -> SearchConfig:
    """The search settings of one stage: a dfs stage may set its own generations and population."""
    flow = config.dataflow
    if stage != "dfs" or flow is None:
        return config.search
    return config.search.model_copy(update={"generations": flow.generations or config.search.generations,
                                            "population": flow.population or config.search.population})


def run_loop(run: RunDir, config: RunConfig, layout: GenomeLayout | DataflowLayout,
             pool: Pool | None = None, rescore: bool = False) -> dict:
    """Every stage of `config.stages` in order (`layout` is the first's), from the checkpoint if any.

    Generations are numbered across stages; a stage after the first starts from a fresh
    strategy, its genome laid out from the journal (a dfs stage after ps serves layer paths
    through the best ps trial), so resuming at or across a stage boundary replays it exactly.
    """
    checkpoint = run.load_checkpoint()
    stop = 0
    workers = Workers(config, pool, warm_up=layout.decode([0.5] * layout.size))
    tracker = Tracker()
    run.lock()
    try:
        run.repair_journal()
        if config.policy.trains_router:  # its router is trained once per run, before any trial
            from evomerge.router_data import prepare_router

            config = workers.config = prepare_router(config, run.path)
        tracker = open_tracker(run, config)
        for index, stage in enumerate(config.stages):
            start, stop = stop, stop + stage_search(config, stage).generations
            if checkpoint is not None and checkpoint.stage > index:
                continue
            if index > 0:
                layout = next_stage_layout(run, config, stage)
            run_stage(run, config, layout, index, (start, stop), workers, tracker, rescore=rescore)
            checkpoint = run.load_checkpoint()
        summary = summarize(run.records(), config)
        tracker.finish(summary, run)
    finally:
        tracker.close()  # a run stopped early: its tracker run is marked KILLED until a resume continues it
        workers.close()  # whatever stopped the run: no worker outlives it
        run.unlock()
    return summary


class Workers:
    """The pool every stage of a run shares: given, or started when a stage first has a
    generation to run (a finished run needs no workers); closed once when the run ends. A started
    pool's workers warm up on `warm_up` (the middle of the first stage's box): the driver's layout,
    so no worker checks the sources and tasks again."""

    def __init__(self, config: RunConfig, pool: Pool | None = None, warm_up: Recipe | None = None):
        self.config, self.pool, self.warm_up = config, pool, warm_up

    def get(self) -> Pool:
        if self.pool is None:
            from evomerge.workers import WorkerPool

            self.pool = WorkerPool(self.config, warm_up=self.warm_up)
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def next_stage_layout(run: RunDir, config: RunConfig, stage: str) -> DataflowLayout:
    """The genome of a dfs stage that follows a ps stage: layer paths through the best ps trial."""
    best_ps = best(ranked([r for r in run.records() if r.get("stage", "ps") == "ps"]))
    if best_ps is None:
        raise EvalError(f"{run.path}: no completed ps trial to start the {stage} stage from")
    merge = Recipe.from_json(best_ps["recipe"])
    merge = replace(merge, label=None, policy=None)
    logger.info("stage %s: the merged model is ps trial %d (quality %.4f)", stage, best_ps["trial"],
                best_ps["quality"])
    layout = dataflow_layout(config, merge.num_layers, merge)
    write_atomic(run.path / f"genome.{stage}.json", json.dumps(layout.describe(), indent=1).encode())
    return layout


def run_stage(run: RunDir, config: RunConfig, layout: GenomeLayout | DataflowLayout, index: int,
              window: tuple[int, int], workers: Workers, tracker: Tracker | None = None,
              rescore: bool = False) -> None:
    """Generations window[0] .. window[1] - 1 of stage `index` (`tracker`: logs each generation;
    `rescore`: score the stage's references again, after a resume changed eval.limit)."""
    tracker = tracker or Tracker()
    stage = config.stages[index]
    strategy = make_strategy(stage_search(config, stage), layout.size, seed=config.seed + index)
    (generation, stop), next_id = window, 0
    checkpoint = run.load_checkpoint()
    if checkpoint is not None:
        next_id = checkpoint.next_trial_id
        if checkpoint.stage == index:
            strategy.set_state(checkpoint.strategy_state)
            generation = checkpoint.generation
            logger.info("resuming %s after generation %d", run.path, generation - 1)
    steady = (strategy.lookahead and config.search.dispatch == "steady" and config.eval.subsample is None
              and config.eval.estimate is None)
    ahead = checkpoint.ahead if checkpoint is not None and checkpoint.stage == index else None
    journal = run.finished()
    first = True
    while generation < stop:
        trials: list[Trial] = []
        if generation == window[0] and config.search.references:
            for recipe in stage_references(layout):
                trials.append(Trial(next_id, generation, recipe, stage=stage))
                next_id += 1
        genomes = strategy.ask() if ahead is None else [np.array(genome) for genome in ahead]
        candidates = []
        for genome in genomes:
            candidates.append(Trial(next_id, generation, layout.decode(genome), tuple(map(float, genome)),
                                    stage=stage))
            next_id += 1
        # Steady dispatch: generation + 1 is asked now, before this one is told; its trials (ids
        # from next_id on, as they will have then) start as soon as a worker has nothing else to do.
        ahead = [list(map(float, genome)) for genome in strategy.ask()] if steady else None
        upcoming = [Trial(next_id + k, generation + 1, layout.decode(np.array(genome)), tuple(genome), stage=stage)
                    for k, genome in enumerate(ahead)] if ahead is not None and generation + 1 < stop else []
        retry = stalled(run, config, trials, candidates, upcoming) if first else set()
        if first and generation > window[0]:  # references scored on other documents than the run's now
            stale = stale_references(run, config, stage, window[0], rescore)
            trials, retry = stale + trials, retry | {trial.id for trial in stale}
        for trial_id in retry:  # evaluated again: the old lines are superseded
            journal.pop(trial_id, None)
        first = False

        if config.eval.estimate is not None:  # anchors for all candidates, the best share on the full limit
            fitness, told = estimate.race(config.eval, workers.get(), trials, candidates, journal, run, generation,
                                          window[0], partial(evaluate, retry=retry))
        elif config.eval.subsample is None:
            results = evaluate(workers.get(), trials + candidates, journal, run, generation, retry=retry,
                               then=upcoming)
            told = [results[trial.id] for trial in candidates]
            fitness = losses(told, generation)
        else:  # successive halving: all candidates on a subset, the best share on the full limit
            fitness, told = race(config.eval, workers.get(), trials, candidates, journal, run, generation,
                                 partial(evaluate, retry=retry))

        strategy.tell(genomes, fitness, costs(told))
        generation += 1
        run.save_checkpoint(Checkpoint(generation, next_id, strategy.get_state(), stage=index, ahead=ahead))
        records = run.records()  # read once for the summary and the tracker
        summary = summarize(records, config)
        run.write_summary(summary)
        tracker.generation(summary, records)
        logger.info(generation_line(summary))


def generation_line(summary: dict) -> str:
    """The log line of a finished generation: its best evolved trial beside the best source."""
    latest = summary["generations"][-1]
    reference = summary.get("best_reference") or {}
    source = (f"best source {reference['quality']:.4f} ({reference['label']}, trial {reference['trial']})"
              if reference.get("quality") is not None else "no source scored")
    top = "-" if latest["best_quality"] is None else f"{latest['best_quality']:.4f}"
    so_far = "-" if latest["best_so_far"] is None else f"{latest['best_so_far']:.4f}"
    return (f"generation {latest['generation']}: best evolved {top} (so far {so_far}), {source}, "
            f"{latest['failed']} failed")


def stale_references(run: RunDir, config: RunConfig, stage: str, generation: int, rescore: bool) -> list[Trial]:
    """A stage's journaled references whose sample's limit is not the run's eval.limit (or all of
    them with `rescore`: a resume that changed eval.limit), to be scored again so that the sources
    stay comparable with the trials to come (evomerge/samples.py)."""
    if not config.search.references:
        return []
    stale = []
    for r in run.records():
        if r["label"] is None or r.get("stage", "ps") != stage or r["generation"] != generation:
            continue
        if rescore or (r.get("sample") or {}).get("limit", config.eval.limit) != config.eval.limit:
            stale.append(Trial(r["trial"], r["generation"], Recipe.from_json(r["recipe"]), stage=stage))
    if stale:
        logger.warning("scoring the %d references again on eval.limit %s (they were scored on other documents)",
                       len(stale), config.eval.limit)
    return stale


def stage_references(layout: GenomeLayout | DataflowLayout) -> list[Recipe]:
    """The reference points of a stage's first generation: the sources (and the uniform merge), or
    in a dfs stage each member's own layers as a path."""
    if isinstance(layout, DataflowLayout):
        return layout.references()
    return reference_recipes(layout.num_experts, layout.num_layers)


def stalled(run: RunDir, config: RunConfig, trials: list[Trial], candidates: list[Trial],
            upcoming: list[Trial] = ()) -> set[int]:
    """Trials to evaluate again although journaled: when every candidate of this generation is
    journaled failed, the run stopped here (see `losses`), so its failed trials run again once the
    user fixed the cause, and so do the failed trials of the next generation (`upcoming`) that
    steady dispatch had started meanwhile. An uninterrupted run never gets past such a
    generation, so resuming still ends with its journal."""
    # where a candidate's first result is
    file = SUBSAMPLE if config.eval.subsample is not None else ESTIMATE if config.eval.estimate is not None else JOURNAL
    first = run.finished(file)
    if not candidates or any(first.get(trial.id, {}).get("state") != "failed" for trial in candidates):
        return set()
    failed = {i for name in {JOURNAL, file} for i, r in run.finished(name).items() if r["state"] == "failed"}
    retry = {trial.id for trial in [*trials, *candidates, *upcoming] if trial.id in failed}
    logger.warning("generation %d: every candidate had failed; evaluating %d failed trials again",
                   candidates[0].generation, len(retry))
    return retry


def evaluate(pool: Pool, trials: list[Trial], journal: dict[int, dict], run: RunDir, generation: int,
             line: Callable[[Trial, TrialResult], dict] = record, file: str = JOURNAL,
             retry: set[int] = frozenset(), then: list[Trial] = ()) -> dict[int, TrialResult]:
    """Results for every trial: read back from the journal, or evaluated now and journaled
    (`line(trial, result)` appended to `file` of the run directory as each one finishes).
    Trials in `retry` are evaluated even when journaled (their new line supersedes the old one).
    Trials of `then` not journaled yet go to the pool to start when a worker is idle; each that
    finishes is journaled at once and added to `journal`, where the next call reads it back."""
    results: dict[int, TrialResult] = {}
    todo = []
    for trial in trials:
        previous = journal.get(trial.id) if trial.id not in retry else None
        if previous is None:
            todo.append(trial)
            continue
        if previous["genome"] != (list(trial.genome) if trial.genome is not None else None):
            raise ResumeError(f"{run.path}: journal trial {trial.id} has another genome than the optimiser "
                              f"asks for now; the config or evomerge version changed since it was written")
        results[trial.id] = result_from_record(previous)

    later = [trial for trial in then if trial.id not in journal]
    wanted = {trial.id for trial in todo}
    so_far = ranked(run.records())  # the live best and front of the run: complete trials on its current sample
    front = front_of(so_far)  # the bar shows the best quality so far and the front's size
    best = max([r.quality for r in results.values() if r.ok] + [e.quality for e in front.front()], default=None)
    evolved = max((r["quality"] for r in so_far if r["state"] == "complete" and r["label"] is None), default=None)
    source = max((r["quality"] for r in so_far if r["state"] == "complete" and r["label"] is not None), default=None)
    with tqdm(total=len(trials), initial=len(results), desc=f"generation {generation}", unit="trial",
              leave=False, dynamic_ncols=True, disable=None) as bar:
        for trial, result in pool.run(todo, later):
            entry = line(trial, result)
            run.append(entry, file)
            if not result.ok:
                logger.warning("trial %d failed: %s", trial.id, result.error)
            if trial.id not in wanted:  # of the next generation: read back when that one is evaluated
                journal[trial.id] = entry
                continue
            results[trial.id] = result
            if file == JOURNAL:  # what the run has journaled, for the live best of later calls
                journal[trial.id] = entry
            if result.ok:
                best = result.quality if best is None else max(best, result.quality)
                if file == JOURNAL and entry["state"] == TrialState.COMPLETE.value:
                    if entry.get("flops") is not None and trial.id not in front:  # a reference scored again
                        front.add(trial.id, result.quality, entry["flops"])
                    if trial.label is None:
                        evolved = result.quality if evolved is None else max(evolved, result.quality)
                    else:
                        source = result.quality if source is None else max(source, result.quality)
            bar.set_postfix(best=f"{best:.4f}" if best is not None else "-", front=len(front.front()))
            bar.update(1)
            logger.info("trial %d done (%s, %d/%d of generation %d): %s; best evolved %s, best source %s",
                        trial.id, trial.label or "evolved", len(results), len(trials), generation,
                        f"quality {result.quality:.4f}" if result.ok else "failed", _num(evolved), _num(source))
    return results


def front_of(records) -> ParetoArchive:
    """The Pareto archive (quality vs FLOPs) of the complete (full-limit) records."""
    archive = ParetoArchive(worst_quality=None)
    for r in records:
        if r["state"] == TrialState.COMPLETE.value and r.get("flops") is not None:
            archive.add(r["trial"], r["quality"], r["flops"])
    return archive


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def losses(results: list[TrialResult], generation: int) -> list[float]:
    """-quality per candidate; a failed one gets the worst finite loss of its generation plus one
    (racing's rule with nothing promoted)."""
    return fitness(results, [None] * len(results), generation)


def costs(results: list[TrialResult]) -> list[float]:
    """FLOPs per example per candidate; a failed one (or one without FLOPs) gets the largest of its generation."""
    known = [float(r.flops) if r.ok and r.flops is not None and math.isfinite(r.flops) else None for r in results]
    worst = max((cost for cost in known if cost is not None), default=0.0)
    return [worst if cost is None else cost for cost in known]
