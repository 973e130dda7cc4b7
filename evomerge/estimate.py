"""Cheaper fitness (`eval.estimate`): each candidate scored on a few anchor documents, its full score estimated.

Facts this follows (tinyBenchmarks, Polo et al., ICML 2024; MERGE3, arXiv 2502.10436):

- *Anchor documents* are chosen from how models already scored on every document: documents are
  clustered by their correctness pattern across those models, one representative per cluster (the
  document nearest its cluster's centre) is kept, weighted by its cluster's share of the documents.
  The weighted mean of a model's anchor results estimates its full mean.
- *gp-IRT*: a two-parameter logistic item-response model (per document a discrimination `a_j` and an
  easiness `c_j`, per model an ability `theta`: P(right) = sigmoid(a_j theta + c_j)) fitted on the same
  data; a new model's ability is fitted on its anchor results only, and its full mean estimated as
  (observed anchor results + predicted probabilities of every other document) / n. The final estimate
  mixes the two: lambda x anchor mean + (1 - lambda) x IRT estimate; lambda is chosen by leaving each
  fitted model out in turn (the value on a fixed grid with the least squared error), unless given.

- *genome* (the default; for candidates that are near-duplicates, as one run's candidates are): a
  per-document model over the genome. MERGE3's mp-IRT uses the fact that a merged model's ability
  follows from its recipe (its ability is a combination of the endpoint models'); here each
  document's result is predicted from the candidate's genome by Gaussian-process regression (an RBF
  kernel over the [0, 1] genome box, prior mean = the document's mean) on the fully evaluated
  candidates of the run, length scale and noise chosen by the exact leave-one-out error on those
  candidates (a fixed grid). Anchors are the documents the model is least sure about for this
  generation's candidates (largest sum of p (1 - p)): documents every candidate answers alike carry no
  rank information and are predicted instead. A candidate's estimate is, per task, (its observed anchor
  results + the predicted probabilities of every other document) / n, the predictions moved by one
  logit shift per task fitted on the candidate's anchor residuals (MAP, a Gaussian prior whose scale,
  0 included, is chosen by leaving each fitted candidate out). With fewer than `MIN_GENOMES` fully
  evaluated candidates of the stage (the first generations: only the references, which have no
  genome), the estimate falls back to gp-IRT. With `refit`, the regression also holds the earlier
  candidates that were scored on anchors only (not promoted): each document's GP is fitted on every
  candidate that observed it (the anchor documents are journaled with each anchor result). Within one
  run, those pruned candidates are most of what the run has seen near the current ones.

Here the models are the run's own: generation 0's references (sources and uniform merge, always scored
on the full limit) and, with `refit`, every candidate promoted to the full limit in an earlier
generation. The anchors of generation g are a function of the journal's full records of generations
before g (and of the references), fitted by deterministic steps (no random draws): a seeded run repeats
them, and a resumed run recomputes the same anchors from its journal.

One generation (`race`): every candidate is scored on the anchors only (lm-eval's `samples`: exactly
those documents), each gets an estimated quality, and the best `promote` share by estimate is scored on
the full limit, as evomerge/racing.py promotes by subset quality; the optimiser's losses follow racing's
rule. `estimate.jsonl` receives every anchor result (read back at resume); `journal.jsonl` has the
promoted candidates as `complete` (measured quality, `estimate` kept beside it) and the others as
`pruned` with `estimate` (their quality is the estimate: never ranked, on the front or exported).
Per-document values are the task metric's values (0/1 for exact match and acc, any number in [0, 1]
otherwise, read as a probability by the IRT fit; the genome model takes any numbers, its predictions kept
within their range and its logit shift only for values in [0, 1]); quality is the weighted, signed mean of the per-task
estimates, as evaluate.quality computes it from measured scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Callable

import numpy as np

from evomerge.config import EvalConfig
from evomerge.errors import EvalError
from evomerge.racing import fitness, full_line, promoted, spearman
from evomerge.run_dir import JOURNAL, RunDir
from evomerge.samples import decode
from evomerge.trial import Trial, TrialResult, TrialState, record

ESTIMATE = "estimate.jsonl"
MIX_GRID = tuple(i / 10 for i in range(11))
IRT_STEPS = 400
IRT_RATE = 2.0
PRIOR = 1.0  # the Gaussian prior's precision on abilities, discriminations and easiness (keeps all-right items finite)
ABILITY_GRID = np.linspace(-6.0, 6.0, 481)
MIN_GENOMES = 3  # fully evaluated candidates (with a genome) the genome model needs; fewer: gp-irt
SCALES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.8, 1.3)  # RBF length scales, x sqrt(genes)
NOISES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # the kernel's noise term (the kernel's own variance is 1)
SHIFTS = (0.0, 0.25, 0.5, 1.0)  # prior scales of a candidate's logit shift (0: none)
SHIFT_GRID = np.linspace(-3.0, 3.0, 121)


# -- the estimator ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskAnchors:
    """One task's anchors: document indices (sorted), their weights (summing to 1), the number of
    documents of the full limit, the IRT item parameters (None: anchor mean only) and lambda."""

    documents: tuple[int, ...]
    weights: tuple[float, ...]
    size: int
    discrimination: tuple[float, ...] | None = None
    easiness: tuple[float, ...] | None = None
    mix: float = 1.0

    def estimate(self, observed: list[float]) -> float:
        """The task's full mean from the anchor documents' values (in `documents` order)."""
        y = np.asarray(observed, dtype=float)
        if len(y) != len(self.documents):
            raise EvalError(f"estimate: {len(y)} anchor results for {len(self.documents)} anchor documents")
        anchor_mean = float(np.dot(self.weights, y))
        if self.discrimination is None or self.mix >= 1.0:
            return anchor_mean
        a, c = np.asarray(self.discrimination), np.asarray(self.easiness)
        return self.mix * anchor_mean + (1.0 - self.mix) * irt_mean(y, list(self.documents), a, c)


@dataclasses.dataclass(frozen=True, eq=False)
class GenomeModel:
    """Per-document predictions from a genome: Gaussian-process regression (RBF kernel, length `scale`,
    noise `noise`) of the fully evaluated candidates' per-document values (all tasks side by side, task
    `t` at columns offsets[t]:offsets[t] + size), and the prior scale of a candidate's logit shift."""

    genomes: np.ndarray  # fitted candidates x genes
    coefficients: np.ndarray  # (K + noise I)^-1 (Y - mean): fitted candidates x documents
    mean: np.ndarray  # documents
    scale: float
    noise: float
    shift: float
    offsets: dict[str, int]
    low: float = 0.0  # the range predictions are kept in: [0, 1], or wider where a metric's values are
    high: float = 1.0
    partial: int = 0  # of `genomes`, the last `partial` rows: candidates observed on anchor documents only

    def predict(self, genome: Any) -> np.ndarray:
        """Every document's predicted value (for 0/1 metrics: the probability of a right answer) for one genome."""
        g = np.asarray(genome, dtype=float)[None]
        k = np.exp(-((g[:, None] - self.genomes[None]) ** 2).sum(axis=2) / (2 * self.scale ** 2))
        return np.clip(self.mean + (k @ self.coefficients)[0], self.low, self.high)

    def task_estimate(self, predicted: np.ndarray, documents: list[int], observed: np.ndarray) -> float:
        """A task's full mean: observed anchors as they are, the others predicted (shifted by the MAP logit
        shift of the anchors' residuals)."""
        rest = np.ones(len(predicted), dtype=bool)
        rest[documents] = False
        others = shifted(predicted[rest], map_shift(predicted[documents], observed, self.shift))
        return float((observed.sum() + others.sum()) / len(predicted))

    def describe(self) -> dict[str, Any]:
        return {"fitted": len(self.genomes) - self.partial, "partial": self.partial, "scale": self.scale,
                "noise": self.noise, "shift": self.shift}


