"""A deterministic fake pool and config for driving the real search loop without models."""

from __future__ import annotations

import numpy as np

from evomerge.config import validate
from evomerge.trial import TrialResult, TrialState


def make_config(strategy: str = "cma", generations: int = 4, seed: int = 0, **search):
    return validate({
        "name": "fake", "seed": seed,
        "models": {"base": "b", "experts": ["e0", "e1"]},
        "merge": {"method": "task_arithmetic", "granularity": "layer"},
        "eval": {"tasks": [{"name": "t", "metric": "acc"}]},
        "search": {"strategy": strategy, "population": 6, "generations": generations, "sigma0": 0.3, **search},
    })


class FakePool:
    """Quality peaks at weights (0.4, 1.3) in every group; FLOPs per example grow with the sum of the
    weights (a trade-off to search); genomes whose first gene is above `fail_above` fail.

    With `backfill`, a call also finishes the first half of `then` (the next generation, as idle
    workers would), interleaved after the first of `trials`; the other half stays "in flight"
    and finishes when a later call asks for it."""

    def __init__(self, fail_above: float = 2.0, stop_after: int | None = None, backfill: bool = False):
        self.fail_above = fail_above
        self.stop_after = stop_after
        self.backfill = backfill
        self.evaluated: list[int] = []
        self.closed = False

    def run(self, trials, then=()):
        order = list(reversed(trials))  # finish out of order, as real workers do
        if self.backfill:
            order[1:1] = list(then)[: len(then) // 2]
        for trial in order:
            if self.stop_after is not None and len(self.evaluated) >= self.stop_after:
                raise KeyboardInterrupt
            self.evaluated.append(trial.id)
            yield trial, self.result(trial)

    def result(self, trial) -> TrialResult:
        weights = np.array([genes["weight"] for genes in trial.recipe.params.values()])
        if trial.genome is not None and trial.genome[0] > self.fail_above:
            return TrialResult(trial.id, TrialState.FAILED, error="ValueError: injected")
        quality = float(1.0 - np.mean((weights - [0.4, 1.3]) ** 2))
        flops = float(1e6 * (1.0 + weights.sum()))
        return TrialResult(trial.id, TrialState.COMPLETE, quality=quality, metrics={"t": quality},
                           flops=flops, seconds={"total": 0.01}, worker="fake")

    def close(self):
        self.closed = True
