"""eval.estimate (evomerge/estimate.py): anchors, estimates, the journal, resume.

The loop is the real one; the pool is a deterministic fake with per-document results (a document is
right when the trial's fake ability, plus a per-(trial, document) wobble, beats its difficulty), and
scores exactly the documents a trial names."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evomerge import estimate
from evomerge.config import validate
from evomerge.errors import ConfigError, EvalError
from evomerge.genome import GenomeLayout
from evomerge.run_dir import RunDir, canonical
from evomerge.samples import encode, sample_of
from evomerge.search import run_loop
from evomerge.trial import TrialResult, TrialState

from fakes import FakePool, make_config

BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0)}
DOCS = 100
DIFFICULTY = np.random.default_rng(7).random(DOCS) * 1.2 - 0.3  # fixed per document


def estimate_config(generations: int = 4, anchors=10, promote: float = 0.34, **more):
    raw = make_config("cma", generations).to_yaml_dict()
    raw["eval"].update(limit=DOCS, estimate={"anchors": anchors, "promote": promote, **more})
    return validate(raw)


class DocPool(FakePool):
    """FakePool with per-document 0/1 results; a trial with `documents` is scored on those only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.scored: list[tuple[int, int]] = []  # (trial, documents scored)

    def result(self, trial) -> TrialResult:
        base = super().result(trial)
        if not base.ok:
            return base
        wobble = 0.15 * np.sin(13.0 * trial.id + 7.1 * np.arange(DOCS))
        values = (base.quality + wobble > DIFFICULTY).astype(float)
        docs = list(range(DOCS)) if trial.documents is None else list(dict(trial.documents)["t"])
        kept = values[docs]
        self.scored.append((trial.id, len(docs)))
        return TrialResult(trial.id, TrialState.COMPLETE, quality=float(kept.mean()), metrics={"t": float(kept.mean())},
                           flops=base.flops, seconds=base.seconds, worker="fake",
                           sample=sample_of(DOCS, {"t": [(d, str(d)) for d in docs]}),
                           per_doc={"t": encode(kept.tolist())})


def start(tmp_path: Path, config, name: str = "run") -> tuple[RunDir, GenomeLayout]:
    layout = GenomeLayout.build("task_arithmetic", "layer", 3, 2, BOUNDS)
    return RunDir.create(tmp_path / name, config, layout.describe()), layout


# -- the estimator ---------------------------------------------------------------------------------

