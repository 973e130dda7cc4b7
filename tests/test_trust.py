"""Issue 19: results a user can trust. One sample per comparison, standard errors and the paired test,
sources in view (report, log, export), task weights; fast checks on journal records, then the CLI on
a real run (Ray, lm-eval, the quick zoo)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from evomerge import samples
from evomerge.cli import main
from evomerge.report import draws_front, flat_cost, format_markdown, format_text, summarize
from evomerge.run_dir import RunDir
from tests.conftest import write_config
from tests.fakes import make_config


def line(trial: int, quality: float, per_doc: str, label: str | None = None, limit: int = 30,
         generation: int = 0, flops: float = 1e6, hash_: str | None = None) -> dict:
    """A journal record scored on task `t` (make_config's one task) with per-document 0/1 results."""
    values = samples.decode(per_doc)
    return {"trial": trial, "generation": generation, "stage": "ps", "label": label, "genome": None,
            "recipe": {"label": label}, "state": "complete", "quality": quality, "metrics": {"t": quality},
            "flops": flops, "served": {}, "error": None, "per_doc": {"t": per_doc},
            "stderr": {"t": samples.stderr(values), "quality": samples.stderr(values)},
            "sample": {"limit": limit, "documents": {"t": len(values)}, "hash": hash_ or f"h{limit}",
                       "higher_is_better": {"t": True}}}


def docs(right: int, total: int = 100) -> str:
    return "1" * right + "0" * (total - right)


def test_stderr_is_lm_evals() -> None:
    from lm_eval.api.metrics import mean_stderr

    values = samples.decode("1101001110")
    assert samples.stderr(values) == pytest.approx(mean_stderr(values))
    # the weighted quality's: sqrt(sum (w/W)^2 se^2)
    assert samples.quality_stderr({"a": 0.1, "b": 0.2}, {"a": 1, "b": 3}) == pytest.approx(
        math.sqrt((0.25 * 0.1) ** 2 + (0.75 * 0.2) ** 2))
    assert samples.quality_stderr({"a": None, "b": 0.2}, {"a": 1, "b": 1}) is None


def test_paired_test_tells_a_gain_from_noise() -> None:
    source = line(1, 0.58, docs(58), label="expert:0")
    # the same documents right, plus two more: +0.02, well inside the noise
    close = line(9, 0.60, docs(60))
    test = samples.paired_test(close, source, {"t": 1.0}, {"t": 1.0})
    assert test["delta"] == pytest.approx(0.02) and not test["significant"] and test["p_value"] > 0.05
    assert "does not beat it by more than the noise" in samples.significance_line(test)
    far = line(9, 0.90, docs(90))
    test = samples.paired_test(far, source, {"t": 1.0}, {"t": 1.0})
    assert test["significant"] and test["interval"][0] > 0 and test["p_value"] < 0.01
    assert "beats it by more than the noise" in samples.significance_line(test)
    # paired: the same accuracy on other documents is no gain, and the paired s.e. sees that
    swapped = line(9, 0.58, "0" * 42 + "1" * 58)
    assert samples.paired_test(swapped, source, {"t": 1.0}, {"t": 1.0})["delta"] == pytest.approx(0.0)
    # other documents: no test
    assert samples.paired_test(line(9, 0.9, docs(90, 50), limit=50), source, {"t": 1.0}, {"t": 1.0}) is None


def test_best_front_and_hypervolume_compare_one_sample() -> None:
    """Generation 1 scored on 10 documents after generation 0 on 30 (a forced eval.limit change):
    the old trials are counted and named, never ranked against the new ones."""
    config = make_config()
    old = [line(0, 0.40, docs(12, 30), "base"), line(1, 0.70, docs(21, 30), "expert:0"),
           line(2, 0.95, docs(28, 30), flops=2e6)]
    new = [line(0, 0.30, docs(3, 10), "base", limit=10), line(1, 0.50, docs(5, 10), "expert:0", limit=10),
           line(3, 0.60, docs(6, 10), limit=10, generation=1), line(4, 0.90, docs(9, 10), limit=10, generation=1)]
    records = list({r["trial"]: r for r in old + new}.values())  # the re-scored references supersede
    summary = summarize(records, config)
    assert summary["best"]["trial"] == 4 and summary["best_evolved"]["trial"] == 4
    assert summary["other_sample"] == {"trials": 1, "limits": ["30"]}
    assert {e["trial"] for e in summary["pareto"]} <= {0, 1, 3, 4}
    assert summary["sample"]["limit"] == 10
    text = format_text(summary)
    assert "1 trials scored on other documents (limit 30) are left out" in text
    # the old trial 2 alone would have been best: mixing samples is what the summary refuses
    assert summarize(old, config)["best"]["trial"] == 2


def test_old_journal_without_samples_still_reports() -> None:
    config = make_config()
    records = [line(0, 0.4, docs(40), "base"), line(5, 0.6, docs(60))]
    for r in records:
        for name in ("sample", "stderr", "per_doc"):
            del r[name]
    summary = summarize(records, config)
    assert summary["best"]["trial"] == 5 and "other_sample" not in summary
    assert "Significance: not tested" in format_text(summary)
    assert "Significance: not tested" in format_markdown(summary)


def test_report_shows_errors_weights_and_the_best_source() -> None:
    config = make_config()
    summary = summarize([line(0, 0.58, docs(58), "expert:0"), line(7, 0.60, docs(60), generation=1)], config)
    text, page = format_text(summary), format_markdown(summary)
    assert "0.6000 ± 0.0492" in page and "±0.0492" in text  # sqrt(0.6 * 0.4 / 99)
    assert "Task weights (quality is their weighted mean): t 1." in page
    assert "Significance: best evolved trial 7 vs best reference expert:0 (trial 0): +0.0200" in page
    assert summary["generations"][-1]["best_reference"] == 0.58  # the best source stays in view


def test_flat_costs_are_no_front() -> None:
    assert flat_cost([{"flops": 1.8979e7}, {"flops": 1.9020e7}])
    assert not flat_cost([{"flops": 1.5e7}, {"flops": 1.6e7}])


@pytest.mark.slow
def test_cli_one_sample_per_comparison(zoo, ray_cluster, tmp_path, capsys) -> None:
    """search, report, a refused and a forced eval.limit change, export's note on a reference."""
    config = write_config(tmp_path, zoo, eval={"limit": 4}, search={"population": 4, "generations": 1})
    run = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run)]) == 0
    records = RunDir.open(run).records()
    assert all(r["sample"]["limit"] == 4 and set(r["sample"]["documents"].values()) == {4} for r in records)
    assert all(len(r["per_doc"][t]) == 4 for r in records for t in r["per_doc"])
    assert all(r["stderr"]["quality"] is not None for r in records)

    capsys.readouterr()
    assert main(["resume", str(run), "--set", "eval.limit=6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.limit 4 -> 6" in err and "--force" in err

    assert main(["resume", str(run), "--set", "eval.limit=6", "--set", "search.generations=2", "--force"]) == 0
    records = {r["trial"]: r for r in RunDir.open(run).records()}
    assert all(records[i]["sample"]["limit"] == 6 for i in range(5))  # references scored again
    assert all(records[i]["sample"]["limit"] == 4 for i in range(5, 9))  # generation 0's candidates
    assert all(records[i]["sample"]["limit"] == 6 for i in range(9, 13))
    capsys.readouterr()
    assert main(["report", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["other_sample"]["trials"] == 4 and summary["sample"]["limit"] == 6
    assert summary["best"]["trial"] not in range(5, 9)
    assert all(e["trial"] not in range(5, 9) for e in summary["pareto"])
    page = (run / "report.md").read_text()
    assert "left out of the best, the Pareto front and the hypervolume" in page
    assert "Significance:" in page and "Task weights" in page and " ± " in page

    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    best = summary["best"]
    if best["label"] is not None:  # on the quick zoo nearly every trial scores 0: the base (trial 0) wins ties
        evolved = summary["best_evolved"]["trial"]
        assert f"note: trial {best['trial']} is the reference {best['label']}" in out
        assert f"--trial {evolved}" in out
    else:
        assert "note:" not in out


def test_generation_line_names_the_best_source() -> None:
    from evomerge.search import generation_line

    summary = summarize([line(0, 0.70, docs(70), "expert:0"), line(5, 0.60, docs(60))], make_config())
    assert generation_line(summary) == ("generation 0: best evolved 0.6000 (so far 0.6000), best source 0.7000 "
                                        "(expert:0, trial 0), 0 failed")


def test_records_round_trip(tmp_path: Path) -> None:
    from evomerge.genome import Recipe
    from evomerge.trial import Trial, TrialResult, TrialState, record, result_from_record

    result = TrialResult(3, TrialState.COMPLETE, quality=0.5, metrics={"t": 0.5}, sample={"limit": 4, "hash": "x"},
                         stderr={"t": 0.1, "quality": 0.1}, per_doc={"t": "0101"})
    recipe = Recipe(method="linear", granularity="global", num_layers=1, params={"all": {"weight": [1.0]}})
    back = result_from_record(json.loads(json.dumps(record(Trial(3, 0, recipe), result))))
    assert back == result
    bare = record(Trial(3, 0, recipe), TrialResult(3, TrialState.FAILED, error="x"))
    assert "sample" not in bare and "per_doc" not in bare  # failed lines read as before


def test_each_trial_logs_progress_with_the_live_best(tmp_path, caplog) -> None:
    from evomerge.genome import GenomeLayout
    from evomerge.search import run_loop
    from tests.crash_driver import BOUNDS
    from tests.fakes import FakePool

    config = make_config(generations=2)
    layout = GenomeLayout.build("task_arithmetic", "layer", 3, 2, BOUNDS)
    run = RunDir.create(tmp_path / "run", config, layout.describe())
    with caplog.at_level(logging.INFO, logger="evomerge.search"):
        run_loop(run, config, layout, FakePool())
    done = [r.getMessage() for r in caplog.records if " done (" in r.getMessage()]
    assert len(done) == len(run.records())  # one line per trial, as each result arrives
    best_source = max(r["quality"] for r in run.records() if r["label"] is not None)
    assert done[0].endswith("best source -")  # nothing finished before the first trial
    later = [m for m in done if "of generation 1)" in m]
    assert later and all(m.endswith(f"best source {best_source:.4f}") for m in later)  # the run's, not the generation's
    generation = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation 1:")]
    assert generation and f"best source {best_source:.4f}" in generation[0]


def test_costs_that_differ_little_are_printed_apart() -> None:
    config = make_config()
    records = [line(0, 0.5, docs(50), "base", flops=1.8979e7), line(5, 0.6, docs(60), flops=1.9020e7),
               line(6, 0.55, docs(55), flops=1.8990e7)]
    text = format_text(summarize(records, config))
    assert "1.8979e+07" in text and "1.902e+07" in text and "1.9e+07 " not in text
    assert flat_cost(records)


def test_a_routed_run_draws_its_front_however_flat_its_costs() -> None:
    plain = [line(0, 0.5, docs(50), "base", flops=1.8979e7), line(5, 0.6, docs(60), flops=1.9020e7)]
    assert flat_cost(plain) and not draws_front(plain)
    routed = [*plain, {**line(6, 0.7, docs(70), flops=1.9030e7),
                       "recipe": {"policy": {"kind": "classifier", "members": ["merged", "expert:0"]}}}]
    assert flat_cost(routed) and draws_front(routed)
    assert draws_front([line(0, 0.5, docs(50), "base", flops=1.5e7), line(5, 0.6, docs(60), flops=1.6e7)])


def test_plots_quality_per_trial_when_costs_are_flat(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from evomerge.report import plot

    config = make_config()
    records = [line(0, 0.5, docs(50), "base", flops=1.8979e7), line(5, 0.6, docs(60), flops=1.9020e7)]
    written = plot(summarize(records, config), records, tmp_path)
    assert all(path.stat().st_size > 0 for path in written)


def test_export_names_a_reference_and_offers_the_best_evolved(tmp_path) -> None:
    import argparse

    from evomerge.cli import reference_note
    from evomerge.export import best_evolved, pick_trial

    config = make_config()
    run = RunDir.create(tmp_path / "run", config, [])
    for record in [line(0, 0.4, docs(40), "base"), line(2, 0.7, docs(70), "expert:1"), line(19, 0.65, docs(65)),
                   line(20, 0.6, docs(60))]:
        run.append(record)
    chosen, evolved = pick_trial(run, None), best_evolved(run)
    assert chosen["trial"] == 2 and evolved["trial"] == 19
    note = reference_note(chosen, evolved, argparse.Namespace(run_dir=run.path))
    assert note == (f"note: trial 2 is the reference expert:1 (an unchanged source model), not an evolved candidate; "
                    f"the best evolved trial is 19 (quality 0.6500): evomerge export {run.path} --out DIR --trial 19")
