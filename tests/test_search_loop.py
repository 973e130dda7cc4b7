"""The search loop with a fake pool: fast checks of the driver (the real path is in test_integration)."""

import json
from pathlib import Path

import pytest

from evomerge.config import validate
from evomerge.errors import EvalError
from evomerge.genome import GenomeLayout
from evomerge.report import summarize
from evomerge.run_dir import RunDir, canonical
from evomerge.search import run_loop

from fakes import FakePool, make_config

BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0)}


def start(tmp_path: Path, config, name: str = "run") -> tuple[RunDir, GenomeLayout]:
    layout = GenomeLayout.build("task_arithmetic", "layer", 3, 2, BOUNDS)
    return RunDir.create(tmp_path / name, config, layout.describe()), layout


@pytest.mark.parametrize("strategy", ["cma", "random", "nsga2", "tpe"])
def test_same_seed_same_journal(tmp_path: Path, strategy: str) -> None:
    journals = []
    for name in ("a", "b"):
        run, layout = start(tmp_path, make_config(strategy), name)
        pool = FakePool()
        run_loop(run, make_config(strategy), layout, pool)
        assert pool.closed
        journals.append(canonical(run.records()))
    assert journals[0] == journals[1]
    assert len(journals[0]) == 4 + 4 * 6  # references + 4 generations of 6


def test_tradeoffs_share_each_generation(tmp_path: Path) -> None:
    """Two trade-offs: one CMA-ES each, both populations evaluated in every generation."""
    config = make_config(generations=3, tradeoffs=[0.0, 0.2])
    run, layout = start(tmp_path, config)
    summary = run_loop(run, config, layout, FakePool())
    assert [g["trials"] for g in summary["generations"]] == [4 + 12, 12, 12]
    assert summary["pareto"] and summary["hypervolume"] > 0


def test_cma_improves_on_the_references(tmp_path: Path) -> None:
    config = make_config(generations=12)
    run, layout = start(tmp_path, config)
    summary = run_loop(run, config, layout, FakePool())
    references = {r["label"]: r["quality"] for r in summary["references"]}
    assert set(references) == {"base", "expert:0", "expert:1", "uniform"}
    assert summary["best_evolved"]["quality"] > max(references.values())
    progress = [g["best_so_far"] for g in summary["generations"]]
    assert progress == sorted(progress) and progress[-1] > progress[0]


def test_failed_candidates_are_data(tmp_path: Path) -> None:
    config = make_config()
    run, layout = start(tmp_path, config)
    summary = run_loop(run, config, layout, FakePool(fail_above=0.55))
    failed = [r for r in run.records() if r["state"] == "failed"]
    assert failed and all(r["error"] == "ValueError: injected" for r in failed)
    assert summary["failed"] == len(failed) and summary["trials"] == 4 + 4 * 6


def test_every_candidate_failing_stops_the_run(tmp_path: Path) -> None:
    config = make_config()
    run, layout = start(tmp_path, config)
    with pytest.raises(EvalError, match="every candidate of generation 0 failed .*injected"):
        run_loop(run, config, layout, FakePool(fail_above=-1.0))
    assert len(run.records()) == 4 + 6  # nothing lost: references and failures are journaled


@pytest.mark.parametrize("subsample, steady", [(False, False), (True, False), (False, True)])
def test_a_run_stopped_by_an_all_failed_generation_resumes_once_fixed(tmp_path: Path, subsample: bool,
                                                                      steady: bool) -> None:
    """The failed generation runs again at resume (its failed trials only, and with steady
    dispatch the next generation's that failed meanwhile), and the run then ends with the journal
    of a run that never failed."""
    config = make_config("tpe" if steady else "cma", generations=3)
    if subsample:
        raw = config.to_yaml_dict()
        raw["eval"].update(limit=100, subsample={"fraction": 0.25, "promote": 0.5})
        config = validate(raw)
    run, layout = start(tmp_path, config, "straight")
    run_loop(run, config, layout, FakePool(backfill=steady))
    expected = canonical(run.records())

    run, layout = start(tmp_path, config)
    with pytest.raises(EvalError, match="every candidate of generation 0 failed"):
        run_loop(run, config, layout, FakePool(fail_above=-1.0, backfill=steady))
    failed = {r["trial"] for r in run.records() if r["state"] == "failed"}
    assert len(failed) == 6 + (3 if steady else 0)  # steady: half of generation 1 failed too
    fixed = FakePool(backfill=steady)
    summary = run_loop(RunDir.open(run.path), config, layout, fixed)
    assert canonical(run.records()) == expected and summary["failed"] == 0
    assert failed <= set(fixed.evaluated)  # evaluated again
    assert not {r["trial"] for r in expected if r["label"]} & set(fixed.evaluated)  # references were not
    assert len(run.lines()) == len(run.records()) + len(failed)  # the failed lines stay, superseded


