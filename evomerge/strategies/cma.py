"""CMA-ES through pycma's ask/tell, in the unit box, with its own normal sampler.

`CMAStrategy` minimises the loss (-quality) alone. `TradeoffCMA` runs one CMA-ES per trade-off
weight w on the scalarised loss  -quality + w * log2(FLOPs per example): w is the quality a
doubling of cost must buy. CMA-ES ranks candidates within a generation, so the FLOPs need no
normalisation beyond the log: any constant factor shifts every candidate's loss equally.
"""

from __future__ import annotations

import math
import pickle

import cma
import numpy as np

from evomerge.strategies import unpickle_state


class _Normal:
    """pycma's `randn` option backed by a private numpy Generator (picklable with the strategy)."""

    def __init__(self, seed: int | np.random.SeedSequence):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAStrategy:
    lookahead = False  # each generation is sampled from the distribution the last one updated

    def __init__(self, dim: int, population: int, sigma0: float, x0: float, seed: int | np.random.SeedSequence):
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

    def tell(self, genomes: list[np.ndarray], losses: list[float], costs: list[float]) -> None:
        """Quality alone: the costs are not used."""
        self.es.tell(genomes, list(losses))

    def get_state(self) -> bytes:
        return pickle.dumps(self.es)

    def set_state(self, state: bytes) -> None:
        self.es = unpickle_state(state, lambda es: isinstance(es, cma.CMAEvolutionStrategy), "cma")


class TradeoffCMA:
    """One CMA-ES per trade-off weight, asked and evaluated together so they share the workers.

    A generation is the concatenation of every CMA-ES's population, in the order of the weights;
    each is told its own slice, scalarised with its weight. Each has its own generator, spawned
    from the run's seed.
    """

    lookahead = False

    def __init__(self, dim: int, population: int, weights: list[float], sigma0: float, x0: float, seed: int):
        self.weights = list(weights)
        seeds = np.random.SeedSequence(seed).spawn(len(self.weights))
        self.members = [CMAStrategy(dim, population, sigma0, x0, seed=child) for child in seeds]
        self.population = population * len(self.weights)

    def ask(self) -> list[np.ndarray]:
        return [genome for member in self.members for genome in member.ask()]

    def tell(self, genomes: list[np.ndarray], losses: list[float], costs: list[float]) -> None:
        size = self.members[0].population
        for k, (member, weight) in enumerate(zip(self.members, self.weights)):
            part = slice(k * size, (k + 1) * size)
            scalarised = [loss + weight * math.log2(max(cost, 1.0)) for loss, cost in zip(losses[part], costs[part])]
            member.tell(genomes[part], scalarised, costs[part])

    def get_state(self) -> bytes:
        return pickle.dumps([member.es for member in self.members])

    def set_state(self, state: bytes) -> None:
        states = unpickle_state(state, lambda value: isinstance(value, list) and len(value) == len(self.members)
                                and all(isinstance(es, cma.CMAEvolutionStrategy) for es in value),
                                f"cma with {len(self.members)} trade-offs")
        for member, es in zip(self.members, states):
            member.es = es
