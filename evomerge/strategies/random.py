"""Uniform random search in the unit box: the baseline every other strategy must beat."""

from __future__ import annotations

import pickle

import numpy as np

from evomerge.strategies import unpickle_state


class RandomStrategy:
    lookahead = True  # its asks never depend on a tell

    def __init__(self, dim: int, population: int, seed: int):
        self.dim = dim
        self.population = population
        self.rng = np.random.default_rng(seed)

    def ask(self) -> list[np.ndarray]:
        return list(self.rng.random((self.population, self.dim)))

    def tell(self, genomes: list[np.ndarray], losses: list[float], costs: list[float]) -> None:
        """Random search learns nothing."""

    def get_state(self) -> bytes:
        return pickle.dumps(self.rng.bit_generator.state)

    def set_state(self, state: bytes) -> None:
        self.rng.bit_generator.state = unpickle_state(
            state, lambda value: isinstance(value, dict) and value.get("bit_generator") == "PCG64", "random")
