"""Ask/tell optimisers over the unit box [0, 1]^n. All minimise: the search passes each candidate's
loss (-quality) and cost (forward FLOPs per example); a strategy uses the cost or ignores it.

A strategy keeps its own RNG (never numpy's global one, which lm-eval reseeds) and exposes its
whole state as bytes, so a checkpointed run draws the same numbers as an uninterrupted one.

    cma      pycma CMA-ES on the loss; with `search.tradeoffs`, one CMA-ES per trade-off weight
    random   uniform samples, the baseline
    nsga2    Optuna's NSGA-II on (loss, cost): a front of quality vs FLOPs
    tpe      Optuna's TPE on the loss
"""

from __future__ import annotations

import pickle
from typing import Any, Protocol

import numpy as np

from evomerge.config import SearchConfig
from evomerge.errors import ResumeError


class Strategy(Protocol):
    population: int  # genomes per ask
    # True when `ask` may be called once more before the last ask is told: the search then asks
    # generation g + 1 before telling g and keeps the workers busy across the boundary
    # (`search.dispatch: steady`). The order of asks and tells is fixed, never timing-dependent.
    lookahead: bool

    def ask(self) -> list[np.ndarray]:
        """The next generation's genomes, each in [0, 1]^n."""

    def tell(self, genomes: list[np.ndarray], losses: list[float], costs: list[float]) -> None:
        """Losses (-quality) and costs (FLOPs per example) for the genomes of the oldest untold ask, in
        the same order; all finite, lower is better (the search gives a failed candidate the worst of both)."""

    def get_state(self) -> bytes: ...

    def set_state(self, state: bytes) -> None: ...


def default_population(dim: int) -> int:
    """CMA-ES default population size 4 + floor(3 ln n) (Hansen, The CMA Evolution Strategy: A Tutorial)."""
    return 4 + int(3 * np.log(max(dim, 1)))


def unpickle_state(state: bytes, accepts: Any, strategy: str) -> Any:
    """The checkpointed optimiser state, refused by name when another strategy wrote it (a resume
    forced through a change of search.strategy or search.tradeoffs)."""
    try:
        value = pickle.loads(state)
    except Exception as exc:  # noqa: BLE001 - e.g. a class the installed library no longer has
        raise ResumeError(f"checkpoint: unreadable optimiser state ({type(exc).__name__}: {exc}); resume "
                          f"with the library versions that started the run".splitlines()[0]) from None
    if not accepts(value):
        raise ResumeError(f"checkpoint: its optimiser state was not written by strategy {strategy}; "
                          f"search.strategy or search.tradeoffs changed since (resume with the original values)")
    return value


def make_strategy(search: SearchConfig, dim: int, seed: int) -> Strategy:
    from evomerge.strategies.cma import CMAStrategy, TradeoffCMA
    from evomerge.strategies.optuna_study import StudyStrategy
    from evomerge.strategies.random import RandomStrategy

    population = search.population or default_population(dim)
    if search.strategy == "cma" and search.tradeoffs is not None:
        return TradeoffCMA(dim, population, search.tradeoffs, sigma0=search.sigma0, x0=search.x0, seed=seed)
    if search.strategy == "cma":
        return CMAStrategy(dim, population, sigma0=search.sigma0, x0=search.x0, seed=seed)
    if search.strategy in ("nsga2", "tpe"):
        return StudyStrategy(search.strategy, dim, population, seed=seed)
    return RandomStrategy(dim, population, seed=seed)
