"""Cheaper fitness (`eval.subsample`): successive halving over the evaluation documents.

MERGE3 (arXiv 2502.10436) cut the fitness cost of evolutionary merging about 50x by scoring
candidates on a small subset of the evaluation data. Here a generation runs in two rungs:

1. every candidate is scored on the *subset*: the first `fraction` x `eval.limit` documents of
   each task (the same documents for every candidate, so subset scores compare with each other);
2. the best `promote` share of them by subset quality (rounded up, at least one; failed ones
   never) is scored again on the full `eval.limit`, exactly as a run without subsample scores
   it; so are generation 0's references.

What the optimiser is told (`fitness`): a promoted candidate's loss is -(full quality); a
candidate held back gets -(subset quality) plus the smallest penalty that ranks it no better
than the worst promoted one; a failed one the worst finite loss of the generation plus one.
Why: the two limits are different measurements (a subset score is noisier, and on easy
subsets higher), so a held-back candidate must not outrank a promoted one on a lucky subset
score; and everything the rung-1 evidence says (held back = worse on the same documents than
every promoted one) is kept. Among held-back candidates the subset order and spacing stay, so
CMA-ES (which uses ranks only: its parents are the best half, its active update weighs the
worst) and value-based samplers both see a consistent ordering. With `promote: 0.5` the
promoted set is exactly CMA-ES's parents when nothing fails.

The run directory: `subsample.jsonl` receives every candidate's subset result as it finishes
(read back at resume, so nothing finished is scored again); `journal.jsonl` still holds one line
per trial, with `limit` (lm-eval's limit its quality came from): references and promoted
candidates are `complete` (scored on the full limit; promoted ones also carry `subset`: the
subset's limit, quality and metrics), candidates held back are `pruned` (quality and metrics from
the subset only: `TrialState.PRUNED`). Only complete trials are ranked, put on the Pareto front,
handed to a next stage or exported; the report tells how well the subset ranked the candidates
scored on both (`agreement`): the check that the subset is large enough for the tasks, on the
user's own suite.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from evomerge.config import EvalConfig
from evomerge.errors import EvalError
from evomerge.run_dir import JOURNAL, SUBSAMPLE, RunDir
from evomerge.trial import Trial, TrialResult, TrialState, record


def race(eval_config: EvalConfig, pool: Any, references: list[Trial], candidates: list[Trial],
         journal: dict[int, dict], run: RunDir, generation: int, evaluate: Callable[..., dict[int, TrialResult]],
         ) -> tuple[list[float], list[TrialResult]]:
    """Score one generation in two rungs; return the candidates' losses and the results they come
    from (full limit where promoted, else the subset), in candidate order.

    `evaluate` is `evomerge.search.evaluate` (read back what a journal holds, score the rest,
    journal each result as it finishes)."""
    share, subset_limit = eval_config.subsample.promote, eval_config.subset_limit
    run.repair_journal(SUBSAMPLE)
    cheap = [dataclasses.replace(trial, limit=subset_limit) for trial in candidates]
    subset = evaluate(pool, cheap, run.finished(SUBSAMPLE), run, generation,
                      line=subset_line, file=SUBSAMPLE)

    chosen = promoted(candidates, subset, share)
    for trial in cheap:
        if trial.id not in chosen and trial.id not in journal:
            line = subset_line(trial, subset[trial.id])
            run.append({**line, "state": TrialState.PRUNED.value} if subset[trial.id].ok else line, JOURNAL)
    climbing = references + [trial for trial in candidates if trial.id in chosen]
    full = evaluate(pool, climbing, journal, run, generation,
                    line=lambda trial, result: full_line(trial, result, eval_config.limit, subset.get(trial.id),
                                                         subset_limit))
    losses = fitness([subset[trial.id] for trial in candidates], [full.get(trial.id) for trial in candidates],
                     generation)
    return losses, [full.get(trial.id) or subset[trial.id] for trial in candidates]


def promoted(candidates: list[Trial], subset: dict[int, TrialResult], share: float) -> set[int]:
    """Ids of the best ceil(share x candidates) candidates by subset quality (at least one; failed
    ones never; ties go to the earlier trial, so the choice is reproducible)."""
    ranked = sorted((trial for trial in candidates if subset[trial.id].ok),
                    key=lambda trial: (-subset[trial.id].quality, trial.id))
    count = max(1, math.ceil(round(share * len(candidates), 9)))
    return {trial.id for trial in ranked[:count]}


def fitness(subset: list[TrialResult], full: list[TrialResult | None], generation: int) -> list[float]:
    """Losses per candidate from its subset result and its full result (None: not promoted)."""
    promoted_losses = [-f.quality for f in full if f is not None and f.ok]
    held_back = [-s.quality for s, f in zip(subset, full) if f is None and s.ok]
    penalty = max(0.0, max(promoted_losses) - min(held_back)) if promoted_losses and held_back else 0.0
    values: list[float | None] = []
    for s, f in zip(subset, full):
        if f is not None:
            values.append(-f.quality if f.ok else None)
        else:
            values.append(-s.quality + penalty if s.ok else None)
    finished = [v for v in values if v is not None]
    if not finished:
        reason = next((r.error for r in [*full, *subset] if r is not None and not r.ok), "no candidates")
        raise EvalError(f"every candidate of generation {generation} failed (first reason: {reason}); "
                        f"the run is kept and can be resumed after fixing the cause")
    worst = max(finished) + 1.0
    return [worst if v is None else float(v) for v in values]


def subset_line(trial: Trial, result: TrialResult) -> dict[str, Any]:
    """The `subsample.jsonl` line of a candidate scored on the subset."""
    return {**record(trial, result), "limit": trial.limit}


def full_line(trial: Trial, result: TrialResult, limit: int | None, subset: TrialResult | None,
              subset_limit: int | float | None) -> dict[str, Any]:
    """The journal line of a trial scored on the full limit; a promoted candidate also keeps its subset score."""
    line = {**record(trial, result), "limit": limit}
    if subset is not None:
        line["subset"] = {"limit": subset_limit, "quality": subset.quality, "metrics": subset.metrics,
                          "flops": subset.flops}
    return line


def agreement(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How alike the subset and the full limit ranked the candidates scored on both (the promoted
    ones): Spearman's correlation over those pairs ({"pairs", "spearman"}; spearman None below 3
    pairs or when either side is constant). These are each generation's best by subset score, a
    narrower range of quality than all candidates, which lowers the correlation: read it as what
    the subset can tell apart among the candidates that matter."""
    pairs = [(r["subset"]["quality"], r["quality"]) for r in records
             if r.get("state") == "complete" and isinstance(r.get("subset"), dict)
             and r["subset"].get("quality") is not None]
    return {"pairs": len(pairs), "spearman": spearman([a for a, _ in pairs], [b for _, b in pairs])}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (ties at their mean rank); None below 3 values or for a constant side."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks
