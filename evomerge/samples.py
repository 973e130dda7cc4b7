"""What a trial was scored on, how noisy its scores are, and whether two trials really differ.

Every trial records its *sample*: lm-eval's limit and, per task, how many documents were scored
and a hash of their ids and contents (`sample` in the journal line). Qualities are compared
(best trial, Pareto front, hypervolume) only between trials scored on the same documents:
`comparable` keeps the records of the run's current sample and sets the others aside.

Per-document scores come from lm-eval's sample-level results (`per_doc`: a string of 0/1 for
right-or-wrong metrics, else a list of numbers, in document order). From them, each task's
standard error is lm-eval's own for a mean metric, sample standard deviation / sqrt(n), and the
weighted quality's is sqrt(sum_t (w_t / W)^2 se_t^2) (tasks are scored on different documents).
`paired_test` compares two trials on the same documents by a paired bootstrap over documents,
resampled within each task (Koehn 2004, "Statistical Significance Tests for Machine
Translation Evaluation"; Efron & Tibshirani 1993), seeded, so a report repeats exactly.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable

from evomerge.trial import TrialState

LEGACY = "legacy"  # the sample key of a journal line written before samples were recorded
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


# -- per-document results ---------------------------------------------------------------------

def encode(values: list[float]) -> str | list[float]:
    """Per-document scores, compactly: '0110...' when every value is 0 or 1, else the numbers."""
    if all(value in (0, 1) for value in values):
        return "".join("1" if value else "0" for value in values)
    return [float(value) for value in values]


def decode(values: str | list[float]) -> list[float]:
    if isinstance(values, str):
        return [1.0 if char == "1" else 0.0 for char in values]
    return [float(value) for value in values]


def from_lm_eval(samples: dict[str, list[dict[str, Any]]], task: str, metric: str, filter_name: str,
                 reported: float) -> tuple[list[tuple[int, str]], list[float]] | None:
    """(doc id, doc hash) pairs and per-document values of one task's metric, in document order,
    from lm-eval's logged samples; None when the metric is not a mean of per-document values
    (a corpus-level metric such as a perplexity: no per-document score to pair or to average)."""
    rows = sorted((s for s in samples.get(task, []) if s.get("filter") == filter_name and metric in s),
                  key=lambda s: s["doc_id"])
    values = [s[metric] for s in rows]
    if not rows or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    if abs(sum(values) / len(values) - reported) > 1e-9 * max(1.0, abs(reported)):
        return None
    return [(int(s["doc_id"]), str(s.get("doc_hash", ""))) for s in rows], [float(v) for v in values]


def sample_of(limit: int | float | None, documents: dict[str, list[tuple[int, str]]]) -> dict[str, Any]:
    """A trial's sample: the limit, the documents per task, and a hash of which documents they were."""
    digest = hashlib.sha256(f"limit={limit!r};".encode())
    for task in sorted(documents):
        digest.update(task.encode() + b"\0")
        for doc_id, doc_hash in documents[task]:
            digest.update(f"{doc_id}:{doc_hash};".encode())
    return {"limit": limit, "documents": {task: len(docs) for task, docs in sorted(documents.items())},
            "hash": digest.hexdigest()[:16]}


def stderr(values: list[float]) -> float | None:
    """lm-eval's standard error of a mean metric: sample standard deviation / sqrt(n)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def quality_stderr(task_stderr: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Standard error of the weighted quality: sqrt(sum_t (w_t / W)^2 se_t^2); None if a task has none."""
    total = sum(weights.values())
    if any(task_stderr.get(task) is None for task in weights) or total <= 0:
        return None
    return math.sqrt(sum((w / total) ** 2 * task_stderr[task] ** 2 for task, w in weights.items()))


# -- comparable records -----------------------------------------------------------------------

def key(record: dict[str, Any]) -> str:
    sample = record.get("sample")
    return sample["hash"] if isinstance(sample, dict) and sample.get("hash") else LEGACY


def current_key(records: Iterable[dict[str, Any]]) -> str:
    """The sample of the latest trial (highest id) that records one: what the run scores on now."""
    recorded = [r for r in records if key(r) != LEGACY and r.get("state") == "complete"]
    return key(max(recorded, key=lambda r: r["trial"])) if recorded else LEGACY


def comparable(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(records scored on the run's current sample, the others). Lines written before evomerge
    recorded samples (no `sample` field) cannot tell: they count as scored on the current one."""
    current = current_key(records)
    same, other = [], []
    for r in records:
        (same if key(r) in (current, LEGACY) or r.get("state") != "complete" else other).append(r)
    return same, other


def ranked(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records a best trial, a front or a next stage is taken from: not pruned (scored on
    eval.subsample's subset only) and scored on the run's current sample."""
    return comparable([r for r in records if r.get("state") != TrialState.PRUNED.value])[0]


# -- paired comparison ------------------------------------------------------------------------

def paired_test(a: dict[str, Any], b: dict[str, Any], weights: dict[str, float], signs: dict[str, float],
                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any] | None:
    """Quality of trial a minus trial b on the same documents: the difference, its paired standard
    error, a 95% paired-bootstrap interval and the share of resamples where a is not better than b
    (a one-sided p-value). `signs[t]` is -1 for a lower-is-better task. None when either trial has
    no per-document results for some task or they were scored on other documents."""
    import numpy as np

    if key(a) == LEGACY or key(a) != key(b):
        return None
    total = sum(weights.values())
    diffs = {}
    for task in weights:
        da, db = (a.get("per_doc") or {}).get(task), (b.get("per_doc") or {}).get(task)
        if da is None or db is None:
            return None
        x, y = decode(da), decode(db)
        if len(x) != len(y) or not x:
            return None
        diffs[task] = np.asarray(x) - np.asarray(y)
    scale = {task: signs.get(task, 1.0) * weights[task] / total for task in weights}
    delta = float(sum(scale[t] * d.mean() for t, d in diffs.items()))
    variance = sum((scale[t] ** 2) * (d.var(ddof=1) / len(d) if len(d) > 1 else 0.0) for t, d in diffs.items())
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    for task, d in diffs.items():
        step = max(1, 2_000_000 // len(d))  # resamples per chunk: a few MB of indices at a time
        for start in range(0, resamples, step):
            picks = rng.integers(0, len(d), size=(min(step, resamples - start), len(d)))
            draws[start:start + len(picks)] += scale[task] * d[picks].mean(axis=1)
    low, high = (float(v) for v in np.quantile(draws, [0.025, 0.975]))
    return {"trial": a["trial"], "versus": b["trial"], "versus_label": b.get("label"), "delta": delta,
            "stderr": math.sqrt(variance), "interval": [low, high],
            "p_value": float((draws <= 0).mean()), "resamples": resamples,
            "significant": low > 0}


def significance_line(test: dict[str, Any] | None, reason: str = "") -> str:
    """One sentence: does the best evolved trial beat the best reference by more than the noise?"""
    if test is None:
        return f"Significance: not tested ({reason or 'no per-document results on the same documents'})."
    verdict = ("beats it by more than the noise" if test["significant"] else
               "does not beat it by more than the noise: the difference may be chance")
    return (f"Significance: best evolved trial {test['trial']} vs best reference {test['versus_label']} "
            f"(trial {test['versus']}): {test['delta']:+.4f} ± {test['stderr']:.4f} (paired standard error), "
            f"95% paired-bootstrap interval [{test['interval'][0]:+.4f}, {test['interval'][1]:+.4f}], "
            f"p = {test['p_value']:.3f} (one-sided, {test['resamples']} resamples of the documents): "
            f"{verdict}.")
