"""CMA-ES through pycma's ask/tell, in the unit box, with its own normal sampler.

`CMAStrategy` minimises the loss (-quality) alone. `TradeoffCMA` runs one CMA-ES per trade-off
weight w on the scalarised loss  -quality + w * log2(FLOPs per example): w is the quality a
doubling of cost must buy. CMA-ES ranks candidates within a generation, so the FLOPs need no
normalisation beyond the log: any constant factor shifts every candidate's loss equally.

The checkpointed state is plain data, as for the Optuna strategies: every ask and tell in order,
and the pycma version. A resume builds the seeded CMA-ES afresh and replays them, so it holds
exactly the uninterrupted run's state (each replayed ask is checked against the genomes the run
was given); a state written under another pycma version is refused, naming both.
"""

from __future__ import annotations

import math
import pickle

import cma
import numpy as np

from evomerge.errors import ResumeError
from evomerge.strategies import unpickle_state

STATE_VERSION = 2  # 1: the pickled pycma object (read as before)


class _Normal:
    """pycma's `randn` option backed by a private numpy Generator (picklable with the strategy)."""

    def __init__(self, seed: int | np.random.SeedSequence):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


class CMAStrategy:
    lookahead = False  # each generation is sampled from the distribution the last one updated

    def __init__(self, dim: int, population: int, sigma0: float, x0: float, seed: int | np.random.SeedSequence):
        self.dim, self.population, self.sigma0, self.x0, self.seed = dim, population, sigma0, x0, seed
        self._start()

    def _start(self) -> None:
        """The seeded CMA-ES before its first ask."""
        options = {
            "bounds": [0.0, 1.0],
            "popsize": self.population,
            "randn": _Normal(self.seed),
            "seed": np.nan,  # never touch numpy's global RNG
            "verbose": -9, "verb_log": 0, "verb_disp": 0,
            # The run length is `search.generations`; pycma's own stopping rules stay off.
            "tolfun": 0, "tolfunhist": 0, "tolflatfitness": 10**9, "tolx": 0, "tolstagnation": 10**9,
            "tolconditioncov": False,
        }
        self.es = cma.CMAEvolutionStrategy([self.x0] * self.dim, self.sigma0, options)
        # Every ask (None) and tell ((genomes, losses)) in order: the state a resume replays.
        self.history: list[tuple[list[list[float]], list[float]] | None] = []
        self.legacy = False  # resumed from a version 1 state: its history is unknown, the object is kept

    def ask(self) -> list[np.ndarray]:
        self.history.append(None)
        return [np.clip(np.asarray(x, dtype=float), 0.0, 1.0) for x in self.es.ask()]

    def tell(self, genomes: list[np.ndarray], losses: list[float], costs: list[float]) -> None:
        """Quality alone: the costs are not used."""
        self.es.tell(genomes, list(losses))
        self.history.append(([list(map(float, g)) for g in genomes], list(map(float, losses))))

    def state(self) -> dict | cma.CMAEvolutionStrategy:
        if self.legacy:
            return self.es
        return {"strategy": "cma", "dim": self.dim, "history": self.history, "cma": cma.__version__,
                "version": STATE_VERSION}

    def get_state(self) -> bytes:
        return pickle.dumps(self.state())

    def set_state(self, state: bytes) -> None:
        value = unpickle_state(state, lambda v: isinstance(v, cma.CMAEvolutionStrategy) or (
            isinstance(v, dict) and v.get("strategy") == "cma" and v.get("dim") == self.dim), "cma")
        self.restore(value)

    def restore(self, value: dict | cma.CMAEvolutionStrategy) -> None:
        if isinstance(value, cma.CMAEvolutionStrategy):  # version 1: the pickled object itself
            self.es, self.history, self.legacy = value, [], True
            return
        if value["cma"] != cma.__version__:
            raise ResumeError(f"checkpoint: its CMA-ES state was written with pycma {value['cma']}, this "
                              f"environment has pycma {cma.__version__}; resume with pycma {value['cma']}")
        self._start()
        for number, step in enumerate(value["history"]):
            if step is None:
                asked = [list(map(float, g)) for g in self.ask()]
                continue
            genomes, losses = step
            if asked != genomes:
                raise ResumeError(f"checkpoint: replaying CMA-ES step {number} asked for other genomes than "
                                  f"the run did (another numpy version, or a forced change of seed, "
                                  f"search.sigma0, x0 or population?); resume as the run started")
            self.tell([np.array(g) for g in genomes], losses, [])


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
        return pickle.dumps([member.state() for member in self.members])

    def set_state(self, state: bytes) -> None:
        states = unpickle_state(state, lambda value: isinstance(value, list) and len(value) == len(self.members)
                                and all(isinstance(es, cma.CMAEvolutionStrategy) or (
                                    isinstance(es, dict) and es.get("strategy") == "cma"
                                    and es.get("dim") == self.members[0].dim) for es in value),
                                f"cma with {len(self.members)} trade-offs")
        for member, value in zip(self.members, states):
            member.restore(value)
