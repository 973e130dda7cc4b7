"""Ask/tell optimisers over the unit box [0, 1]^n. All minimise a loss (the search passes -quality).

A strategy keeps its own RNG (never numpy's global one, which lm-eval reseeds) and exposes its
whole state as bytes, so a checkpointed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from evomerge.config import SearchConfig


class Strategy(Protocol):
    population: int

    def ask(self) -> list[np.ndarray]:
        """The next generation's genomes, each in [0, 1]^n."""

    def tell(self, genomes: list[np.ndarray], losses: list[float]) -> None:
        """Losses (lower is better, all finite) for the genomes of the last ask, in the same order."""

    def get_state(self) -> bytes: ...

    def set_state(self, state: bytes) -> None: ...


def default_population(dim: int) -> int:
    """CMA-ES default population size 4 + floor(3 ln n) (Hansen, The CMA Evolution Strategy: A Tutorial)."""
    return 4 + int(3 * np.log(max(dim, 1)))


def make_strategy(search: SearchConfig, dim: int, seed: int) -> Strategy:
    from evomerge.strategies.cma import CMAStrategy
    from evomerge.strategies.random import RandomStrategy

    population = search.population or default_population(dim)
    if search.strategy == "cma":
        return CMAStrategy(dim, population, sigma0=search.sigma0, x0=search.x0, seed=seed)
    return RandomStrategy(dim, population, seed=seed)