def _models(count: int = 8, docs: int = 60, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ability, difficulty = rng.normal(size=count), rng.normal(size=docs)
    return (rng.random((count, docs)) < 1 / (1 + np.exp(-(ability[:, None] - difficulty[None])))).astype(float)


def test_anchors_are_deterministic_and_weights_sum_to_one() -> None:
    values = _models()
    first, again = estimate.fit({"t": values}, 6), estimate.fit({"t": values.copy()}, 6)
    assert first == again
    anchors = first.tasks["t"]
    assert len(anchors.documents) == 6 and list(anchors.documents) == sorted(set(anchors.documents))
    assert math.isclose(sum(anchors.weights), 1.0)
    assert estimate.fit({"t": values}, 0.1).tasks["t"].documents.__len__() == 6  # a fraction of 60


@pytest.mark.parametrize("method", ["anchors", "gp-irt"])
def test_estimate_is_exact_when_every_document_is_an_anchor(method: str) -> None:
    values = _models(docs=20)
    fitted = estimate.fit({"t": values}, 20, method=method)
    assert fitted.tasks["t"].documents == tuple(range(20))
    for row in _models(count=3, docs=20, seed=9):
        assert math.isclose(fitted.tasks["t"].estimate(list(row)), row.mean(), abs_tol=1e-12)


def test_gp_irt_mixes_anchor_mean_and_irt_by_lambda() -> None:
    values = _models(count=12, docs=80)
    plain = estimate.fit({"t": values}, 8, method="anchors").tasks["t"]
    irt_only = estimate.fit({"t": values}, 8, method="gp-irt", mix=0.0).tasks["t"]
    half = estimate.fit({"t": values}, 8, method="gp-irt", mix=0.5).tasks["t"]
    y = values[3, list(plain.documents)].tolist()
    a, b = plain.estimate(y), irt_only.estimate(y)
    assert a != b
    assert math.isclose(half.estimate(y), 0.5 * a + 0.5 * b)
    # the IRT part keeps the observed anchors as they are: (observed + predicted others) / n
    predicted = estimate.irt_mean(np.array(y), list(plain.documents), np.array(irt_only.discrimination),
                                  np.array(irt_only.easiness))
    assert math.isclose(b, predicted)
    chosen = estimate.fit({"t": values}, 8).tasks["t"].mix
    assert chosen in estimate.MIX_GRID


def test_irt_ranks_models_by_ability() -> None:
    values = _models(count=10, docs=200)
    _, _, theta = estimate.fit_irt(values)
    assert estimate.kendall(list(theta), list(values.mean(axis=1))) > 0.8


def _near_duplicates(count: int, docs: int = 120, seed: int = 3, genes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Candidates near one point of a genome box whose right answers follow the genome: document j is
    right when a fixed linear score of the genome beats its threshold (near-duplicates differ on the few
    documents whose threshold lies between them)."""
    rng = np.random.default_rng(seed)
    direction, threshold = rng.normal(size=(docs, genes)), rng.normal(scale=0.4, size=docs)
    genomes = np.clip(0.5 + 0.15 * rng.standard_normal((count, genes)), 0, 1)
    return genomes, ((genomes - 0.5) @ direction.T > threshold).astype(float)


def test_genome_model_is_deterministic_and_exact_on_every_document() -> None:
    genomes, values = _near_duplicates(30)
    fitted, again = (estimate.fit_genome({"t": values[:20]}, list(genomes[:20]), list(genomes[20:]), 12)
                     for _ in range(2))
    assert fitted == again and fitted.method == "genome" and fitted.model.describe() == again.model.describe()
    documents = fitted.tasks["t"].documents
    assert len(documents) == 12 and list(documents) == sorted(set(documents))
    row = values[25]
    found = fitted.estimates({"t": encode(row[list(documents)].tolist())}, genomes[25])["t"]
    assert found == again.estimates({"t": encode(row[list(documents)].tolist())}, genomes[25])["t"]
    every = estimate.fit_genome({"t": values[:20]}, list(genomes[:20]), list(genomes[20:]), 120)
    assert every.tasks["t"].documents == tuple(range(120))
    assert math.isclose(every.estimates({"t": encode(row.tolist())}, genomes[25])["t"], row.mean(), abs_tol=1e-12)
    with pytest.raises(EvalError, match="genome"):
        fitted.estimates({"t": encode(row[list(documents)].tolist())})


def test_genome_model_keeps_a_metric_beyond_one_in_its_range_without_a_logit_shift() -> None:
    genomes, values = _near_duplicates(30)
    scaled = 5.0 * values  # a per-document metric on 0..5
    fitted = estimate.fit_genome({"t": scaled[:20]}, list(genomes[:20]), list(genomes[20:]), 12)
    assert fitted.model.shift == 0.0 and (fitted.model.low, fitted.model.high) == (0.0, 5.0)
    docs = list(fitted.tasks["t"].documents)
    found = [fitted.estimates({"t": encode(row[docs].tolist())}, g)["t"] for row, g in zip(scaled[20:], genomes[20:])]
    plain = estimate.fit_genome({"t": values[:20]}, list(genomes[:20]), list(genomes[20:]), 12)
    assert plain.model.high == 1.0 and all(0.0 <= f <= 5.0 for f in found) and max(found) > 1.0


def test_genome_model_ranks_near_duplicates_better_than_the_documents_alone() -> None:
    genomes, values = _near_duplicates(70)
    fitted_on, ranked = slice(0, 30), slice(30, 70)
    full = values[ranked].mean(axis=1)
    genome = estimate.fit_genome({"t": values[fitted_on]}, list(genomes[fitted_on]), list(genomes[ranked]), 12)
    docs = list(genome.tasks["t"].documents)
    ours = [genome.estimates({"t": encode(row[docs].tolist())}, g)["t"]
            for row, g in zip(values[ranked], genomes[ranked])]
    irt = estimate.fit({"t": values[fitted_on]}, 12)
    theirs = [irt.tasks["t"].estimate(row[list(irt.tasks["t"].documents)].tolist()) for row in values[ranked]]
    first = values[ranked][:, :12].mean(axis=1)
    assert estimate.spearman(ours, list(full)) > max(estimate.spearman(theirs, list(full)),
                                                     estimate.spearman(list(first), list(full))) + 0.1
    # the anchors are where the fitted candidates disagree, not where every one answers alike
    assert all(0 < values[fitted_on][:, d].mean() < 1 for d in docs)


def test_genome_model_with_anchor_only_candidates_is_the_gp_on_each_documents_observers() -> None:
    genomes, values = _near_duplicates(40)
    fitted, partial, ranked = slice(0, 12), range(12, 30), slice(30, 40)
    seen = [sorted({(5 * i + 3 * j) % 60 for j in range(15)}) for i in range(len(partial))]  # docs 60+: unseen
    anchors_only = [(genomes[i], {"t": (docs, values[i, docs].tolist())}) for i, docs in zip(partial, seen)]
    plain = estimate.fit_genome({"t": values[fitted]}, list(genomes[fitted]), list(genomes[ranked]), 12)
    more = estimate.fit_genome({"t": values[fitted]}, list(genomes[fitted]), list(genomes[ranked]), 12,
                               partial=anchors_only)
    same = ("fitted", "scale", "noise")  # chosen on the fully evaluated candidates only
    assert more.model.partial == 18 and all(more.model.describe()[k] == plain.model.describe()[k] for k in same)
    again = estimate.fit_genome({"t": values[fitted]}, list(genomes[fitted]), list(genomes[ranked]), 12,
                                partial=anchors_only)
    assert np.array_equal(again.model.coefficients, more.model.coefficients)
    model, target = more.model, genomes[35]
    unseen = sorted(set(range(120)) - {d for docs in seen for d in docs})
    assert unseen and np.allclose(model.predict(target)[unseen], plain.model.predict(target)[unseen])
    # a document some anchor-only candidates saw: the GP posterior mean on exactly its observers
    doc = seen[0][0]
    rows = list(range(12)) + [12 + i for i, docs in enumerate(seen) if doc in docs]
    x, y = genomes[rows], values[rows, doc] - values[fitted, doc].mean()
    k = np.exp(-((x[:, None] - x[None]) ** 2).sum(axis=2) / (2 * model.scale ** 2))
    k_star = np.exp(-((target - x) ** 2).sum(axis=1) / (2 * model.scale ** 2))
    exact = values[fitted, doc].mean() + k_star @ np.linalg.solve(k + model.noise * np.eye(len(rows)), y)
    assert math.isclose(model.predict(target)[doc], min(max(exact, 0.0), 1.0), abs_tol=1e-9)
    assert not np.allclose(model.predict(target)[seen[0]], plain.model.predict(target)[seen[0]])


def test_run_anchors_fall_back_to_gp_irt_until_three_candidates_are_fitted() -> None:
    config = estimate_config()
    genomes, values = _near_duplicates(8, docs=DOCS)

    def line(trial: int, label, genome, row) -> dict:
        return {"trial": trial, "generation": 0 if label else 1, "label": label, "state": "complete",
                "genome": None if genome is None else list(genome), "per_doc": {"t": encode(row.tolist())},
                "sample": {"limit": DOCS}}

    references = [line(i, f"ref{i}", None, values[i]) for i in range(3)]
    fitted = [line(10 + i, None, genomes[3 + i], values[3 + i]) for i in range(3)]
    candidates = [tuple(g) for g in genomes[6:]]
    early = estimate.run_anchors(config.eval, references + fitted[:2], 2, 0, candidates)
    later = estimate.run_anchors(config.eval, references + fitted, 2, 0, candidates)
    assert early.method == "gp-irt" and early.fitted_on == (0, 1, 2, 10, 11)
    assert later.method == "genome" and later.fitted_on == (10, 11, 12)


def test_weighted_quality_from_per_task_estimates() -> None:
    value = estimate.estimated_quality({"a": 0.5, "b": 0.2}, {"a": 1.0, "b": 3.0}, {"a": True, "b": False})
    assert math.isclose(value, (0.5 - 3 * 0.2) / 4)


def test_kendall() -> None:
    assert estimate.kendall([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert estimate.kendall([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert estimate.kendall([1, 2], [1, 2]) is None


@pytest.mark.parametrize("eval_extra, message", [
    ({"subsample": {}, "estimate": {}}, "eval: subsample and estimate: give one of them"),
    ({"estimate": {"anchors": 2.5}}, "eval.estimate.anchors: expected a whole number of documents"),
    ({"estimate": {"method": "mp-irt"}}, "eval.estimate.method"),
])
def test_bad_estimate_config_is_one_line(eval_extra, message) -> None:
    raw = make_config().to_yaml_dict()
    raw["eval"].update(limit=100, **eval_extra)
    with pytest.raises(ConfigError) as error:
        validate(raw)
    assert message in str(error.value) and "\n" not in str(error.value)


# -- through the real loop ----------------------------------------------------------------------------

def test_estimate_run_scores_anchors_promotes_and_ranks_measured_only(tmp_path: Path) -> None:
    config = estimate_config()
    run, layout = start(tmp_path, config)
    pool = DocPool()
    summary = run_loop(run, config, layout, pool)
    records = run.records()
    references = [r for r in records if r["label"] is not None]
    assert references and all(r["state"] == "complete" and r["sample"]["documents"] == {"t": DOCS}
                              for r in references)
    pruned = [r for r in records if r["state"] == "pruned"]
    complete = [r for r in records if r["state"] == "complete" and r["label"] is None]
    assert pruned and complete
    assert all("estimate" in r and r["quality"] == r["estimate"]["quality"] for r in pruned)
    assert all(r["estimate"]["quality"] is not None and r["sample"]["documents"] == {"t": DOCS} for r in complete)
    per_generation = {}
    for r in complete:
        per_generation[r["generation"]] = per_generation.get(r["generation"], 0) + 1
    assert set(per_generation.values()) == {math.ceil(0.34 * 6)}
    # every candidate first on the 10 anchors; the promoted ones again on all documents
    anchor_runs = [n for _, n in pool.scored if n < DOCS]
    assert len(anchor_runs) == 6 * 4 and set(anchor_runs) == {10}
    assert summary["best"]["trial"] in {r["trial"] for r in complete + references}
    assert summary["estimate"]["pairs"] == len(complete)
    assert summary["estimate"]["spearman"] is not None and summary["estimate"]["mae"] is not None
    lines = run.records(estimate.ESTIMATE)
    assert len(lines) == 24 and len({tuple(line["fitted_on"]) for line in lines}) == 4  # refit each generation
    # the genome model once three candidates are fully evaluated (after generation 0), gp-irt before
    methods = {line["generation"]: line["estimate"]["method"] for line in lines}
    assert methods == {0: "gp-irt", 1: "genome", 2: "genome", 3: "genome"}
    # each anchor result names its documents; the genome model also learns from the earlier pruned ones
    assert all(sorted(line["anchor_documents"]) == ["t"] and len(line["anchor_documents"]["t"]) == 10
               for line in lines)
    partial = {line["generation"]: line["estimate"]["model"]["partial"] for line in lines
               if "model" in line["estimate"]}
    assert partial == {1: 3, 2: 6, 3: 9}
    assert all(r["estimate"]["method"] == methods[r["generation"]] for r in complete)


def test_without_refit_the_anchors_stay(tmp_path: Path) -> None:
    config = estimate_config(generations=3, refit=False)
    run, layout = start(tmp_path, config)
    run_loop(run, config, layout, DocPool())
    assert len({line["anchors"] for line in run.records(estimate.ESTIMATE)}) == 1


def test_seeded_estimate_run_repeats(tmp_path: Path) -> None:
    config = estimate_config(generations=3)
    runs = []
    for name in ("a", "b"):
        run, layout = start(tmp_path, config, name)
        run_loop(run, config, layout, DocPool())
        runs.append((canonical(run.records()), canonical(run.records(estimate.ESTIMATE))))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("stop_after", [3, 10, 18])
def test_resume_mid_generation_equals_uninterrupted(tmp_path: Path, stop_after: int) -> None:
    config = estimate_config(generations=3)
    run, layout = start(tmp_path, config, "whole")
    run_loop(run, config, layout, DocPool())
    expected, expected_anchor = canonical(run.records()), canonical(run.records(estimate.ESTIMATE))
    run, layout = start(tmp_path, config, "cut")
    with pytest.raises(KeyboardInterrupt):
        run_loop(run, config, layout, DocPool(stop_after=stop_after))
    run_loop(RunDir.open(run.path), config, layout, DocPool())
    assert canonical(run.records()) == expected
    assert canonical(run.records(estimate.ESTIMATE)) == expected_anchor
