"""CMA-ES through pycma's ask/tell, in the unit box, with its own normal sampler."""

from __future__ import annotations

import pickle

import cma
import numpy as np


class _Normal:
    """pycma's `randn` option backed by a private numpy Generator (picklable with the strategy)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAStrategy:
    def __init__(self, dim: int, population: int, sigma0: float, x0: float, seed: int):
        self.population = population
        options = {
            "bounds": [0.0, 1.0],
            "popsize": population,
            "randn": _Normal(seed),
            "seed": np.nan,  # never touch numpy's global RNG
            "verbose": -9, "verb_log": 0, "verb_disp": 0,
            # The run length is `search.generations`; pycma's own stopping rules stay off.
            "tolfun": 0, "tolfunhist": 0, "tolflatfitness": 10**9, "tolx": 0, "tolstagnation": 10**9,
            "tolconditioncov": False,
        }
        self.es = cma.CMAEvolutionStrategy([x0] * dim, sigma0, options)

    def ask(self) -> list[np.ndarray]:
        return [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in self.es.ask()]

    def tell(self, genomes: list[np.ndarray], losses: list[float]) -> None:
        self.es.tell(genomes, list(losses))

    def get_state(self) -> bytes:
        return pickle.dumps(self.es)

    def set_state(self, state: bytes) -> None:
        self.es = pickle.loads(state)