@pytest.mark.parametrize("strategy, search", [("cma", {}), ("nsga2", {}), ("tpe", {}),
                                              ("cma", {"tradeoffs": [0.0, 0.3]})])
def test_resume_after_interrupt_equals_uninterrupted(tmp_path: Path, strategy: str, search: dict) -> None:
    config = make_config(strategy, generations=5, **search)
    run, layout = start(tmp_path, config, "straight")
    run_loop(run, config, layout, FakePool())
    expected = canonical(run.records())

    run, layout = start(tmp_path, config, "interrupted")
    stop_after = 4 + 6 * len(search.get("tradeoffs", [0])) + 5  # mid generation 1
    first = FakePool(stop_after=stop_after)
    with pytest.raises(KeyboardInterrupt):
        run_loop(run, config, layout, first)
    assert first.closed and len(run.records()) == stop_after
    second = FakePool()
    run_loop(RunDir.open(run.path), config, layout, second)
    assert canonical(run.records()) == expected
    assert not set(first.evaluated) & set(second.evaluated)  # nothing evaluated twice


@pytest.mark.parametrize("strategy", ["random", "nsga2", "tpe"])
def test_steady_dispatch_journal_does_not_depend_on_timing(tmp_path: Path, strategy: str) -> None:
    """A pool that finishes half the next generation while one runs journals what a pool that
    starts nothing early does: the strategy sees the same asks and tells in the same order."""
    journals = []
    for name, backfill in (("early", True), ("late", False)):
        config = make_config(strategy, generations=4)
        run, layout = start(tmp_path, config, name)
        pool = FakePool(backfill=backfill)
        run_loop(run, config, layout, pool)
        journals.append(canonical(run.records()))
        generations = [next(r["generation"] for r in journals[-1] if r["trial"] == i) for i in pool.evaluated]
        assert (generations != sorted(generations)) == backfill  # early: generation g + 1 began before g ended
    assert journals[0] == journals[1] and len(journals[0]) == 4 + 4 * 6
    assert len(run.lines()) == len(run.records())  # nothing evaluated twice


def test_steady_dispatch_asks_before_telling(tmp_path: Path) -> None:
    """Random search draws the same genomes either way; TPE, asked for generation g + 1 before g
    is told, learns one generation later than with `dispatch: generation`."""
    genomes = {}
    for strategy in ("random", "tpe"):
        for dispatch in ("steady", "generation"):
            config = make_config(strategy, generations=4, dispatch=dispatch)
            run, layout = start(tmp_path, config, f"{strategy}-{dispatch}")
            run_loop(run, config, layout, FakePool(backfill=True))
            genomes[strategy, dispatch] = [r["genome"] for r in canonical(run.records())]
    assert genomes["random", "steady"] == genomes["random", "generation"]
    assert genomes["tpe", "steady"] != genomes["tpe", "generation"]
    assert genomes["tpe", "steady"][:4 + 6] == genomes["tpe", "generation"][:4 + 6]  # the same first generation


@pytest.mark.parametrize("strategy", ["nsga2", "tpe"])
@pytest.mark.parametrize("stop_after", [4 + 5, 4 + 6 + 3 + 1])  # mid generation 0 / after gen 1 began early
def test_steady_resume_after_interrupt_equals_uninterrupted(tmp_path: Path, strategy: str, stop_after: int) -> None:
    config = make_config(strategy, generations=5)
    run, layout = start(tmp_path, config, "straight")
    run_loop(run, config, layout, FakePool(backfill=True))
    expected = canonical(run.records())

    run, layout = start(tmp_path, config, "interrupted")
    first = FakePool(stop_after=stop_after, backfill=True)
    with pytest.raises(KeyboardInterrupt):
        run_loop(run, config, layout, first)
    assert len(run.records()) == stop_after
    second = FakePool(backfill=True)
    run_loop(RunDir.open(run.path), config, layout, second)
    assert canonical(run.records()) == expected
    assert not set(first.evaluated) & set(second.evaluated)