@dataclasses.dataclass(frozen=True)
class Anchors:
    tasks: dict[str, TaskAnchors]
    fitted_on: tuple[int, ...]  # the trials whose full results chose them
    model: GenomeModel | None = dataclasses.field(default=None, compare=False)  # method genome (None: fell back)

    @property
    def method(self) -> str:
        if self.model is not None:
            return "genome"
        return "gp-irt" if any(a.discrimination is not None for a in self.tasks.values()) else "anchors"

    def documents(self) -> dict[str, list[int]]:
        return {task: list(anchors.documents) for task, anchors in self.tasks.items()}

    def cost(self) -> float:
        """Anchor documents over full-limit documents, all tasks together."""
        return sum(len(a.documents) for a in self.tasks.values()) / sum(a.size for a in self.tasks.values())

    def estimates(self, per_doc: dict[str, Any], genome: Any = None) -> dict[str, float]:
        """Per task, the estimated full mean of the metric from an anchor evaluation's per-document values
        (and, with the genome model, the candidate's genome)."""
        if self.model is None:
            return {task: anchors.estimate(decode(per_doc[task])) for task, anchors in self.tasks.items()}
        if genome is None:
            raise EvalError("estimate: the genome model needs the candidate's genome")
        predicted = self.model.predict(genome)
        found = {}
        for task, anchors in self.tasks.items():
            observed = np.asarray(decode(per_doc[task]), dtype=float)
            if len(observed) != len(anchors.documents):
                raise EvalError(f"estimate: {len(observed)} anchor results for {len(anchors.documents)} "
                                f"anchor documents of task {task}")
            start = self.model.offsets[task]
            found[task] = self.model.task_estimate(predicted[start:start + anchors.size], list(anchors.documents),
                                                   observed)
        return found

    def digest(self) -> str:
        text = ";".join(f"{t}:{','.join(map(str, a.documents))}" for t, a in sorted(self.tasks.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def anchor_count(anchors: int | float, size: int) -> int:
    """Anchors of a task of `size` documents: a count (at most size) or a fraction (rounded up, at least 1)."""
    if isinstance(anchors, float) and anchors < 1.0:
        return max(1, math.ceil(round(anchors * size, 9)))
    return max(1, min(size, int(anchors)))


def fit(matrices: dict[str, np.ndarray], anchors: int | float, method: str = "gp-irt", mix: float | None = None,
        fitted_on: tuple[int, ...] = ()) -> Anchors:
    """Anchors per task from `matrices[task]`: models x documents of full-limit per-document values."""
    tasks = {}
    for task, values in matrices.items():
        values = np.asarray(values, dtype=float)
        documents, weights = choose(values, anchor_count(anchors, values.shape[1]))
        plain = TaskAnchors(tuple(documents), tuple(weights), values.shape[1])
        if method == "anchors":
            tasks[task] = plain
            continue
        a, c, _ = fit_irt(values)
        chosen = mix if mix is not None else choose_mix(values, documents, weights)
        tasks[task] = dataclasses.replace(plain, discrimination=tuple(map(float, a)), easiness=tuple(map(float, c)),
                                          mix=float(chosen))
    return Anchors(tasks, tuple(fitted_on))


def choose(values: np.ndarray, k: int) -> tuple[list[int], list[float]]:
    """k anchor documents of a models x documents matrix and their weights (summing to 1).

    The documents' correctness patterns (columns) are clustered by k-means into at most k clusters (no
    more than there are distinct patterns), started from farthest points (the first: the document
    nearest the mean pattern; ties by index), 50 Lloyd steps. The k anchors are shared among the
    clusters in proportion to their sizes (largest remainder, at least one each); a cluster's anchors
    are its documents nearest its centre, ties spread evenly over the cluster in index order, each
    weighted by its share of the cluster's documents. No random draws."""
    points = values.T  # documents x models
    n = len(points)
    k = min(k, n)
    clusters = min(k, len(np.unique(points, axis=0)))
    centre = points.mean(axis=0)
    chosen = [int(np.argmin(((points - centre) ** 2).sum(axis=1)))]
    distance = ((points - points[chosen[0]]) ** 2).sum(axis=1)
    while len(chosen) < clusters:
        pick = int(np.argmax(distance))  # the first farthest: a pattern not chosen yet
        chosen.append(pick)
        distance = np.minimum(distance, ((points - points[pick]) ** 2).sum(axis=1))
    centres = points[chosen].astype(float)
    for _ in range(50):
        label = np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        moved = np.array([points[label == j].mean(axis=0) if (label == j).any() else centres[j]
                          for j in range(clusters)])
        if np.allclose(moved, centres):
            break
        centres = moved
    label = np.argmin(((points[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    groups = [np.flatnonzero(label == j) for j in range(clusters)]
    groups = [g for g in groups if len(g)]
    share = _allocate([len(g) for g in groups], k)
    documents, weights = [], []
    for group, count, j in zip(groups, share, range(len(groups))):
        gap = ((points[group] - points[group].mean(axis=0)) ** 2).sum(axis=1)
        levels = np.unique(np.round(gap, 12))
        picked: list[int] = []
        for level in levels:  # the nearest first; within one distance, evenly spread in index order
            tied = group[np.round(gap, 12) == level]
            need = min(count - len(picked), len(tied))
            picked += [int(tied[int((i + 0.5) * len(tied) / need)]) for i in range(need)]
            if len(picked) == count:
                break
        documents += picked
        weights += [len(group) / count / n] * count
    order = np.argsort(documents)
    return [documents[i] for i in order], [weights[i] for i in order]


def _allocate(sizes: list[int], k: int) -> list[int]:
    """k items shared in proportion to `sizes`: at least one each (k >= len(sizes)), at most the size,
    the rest by largest remainder (ties to the earlier)."""
    share = [1] * len(sizes)
    total = sum(sizes)
    while sum(share) < k:
        want = [k * size / total - have if have < size else -math.inf for size, have in zip(sizes, share)]
        share[int(np.argmax(want))] += 1
    return share


def fit_irt(values: np.ndarray, steps: int = IRT_STEPS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 2PL model of a models x documents matrix of values in [0, 1] (read as probabilities of a right
    answer): discrimination a (documents), easiness c (documents), ability theta (models), by full-batch
    gradient ascent on the log-likelihood with a Gaussian prior on every parameter, from a deterministic
    start (theta: standardised model means; a: 1; c: the smoothed logit of each document's mean)."""
    y = np.clip(np.asarray(values, dtype=float), 0.0, 1.0)
    m, n = y.shape
    means = y.mean(axis=1)
    theta = (means - means.mean()) / (means.std() or 1.0)
    a = np.ones(n)
    p0 = (y.sum(axis=0) + 0.5) / (m + 1.0)
    c = np.log(p0 / (1 - p0))
    for _ in range(steps):
        p = _sigmoid(theta[:, None] * a[None] + c[None])
        r = y - p
        g_theta = (r * a[None]).mean(axis=1) - PRIOR * theta / n
        g_a = (r * theta[:, None]).mean(axis=0) - PRIOR * (a - 1.0) / m
        g_c = r.mean(axis=0) - PRIOR * c / m
        theta, a, c = theta + IRT_RATE * g_theta, a + IRT_RATE * g_a, c + IRT_RATE * g_c
    return a, c, theta


def ability(observed: np.ndarray, a: np.ndarray, c: np.ndarray) -> float:
    """The MAP ability (standard normal prior) of a model given its values on the documents with
    parameters (a, c): the best point of a fixed grid (deterministic, no optimiser state)."""
    p = _sigmoid(ABILITY_GRID[:, None] * a[None] + c[None])
    p = np.clip(p, 1e-9, 1 - 1e-9)
    log_post = (observed[None] * np.log(p) + (1 - observed[None]) * np.log(1 - p)).sum(axis=1) - ABILITY_GRID ** 2 / 2
    return float(ABILITY_GRID[int(np.argmax(log_post))])


def irt_mean(observed: np.ndarray, documents: list[int], a: np.ndarray, c: np.ndarray) -> float:
    """(observed anchor values + the IRT's predicted values of every other document) / documents."""
    theta = ability(observed, a[documents], c[documents])
    predicted = _sigmoid(theta * a + c)
    predicted[documents] = observed
    return float(predicted.mean())


def choose_mix(values: np.ndarray, documents: list[int], weights: list[float]) -> float:
    """lambda by leaving each model out: the IRT fitted on the others, the left-out model's anchor mean
    and IRT estimate against its real mean; the grid value with the least squared error (the larger on ties)."""
    m = values.shape[0]
    if m < 3:
        return 1.0
    anchor, irt, truth = [], [], []
    for i in range(m):
        rest = np.delete(values, i, axis=0)
        a, c, _ = fit_irt(rest, steps=IRT_STEPS // 2)
        y = values[i, documents]
        anchor.append(float(np.dot(weights, y)))
        irt.append(irt_mean(y, documents, a, c))
        truth.append(float(values[i].mean()))
    anchor_v, irt_v, truth_v = map(np.asarray, (anchor, irt, truth))
    errors = [float((((lam * anchor_v + (1 - lam) * irt_v) - truth_v) ** 2).mean()) for lam in MIX_GRID]
    best = min(errors)
    return max(lam for lam, e in zip(MIX_GRID, errors) if e <= best + 1e-15)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def shifted(p: np.ndarray, shift: float) -> np.ndarray:
    """Probabilities moved by a logit shift (none: as they are)."""
    if shift == 0.0:
        return p
    q = np.clip(p, 0.01, 0.99)
    return _sigmoid(np.log(q / (1 - q)) + shift)


def map_shift(predicted: np.ndarray, observed: np.ndarray, scale: float) -> float:
    """The MAP logit shift of `predicted` given the observed values, prior N(0, scale^2) (0: no shift);
    the best point of a fixed grid."""
    if scale == 0.0 or len(observed) == 0:
        return 0.0
    q = np.clip(np.clip(predicted, 0.01, 0.99), 1e-9, 1 - 1e-9)
    p = np.clip(_sigmoid(np.log(q / (1 - q))[None] + SHIFT_GRID[:, None]), 1e-9, 1 - 1e-9)
    log_post = ((observed[None] * np.log(p) + (1 - observed[None]) * np.log(1 - p)).sum(axis=1)
                - SHIFT_GRID ** 2 / (2 * scale ** 2))
    return float(SHIFT_GRID[int(np.argmax(log_post))])


def _kernel(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    return np.exp(-((a[:, None] - b[None]) ** 2).sum(axis=2) / (2 * scale ** 2))


def fit_genome(matrices: dict[str, np.ndarray], genomes: list[Any], candidates: list[Any], anchors: int | float,
               fitted_on: tuple[int, ...] = (), partial: list[tuple[Any, dict[str, tuple[list[int], list[float]]]]]
               = ()) -> Anchors:
    """The genome model (module docstring) from `matrices[task]` (fitted candidates x documents) and their
    `genomes`, with anchors chosen for `candidates` (this generation's genomes). `partial`: earlier
    candidates scored on anchor documents only, `(genome, {task: (documents, values)})`: each document's
    regression also holds the candidates that observed it (length scale, noise and logit shift are still
    chosen on the fully evaluated candidates)."""
    tasks = list(matrices)
    sizes = {task: np.asarray(matrices[task]).shape[1] for task in tasks}
    offsets = dict(zip(tasks, np.cumsum([0] + [sizes[t] for t in tasks])[:-1].tolist()))
    y = np.concatenate([np.asarray(matrices[task], dtype=float) for task in tasks], axis=1)
    g = np.asarray(genomes, dtype=float)
    mean = y.mean(axis=0)
    z = y - mean
    best = None
    for scale in SCALES:
        length = scale * math.sqrt(g.shape[1])
        k = _kernel(g, g, length)
        for noise in NOISES:
            inverse = np.linalg.inv(k + noise * np.eye(len(g)))
            loo = (inverse @ z) / np.diag(inverse)[:, None]  # exact leave-one-out residuals
            error = float((loo ** 2).sum())
            if best is None or error < best[0] - 1e-12:
                best = (error, length, noise, inverse)
    _, length, noise, inverse = best
    coefficients = inverse @ z
    low, high = min(0.0, float(y.min())), max(1.0, float(y.max()))
    held_out = np.clip(y - coefficients / np.diag(inverse)[:, None], low, high)  # each fitted one left out
    rows = g
    if len(partial):
        rows, coefficients = with_partial(g, z, mean, offsets, partial, length, noise, coefficients)
    model = GenomeModel(rows, coefficients, mean, float(length), float(noise), 0.0, offsets, low, high,
                        len(rows) - len(g))
    predicted = np.array([model.predict(c) for c in candidates]) if len(candidates) else held_out
    spread = (predicted * (1 - predicted)).sum(axis=0)
    chosen: dict[str, TaskAnchors] = {}
    for task in tasks:
        n, start = sizes[task], offsets[task]
        k_task = anchor_count(anchors, n)
        order = np.argsort(-spread[start:start + n], kind="stable")  # the least sure first, ties by index
        documents = tuple(sorted(int(i) for i in order[:k_task]))
        chosen[task] = TaskAnchors(documents, tuple([1.0 / k_task] * k_task), n)
    errors = []
    for scale in SHIFTS if (low, high) == (0.0, 1.0) else SHIFTS[:1]:  # by leaving each fitted one out; a
        # logit shift only for values in [0, 1]
        trial = dataclasses.replace(model, shift=scale)
        error = 0.0
        for row in range(len(g)):
            for task in tasks:
                start, docs = offsets[task], list(chosen[task].documents)
                p, truth = held_out[row, start:start + sizes[task]], y[row, start:start + sizes[task]]
                error += (trial.task_estimate(p, docs, truth[docs]) - truth.mean()) ** 2
        errors.append(error)
    shift = SHIFTS[int(np.argmin(errors))]
    return Anchors(chosen, tuple(fitted_on), dataclasses.replace(model, shift=float(shift)))


def with_partial(g: np.ndarray, z: np.ndarray, mean: np.ndarray, offsets: dict[str, int],
                 partial: list[tuple[Any, dict[str, tuple[list[int], list[float]]]]], length: float, noise: float,
                 coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fitted genomes with the partial candidates' below them, and the regression's coefficients:
    for each document, the exact GP posterior on the rows that observed it (the fully fitted ones and
    the partial ones that had it as an anchor; the others' coefficients 0). Documents with the same
    observing rows share one solve; a document no partial candidate observed keeps `coefficients`."""
    fitted = len(g)
    observed = np.zeros((len(partial), z.shape[1]), dtype=bool)
    values = np.zeros((len(partial), z.shape[1]))
    for row, (_, found) in enumerate(partial):
        for task, (documents, got) in found.items():
            columns = offsets[task] + np.asarray(documents, dtype=int)
            observed[row, columns] = True
            values[row, columns] = got
    every = np.vstack([g, np.asarray([genome for genome, _ in partial], dtype=float)])
    out = np.zeros((len(every), z.shape[1]))
    out[:fitted] = coefficients
    groups: dict[bytes, list[int]] = {}
    for column in np.flatnonzero(observed.any(axis=0)):  # in column order: the same groups every time
        groups.setdefault(np.packbits(observed[:, column]).tobytes(), []).append(int(column))
    kernel = _kernel(every, every, length)
    for columns in groups.values():
        rows = np.concatenate([np.arange(fitted), fitted + np.flatnonzero(observed[:, columns[0]])])
        target = np.vstack([z[:, columns], values[rows[fitted:] - fitted][:, columns] - mean[columns]])
        out[:, columns] = 0.0
        out[np.ix_(rows, columns)] = np.linalg.solve(kernel[np.ix_(rows, rows)] + noise * np.eye(len(rows)), target)
    return every, out


def estimated_quality(estimates: dict[str, float], weights: dict[str, float], higher: dict[str, bool]) -> float:
    """The weighted quality (evaluate.quality's formula) from per-task estimated metrics."""
    total = sum(weights.values())
    return sum(w * (estimates[t] if higher.get(t, True) else -estimates[t]) for t, w in weights.items()) / total


# -- rank agreement -------------------------------------------------------------------------------

def kendall(a: list[float], b: list[float]) -> float | None:
    """Kendall's tau-b; None below 3 values or for a constant side."""
    if len(a) < 3:
        return None
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denominator if denominator > 0 else None


def agreement(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The estimator's error on the promoted candidates (estimate before promotion vs measured full
    quality): pairs, Spearman, Kendall, mean absolute error. Like racing.agreement, these are each
    generation's best by estimate: a narrow range of quality, harder to rank than all candidates."""
    pairs = [(r["estimate"]["quality"], r["quality"]) for r in records
             if r.get("state") == "complete" and isinstance(r.get("estimate"), dict)]
    est, full = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"pairs": len(pairs), "spearman": spearman(est, full), "kendall": kendall(est, full),
            "mae": float(np.mean(np.abs(np.subtract(est, full)))) if pairs else None}


# -- the run's anchors and one generation -----------------------------------------------------------

def matrices(records: list[dict[str, Any]], tasks: list[str]) -> tuple[dict[str, np.ndarray], tuple[int, ...]]:
    """Per task, models x documents of the full-limit per-document values of `records` (complete ones
    with per_doc for every task, all of one length per task); and their trial ids, in id order."""
    usable = sorted((r for r in records if r.get("state") == "complete"
                     and all(t in (r.get("per_doc") or {}) for t in tasks)), key=lambda r: r["trial"])
    if not usable:
        return {}, ()
    sizes = {task: len(decode(usable[0]["per_doc"][task])) for task in tasks}
    usable = [r for r in usable if all(len(decode(r["per_doc"][t])) == sizes[t] for t in tasks)]
    return ({task: np.array([decode(r["per_doc"][task]) for r in usable]) for task in tasks},
            tuple(r["trial"] for r in usable))


def run_anchors(eval_config: EvalConfig, records: list[dict[str, Any]], generation: int, first: int,
                candidates: list[Any] = ()) -> Anchors:
    """The anchors of `generation` (of a stage whose first generation is `first`): fitted on the full
    results of the stage's references and, with refit, of every earlier generation's full-limit trials;
    with method genome, on those trials' genomes and chosen for the `candidates`' genomes (gp-irt while
    fewer than MIN_GENOMES such trials are there)."""
    settings = eval_config.estimate
    tasks = [task.name for task in eval_config.tasks]
    limit = eval_config.limit
    basis = [r for r in records if r.get("generation", 0) >= first and r.get("state") == "complete"
             and (r.get("sample") or {}).get("limit", limit) == limit
             and (r.get("label") is not None and r["generation"] == first
                  or settings.refit and r.get("label") is None and r["generation"] < generation)]
    if settings.method == "genome" and candidates:
        width = len(candidates[0])
        fitted = [r for r in basis if r.get("label") is None and len(r.get("genome") or ()) == width]
        found, ids = matrices(fitted, tasks)
        if len(ids) >= MIN_GENOMES:
            genome = {r["trial"]: r["genome"] for r in fitted}
            partial = anchor_results(records, tasks, limit, width, first, generation) if settings.refit else []
            return fit_genome(found, [genome[i] for i in ids], list(candidates), settings.anchors, ids, partial)
    found, ids = matrices(basis, tasks)
    if len(ids) < 2:
        raise EvalError(f"eval.estimate: anchors need the full per-document results of at least 2 scored models "
                        f"(the references: search.references must be true), found {len(ids)}; every task's metric "
                        f"must be a mean of per-document scores")
    return fit(found, settings.anchors, "anchors" if settings.method == "anchors" else "gp-irt", settings.mix, ids)


def anchor_results(records: list[dict[str, Any]], tasks: list[str], limit: Any, width: int, first: int,
                   generation: int) -> list[tuple[list[float], dict[str, tuple[list[int], list[float]]]]]:
    """The anchor results of the stage's candidates of generations first .. generation - 1 that were not
    promoted (pruned, with their anchor documents journaled), in trial order: `(genome, {task: (documents,
    values)})`, what fit_genome's `partial` takes."""
    found = []
    for r in sorted(records, key=lambda r: r["trial"]):
        documents = r.get("anchor_documents") or {}
        if (r.get("state") == "pruned" and first <= r.get("generation", 0) < generation
                and len(r.get("genome") or ()) == width and (r.get("sample") or {}).get("limit", limit) == limit
                and all(t in documents and t in (r.get("per_doc") or {}) for t in tasks)):
            values = {t: decode(r["per_doc"][t]) for t in tasks}
            if all(len(values[t]) == len(documents[t]) for t in tasks):
                found.append((r["genome"], {t: (documents[t], values[t]) for t in tasks}))
    return found


def race(eval_config: EvalConfig, pool: Any, references: list[Trial], candidates: list[Trial],
         journal: dict[int, dict], run: RunDir, generation: int, first: int,
         evaluate: Callable[..., dict[int, TrialResult]]) -> tuple[list[float], list[TrialResult]]:
    """Score one generation: references on the full limit, candidates on the anchors, the best share
    by estimated quality on the full limit; the candidates' losses and results (racing's rule)."""
    settings = eval_config.estimate
    if references:
        evaluate(pool, references, journal, run, generation)
    anchors = run_anchors(eval_config, run.records(), generation, first, [trial.genome for trial in candidates])
    documents = tuple((task, tuple(docs)) for task, docs in anchors.documents().items())
    run.repair_journal(ESTIMATE)
    cheap = [dataclasses.replace(trial, documents=documents) for trial in candidates]
    weights = {task.name: task.weight for task in eval_config.tasks}
    spec_higher = {task.name: task.higher_is_better for task in eval_config.tasks}

    def estimated(trial: Trial, result: TrialResult) -> TrialResult:
        if not result.ok:
            return result
        higher = {t: (spec_higher[t] if spec_higher[t] is not None else
                      (result.sample or {}).get("higher_is_better", {}).get(t, True)) for t in weights}
        value = estimated_quality(anchors.estimates(result.per_doc, trial.genome), weights, higher)
        return dataclasses.replace(result, quality=value)

    def line(trial: Trial, result: TrialResult) -> dict[str, Any]:
        entry = {**record(trial, result), "anchors": anchors.digest(), "fitted_on": list(anchors.fitted_on),
                 "anchor_documents": anchors.documents()}
        if result.ok:
            entry["estimate"] = {"quality": estimated(trial, result).quality, "anchor_quality": result.quality,
                                 "method": anchors.method, "cost": anchors.cost()}
            if anchors.model is not None:
                entry["estimate"]["model"] = anchors.model.describe()
        return entry

    raw = evaluate(pool, cheap, run.finished(ESTIMATE), run, generation, line=line, file=ESTIMATE)
    guessed = {trial.id: estimated(trial, raw[trial.id]) for trial in candidates}
    chosen = promoted(candidates, guessed, settings.promote)
    for trial in cheap:
        if trial.id not in chosen and trial.id not in journal:
            entry = line(trial, raw[trial.id])
            if raw[trial.id].ok:
                entry.update(state=TrialState.PRUNED.value, quality=entry["estimate"]["quality"])
            run.append(entry, JOURNAL)
    climbing = [trial for trial in candidates if trial.id in chosen]

    def full(trial: Trial, result: TrialResult) -> dict[str, Any]:
        entry = full_line(trial, result, eval_config.limit, None, None)
        entry["estimate"] = {"quality": guessed[trial.id].quality, "anchors": anchors.digest(),
                             "method": anchors.method}
        return entry

    measured = evaluate(pool, climbing, journal, run, generation, line=full)
    losses = fitness([guessed[trial.id] for trial in candidates], [measured.get(trial.id) for trial in candidates],
                     generation)
    return losses, [measured.get(trial.id) or guessed[trial.id] for trial in candidates]
