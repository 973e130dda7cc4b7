"""The search loop, top to bottom: ask -> dispatch -> journal -> tell -> checkpoint.

Each generation: the strategy proposes genomes (generation 0 also evaluates the sources and
the uniform merge as reference points), the pool evaluates them on whichever worker is free,
every finished trial is journaled at once, the strategy is told the losses (-quality; a
failed trial gets a loss worse than every finished one) and costs (FLOPs per example; a
failed trial gets the largest of its generation), and the optimiser state is checkpointed.
With `eval.subsample` a generation is scored in two rungs (evomerge/racing.py): every
candidate on a subset of the documents, the best share again on the full limit. Resuming
replays the same loop from the checkpoint: trials already in the journal are read back
instead of evaluated again.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Iterator, Protocol

from tqdm import tqdm

from evomerge.config import DEFAULT_BOUNDS, RunConfig
from evomerge.errors import EvalError, ResumeError
from evomerge.genome import GenomeLayout, reference_recipes
from evomerge.report import summarize
from evomerge.racing import race
from evomerge.run_dir import JOURNAL, Checkpoint, RunDir
from evomerge.sources import check_sources
from evomerge.strategies import make_strategy
from evomerge.trial import Trial, TrialResult, record, result_from_record

logger = logging.getLogger(__name__)


class Pool(Protocol):
    def run(self, trials: list[Trial]) -> Iterator[tuple[Trial, TrialResult]]: ...

    def close(self) -> None: ...


def genome_layout(config: RunConfig) -> GenomeLayout:
    """Check the sources can be merged (before any worker starts) and lay out the genome."""
    sources = check_sources(config.models)
    if config.moe is not None:
        from evomerge.moe import check_upcyclable

        check_upcyclable(config.models)
    merge = config.merge
    bounds = {gene: merge.bound(gene) for gene in DEFAULT_BOUNDS}
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
    logger.info("run %s: %d genes (%s, %s), strategy %s", run.path, layout.size, layout.method,
                layout.granularity, config.search.strategy)
    return run_loop(run, config, layout, pool)


def resume(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), force: bool = False,
           pool: Pool | None = None) -> dict:
    """Continue a run from its checkpoint and journal, with budget changes from `overrides`."""
    run = RunDir.open(run_dir)
    config = run.config()
    if overrides:
        run.lock()  # no config change under another driver's feet
        try:
            config = run.update_config(overrides, force=force)
        except BaseException:
            run.unlock()
            raise
    return run_loop(run, config, genome_layout(config), pool)


def run_loop(run: RunDir, config: RunConfig, layout: GenomeLayout, pool: Pool | None = None) -> dict:
    strategy = make_strategy(config.search, layout.size, seed=config.seed)
    generation, next_id = 0, 0
    checkpoint = run.load_checkpoint()
    if checkpoint is not None:
        strategy.set_state(checkpoint.strategy_state)
        generation, next_id = checkpoint.generation, checkpoint.next_trial_id
        logger.info("resuming %s after generation %d", run.path, generation - 1)
    run.lock()
    try:
        run.repair_journal()
        journal = run.finished()
        if pool is None and generation < config.search.generations:  # a finished run needs no workers
            from evomerge.workers import WorkerPool

            pool = WorkerPool(config)
        while generation < config.search.generations:
            trials: list[Trial] = []
            if generation == 0 and config.search.references:
                for recipe in reference_recipes(layout.num_experts, layout.num_layers):
                    trials.append(Trial(next_id, generation, recipe))
                    next_id += 1
            genomes = strategy.ask()
            candidates = []
            for genome in genomes:
                candidates.append(Trial(next_id, generation, layout.decode(genome), tuple(map(float, genome))))
                next_id += 1

            if config.eval.subsample is None:
                results = evaluate(pool, trials + candidates, journal, run, generation)
                told = [results[trial.id] for trial in candidates]
                fitness = losses(told, generation)
            else:  # successive halving: all candidates on a subset, the best share on the full limit
                fitness, told = race(config.eval, pool, trials, candidates, journal, run, generation, evaluate)

            strategy.tell(genomes, fitness, costs(told))
            generation += 1
            run.save_checkpoint(Checkpoint(generation, next_id, strategy.get_state()))
            summary = summarize(run.records(), config)
            run.write_summary(summary)
            latest = summary["generations"][-1]
            logger.info("generation %d: best %.4f (best so far %.4f), %d failed", latest["generation"],
                        latest["best_quality"], latest["best_so_far"], latest["failed"])
    finally:
        if pool is not None:
            pool.close()
        run.unlock()
    return summarize(run.records(), config)


def evaluate(pool: Pool, trials: list[Trial], journal: dict[int, dict], run: RunDir, generation: int,
             line: Callable[[Trial, TrialResult], dict] = record, file: str = JOURNAL) -> dict[int, TrialResult]:
    """Results for every trial: read back from the journal, or evaluated now and journaled
    (`line(trial, result)` appended to `file` of the run directory as each one finishes)."""
    results: dict[int, TrialResult] = {}
    todo = []
    for trial in trials:
        previous = journal.get(trial.id)
        if previous is None:
            todo.append(trial)
            continue
        if previous["genome"] != (list(trial.genome) if trial.genome is not None else None):
            raise ResumeError(f"{run.path}: journal trial {trial.id} has another genome than the optimiser "
                              f"asks for now; the config or evomerge version changed since it was written")
        results[trial.id] = result_from_record(previous)

    best = max((r.quality for r in results.values() if r.ok), default=None)
    with tqdm(total=len(trials), initial=len(results), desc=f"generation {generation}", unit="trial",
              leave=False, dynamic_ncols=True, disable=None) as bar:
        for trial, result in pool.run(todo):
            run.append(line(trial, result), file)
            results[trial.id] = result
            if result.ok:
                best = result.quality if best is None else max(best, result.quality)
            else:
                logger.warning("trial %d failed: %s", trial.id, result.error)
            bar.set_postfix(best=f"{best:.4f}" if best is not None else "-")
            bar.update(1)
    return results


def losses(results: list[TrialResult], generation: int) -> list[float]:
    """-quality per candidate; a failed one gets the worst finite loss of its generation plus one."""
    finished = [-r.quality for r in results if r.ok]
    if not finished:
        reason = results[0].error if results else "no candidates"
        raise EvalError(f"every candidate of generation {generation} failed (first reason: {reason}); "
                        f"the run is kept and can be resumed after fixing the cause")
    worst = max(finished) + 1.0
    return [float(-r.quality) if r.ok else worst for r in results]


def costs(results: list[TrialResult]) -> list[float]:
    """FLOPs per example per candidate; a failed one (or one without FLOPs) gets the largest of its generation."""
    known = [float(r.flops) if r.ok and r.flops is not None and math.isfinite(r.flops) else None for r in results]
    worst = max((cost for cost in known if cost is not None), default=0.0)
    return [worst if cost is None else cost for cost in known]