def test_steady_resume_with_more_generations_equals_a_longer_run(tmp_path: Path) -> None:
    """The last generation's ask-ahead is checkpointed: extending the budget at resume continues
    with the genomes a longer run would have evaluated."""
    config = make_config("tpe", generations=5)
    run, layout = start(tmp_path, config, "long")
    run_loop(run, config, layout, FakePool(backfill=True))
    expected = canonical(run.records())

    short = make_config("tpe", generations=3)
    run, layout = start(tmp_path, short, "short")
    run_loop(run, short, layout, FakePool(backfill=True))
    assert RunDir.open(run.path).load_checkpoint().ahead is not None
    run_loop(RunDir.open(run.path), config, layout, FakePool(backfill=True))
    assert canonical(run.records()) == expected


def test_truncated_journal_line_is_tolerated(tmp_path: Path) -> None:
    """A crash mid-append leaves a torn last line: reading skips it, and resuming cuts it, evaluates
    its trial again and ends with the journal and summary of a run that never crashed."""
    config = make_config(generations=2)
    run, layout = start(tmp_path, config, "straight")
    run_loop(run, config, layout, FakePool())
    expected = canonical(run.records())
    lines = {json.loads(line)["trial"]: line for line in (run.path / "journal.jsonl").read_text().splitlines()}

    run, layout = start(tmp_path, config, "torn")
    first = FakePool(stop_after=4 + 3)  # trials 9 .. 3 of generation 0 (the pool finishes them in reverse)
    with pytest.raises(KeyboardInterrupt):
        run_loop(run, config, layout, first)
    torn = 2  # the next to finish: the crash cut its line in half
    with open(run.path / "journal.jsonl", "a") as handle:
        handle.write(lines[torn][: len(lines[torn]) // 2])
    assert len(run.records()) == 4 + 3 and torn not in {r["trial"] for r in run.records()}
    assert summarize(run.records(), config)["trials"] == 4 + 3

    second = FakePool()
    run_loop(RunDir.open(run.path), config, layout, second)
    assert torn in second.evaluated and not set(first.evaluated) & set(second.evaluated)
    text = (run.path / "journal.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # the torn bytes are gone
    assert canonical(run.records()) == expected
    summary = json.loads((run.path / "summary.json").read_text())  # written by the resumed run
    assert summary["trials"] == 4 + 2 * 6 and summary["best"]["trial"] in {r["trial"] for r in run.records()}


def test_lock_refuses_a_live_driver_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    import os
    import subprocess

    from evomerge.errors import ResumeError

    run, _ = start(tmp_path, make_config())
    live = subprocess.Popen(["sleep", "30"])
    try:
        (run.path / "driver.lock").write_text(str(live.pid))
        with pytest.raises(ResumeError, match=f"another driver \\(pid {live.pid}\\)"):
            run.lock()
        assert (run.path / "driver.lock").read_text() == str(live.pid)  # left to its owner
    finally:
        live.kill()
        live.wait()
    (run.path / "driver.lock").write_text(str(live.pid))  # now a dead driver's lock
    run.lock()
    assert (run.path / "driver.lock").read_text() == str(os.getpid())
    run.unlock()
    assert not (run.path / "driver.lock").exists()


def test_resume_config_changes(tmp_path: Path) -> None:
    from evomerge.errors import ResumeError

    run, _ = start(tmp_path, make_config())
    assert run.update_config(["search.generations=9", "workers.count=3"]).search.generations == 9
    assert run.config().workers.count == 3
    with pytest.raises(ResumeError, match="changing merge.method, seed would invalidate"):
        run.update_config(["seed=5", "merge.method=ties"])
    assert run.update_config(["seed=5"], force=True).seed == 5
