"""The strategies alone (no search loop): the unit box, seeding, state round trips, and that each
one uses what it is told (loss for all, cost for nsga2 and the trade-off CMA-ES)."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import cma
import numpy as np
import pytest

from evomerge.config import validate
from evomerge.errors import ConfigError, ResumeError
from evomerge.genome import GenomeLayout
from evomerge.run_dir import RunDir
from evomerge.search import costs, losses, run_loop
from evomerge.strategies import make_strategy
from evomerge.trial import TrialResult, TrialState

from conftest import says
from fakes import FakePool, make_config

DIM = 4
KINDS = {"cma": {}, "random": {}, "nsga2": {}, "tpe": {}, "cma-tradeoffs": {"tradeoffs": [0.0, 0.5]}}
OTHER_KINDS = {"cma-3-tradeoffs": {"tradeoffs": [0.0, 0.1, 0.2]}}


def search_config(kind: str, population: int = 6, **extra):
    search = {"strategy": kind.split("-")[0], "population": population, "sigma0": 0.3,
              **{**KINDS, **OTHER_KINDS}[kind], **extra}
    return validate({"models": {"base": "b", "experts": ["e"]}, "eval": {"tasks": [{"name": "t", "metric": "acc"}]},
                     "search": search}).search


def problem(genome: np.ndarray) -> tuple[float, float]:
    """(loss, cost): the loss is lowest at 0.8 in every gene, the cost (FLOPs) doubles per unit of sum."""
    return float(np.sum((genome - 0.8) ** 2)), float(1e6 * 2.0 ** (4.0 * genome.sum()))


def generation(strategy) -> list[np.ndarray]:
    genomes = strategy.ask()
    told = [problem(g) for g in genomes]
    strategy.tell(genomes, [loss for loss, _ in told], [cost for _, cost in told])
    return genomes


@pytest.mark.parametrize("kind", list(KINDS))
def test_genomes_are_in_the_unit_box_and_seeded(kind: str) -> None:
    runs = []
    for seed in (0, 0, 1):
        strategy = make_strategy(search_config(kind), DIM, seed=seed)
        runs.append(np.array([generation(strategy) for _ in range(3)]))
    size = 12 if kind == "cma-tradeoffs" else 6
    assert runs[0].shape == (3, size, DIM)
    assert ((runs[0] >= 0.0) & (runs[0] <= 1.0)).all()
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("kind", list(KINDS))
def test_state_round_trip_draws_what_an_uninterrupted_run_draws(kind: str) -> None:
    straight = make_strategy(search_config(kind), DIM, seed=3)
    for _ in range(3):
        generation(straight)
    state = straight.get_state()
    expected = [generation(straight) for _ in range(3)]

    resumed = make_strategy(search_config(kind), DIM, seed=3)  # fresh, as a resumed driver builds it
    resumed.set_state(state)
    assert np.array_equal(np.array([generation(resumed) for _ in range(3)]), np.array(expected))


@pytest.mark.parametrize("objective", ["loss", "cost"])
def test_nsga2_follows_each_objective(objective: str) -> None:
    """The other objective held equal everywhere: NSGA-II drives the one that varies down (a strategy
    ignoring it stays where random sampling is)."""
    strategy = make_strategy(search_config("nsga2"), DIM, seed=0)
    values = []
    for _ in range(15):
        genomes = strategy.ask()
        told = [problem(g) for g in genomes]
        loss = [t[0] if objective == "loss" else 0.0 for t in told]
        cost = [t[1] if objective == "cost" else 1.0 for t in told]
        strategy.tell(genomes, loss, cost)
        values.append(np.mean(loss if objective == "loss" else [g.sum() for g in genomes]))
    assert np.mean(values[-3:]) < 0.7 * values[0]


def test_tpe_improves_on_its_random_start() -> None:
    strategy = make_strategy(search_config("tpe"), DIM, seed=0)
    best = [min(problem(g)[0] for g in generation(strategy)) for _ in range(10)]
    assert min(best[3:]) < 0.5 * best[0]


def test_each_tradeoff_cma_follows_its_own_weight() -> None:
    """Weight 0 ignores cost and converges on 0.8; weight 1 pays 4 quality per unit of gene sum and goes to 0."""
    strategy = make_strategy(search_config("cma", tradeoffs=[0.0, 1.0]), DIM, seed=0)
    for _ in range(20):
        genomes = generation(strategy)
    quality_only, frugal = np.array(genomes[:6]), np.array(genomes[6:])
    assert quality_only.mean() > 0.65 and frugal.mean() < 0.15


def test_failed_candidates_get_the_worst_loss_and_cost() -> None:
    results = [TrialResult(0, TrialState.COMPLETE, quality=0.5, flops=2e6),
               TrialResult(1, TrialState.FAILED, error="x"),
               TrialResult(2, TrialState.COMPLETE, quality=0.7, flops=3e6),
               TrialResult(3, TrialState.COMPLETE, quality=0.6)]  # no FLOPs recorded
    assert losses(results, 0) == [-0.5, 0.5, -0.7, -0.6]
    assert costs(results) == [2e6, 3e6, 3e6, 3e6]
    assert costs([TrialResult(0, TrialState.COMPLETE, quality=0.5)]) == [0.0]


def test_config_lists_the_strategies_and_keeps_tradeoffs_to_cma() -> None:
    with pytest.raises(ConfigError, match=says("search.strategy", "cma", "random", "nsga2", "tpe")):
        search_config("cma", strategy="cmaes")
    with pytest.raises(ConfigError, match="search.tradeoffs: only strategy cma"):
        search_config("nsga2", tradeoffs=[0.1])
    with pytest.raises(ConfigError, match="search.tradeoffs: expected finite weights >= 0"):
        search_config("cma", tradeoffs=[0.0, -0.5])
    assert search_config("cma").tradeoffs is None


@pytest.mark.parametrize("written_by", [*KINDS, *OTHER_KINDS])
def test_a_state_written_by_another_strategy_is_refused(written_by: str) -> None:
    """A resume forced through a change of strategy (or of the number of trade-offs) says so."""
    writer = make_strategy(search_config(written_by), DIM, seed=0)
    generation(writer)
    for kind in [k for k in [*KINDS, *OTHER_KINDS] if k != written_by]:
        with pytest.raises(ResumeError, match=f"not written by strategy {kind.split('-')[0]}"):
            make_strategy(search_config(kind), DIM, seed=0).set_state(writer.get_state())


class PlainData(pickle.Unpickler):
    """Reads builtins only: any class or function in the pickle fails the test."""

    def find_class(self, module: str, name: str):
        raise AssertionError(f"the state holds {module}.{name}, not plain data")


@pytest.mark.parametrize("tradeoffs", [None, [0.0, 0.5]])
def test_a_cma_checkpoint_of_another_pycma_version_is_refused(tmp_path: Path, tradeoffs) -> None:
    """The CMA-ES state is plain data with the pycma version that wrote it; resuming under another
    version is one ResumeError naming both (the version is changed in the checkpoint file)."""
    extra = {"tradeoffs": tradeoffs} if tradeoffs else {}
    config = make_config("cma", generations=1, **extra)
    layout = GenomeLayout.build("task_arithmetic", "layer", 3, 2, {"weight": (0.0, 1.5)})
    run = RunDir.create(tmp_path / "run", config, layout.describe())
    run_loop(run, config, layout, FakePool())
    checkpoint = run.load_checkpoint()
    state = PlainData(io.BytesIO(checkpoint.strategy_state)).load()
    members = state if tradeoffs else [state]
    assert len(members) == len(tradeoffs or [None])
    for member in members:
        assert member["cma"] == cma.__version__
        member["cma"] = "3.0.0"
    run.save_checkpoint(dataclasses.replace(checkpoint, strategy_state=pickle.dumps(state)))

    longer = make_config("cma", generations=2, **extra)
    with pytest.raises(ResumeError) as error:
        run_loop(RunDir.open(run.path), longer, layout, FakePool())
    message = str(error.value)
    assert "\n" not in message and "pycma 3.0.0" in message and f"pycma {cma.__version__}" in message, message
    assert len(run.records()) == 4 + 6 * len(tradeoffs or [None])  # nothing evaluated


def test_a_pickled_pycma_state_of_older_checkpoints_still_resumes() -> None:
    """State version 1 (the pickled CMAEvolutionStrategy) resumes exactly, and keeps being written so."""
    straight = make_strategy(search_config("cma"), DIM, seed=3)
    for _ in range(3):
        generation(straight)
    old = pickle.dumps(straight.es)
    expected = [generation(straight) for _ in range(4)]
    resumed = make_strategy(search_config("cma"), DIM, seed=3)
    resumed.set_state(old)
    drawn = [generation(resumed) for _ in range(2)]
    again = make_strategy(search_config("cma"), DIM, seed=3)
    again.set_state(resumed.get_state())
    drawn += [generation(again) for _ in range(2)]
    assert np.array_equal(np.array(drawn), np.array(expected))


def test_an_unreadable_optimiser_state_is_one_line() -> None:
    with pytest.raises(ResumeError, match="^checkpoint: unreadable optimiser state") as error:
        make_strategy(search_config("cma"), DIM, seed=0).set_state(b"\x80\x04not a pickle")
    assert "\n" not in str(error.value)
