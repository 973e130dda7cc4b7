"""NSGA-II and TPE through Optuna's ask/tell, over the unit box.

One in-memory Optuna study holds every told trial and the sampler with its seeded generator.
The state is the history of asks and tells (each tell with its genomes, losses and costs): a
resumed run builds a fresh study with the same seed and replays them in order, which leaves
the sampler exactly where it was (its draws depend only on the seed and the history), so it
asks for the same genomes. This uses Optuna's public API only (a pickled study depends on
Optuna's internals: in Optuna 5.1 NSGA-II's sampler holds a lock and cannot be pickled).
Gene i is the study parameter `x{i:05d}`, a float in [0, 1].

    nsga2   NSGAIISampler (Deb et al. 2002), two objectives minimised: (loss, cost), that is
            (-quality, FLOPs per example); its population is `search.population`.
    tpe     TPESampler (multivariate, constant liar for the trials asked and not yet told), the
            loss alone; the first generation is random (`n_startup_trials` = population).

With `search.dispatch: steady` (the default) generation g + 1 is asked before g is told, so
both learn with a lag of one generation: TPE's liar stands in for the untold batch, and NSGA-II
breeds from the last generation Optuna holds complete.
"""

from __future__ import annotations

import collections
import pickle
from typing import Any, Literal

import numpy as np

from evomerge.errors import ConfigError, ResumeError
from evomerge.strategies import unpickle_state


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("search.strategy: nsga2 and tpe need optuna (pip install 'evomerge[optuna]')") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per told trial otherwise
    return optuna


class StudyStrategy:
    lookahead = True  # an ask while a batch is untold samples from the trials told so far

    def __init__(self, kind: Literal["nsga2", "tpe"], dim: int, population: int, seed: int):
        self.kind = kind
        self.population = population
        self.dim, self.seed = dim, seed
        # Every ask (None) and tell ((genomes, losses, costs)) in order: the state a resume replays.
        self.history: list[tuple[list[list[float]], list[float], list[float]] | None] = []
        self._new_study()

    def _new_study(self) -> None:
        optuna = _optuna()
        self.distributions = {f"x{i:05d}": optuna.distributions.FloatDistribution(0.0, 1.0) for i in range(self.dim)}
        if self.kind == "nsga2":
            sampler = optuna.samplers.NSGAIISampler(population_size=self.population, seed=self.seed)
            self.study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        else:
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.population, multivariate=True,
                                                 constant_liar=True)  # optuna 5 defaults, explicit for 4.x
            self.study = optuna.create_study(direction="minimize", sampler=sampler)
        self.asked: collections.deque[list[Any]] = collections.deque()  # the optuna trials of untold asks

    def ask(self) -> list[np.ndarray]:
        batch = [self.study.ask(self.distributions) for _ in range(self.population)]
        self.asked.append(batch)
        self.history.append(None)
        return [np.array([trial.params[name] for name in self.distributions]) for trial in batch]

    def tell(self, genomes: list[np.ndarray], losses: list[float], costs: list[float]) -> None:
        if not self.asked or len(genomes) != len(self.asked[0]):
            raise ValueError(f"tell: {len(genomes)} genomes for the {len(self.asked[0]) if self.asked else 0} "
                             f"of the oldest untold ask")
        for trial, loss, cost in zip(self.asked.popleft(), losses, costs):
            self.study.tell(trial, [float(loss), float(cost)] if self.kind == "nsga2" else float(loss))
        self.history.append(([list(map(float, g)) for g in genomes], list(map(float, losses)),
                             list(map(float, costs))))

    def get_state(self) -> bytes:
        return pickle.dumps({"strategy": self.kind, "dim": self.dim, "history": self.history, "version": 2})

    def set_state(self, state: bytes) -> None:
        value = unpickle_state(state, lambda v: isinstance(v, dict) and v.get("strategy") == self.kind
                               and v.get("dim") == self.dim, self.kind)
        history = value["history"]
        if value.get("version", 1) == 1:  # told generations only, each asked right before its tell
            history = [step for told in history for step in (None, told)]
        self.history = []
        self._new_study()
        asked: collections.deque[list[list[float]]] = collections.deque()
        for number, step in enumerate(history):
            if step is None:
                asked.append([list(map(float, g)) for g in self.ask()])
                continue
            genomes, losses, costs = step
            if asked.popleft() != genomes:
                raise ResumeError(f"checkpoint: replaying {self.kind}'s step {number} asked for other "
                                  f"genomes than the run did (another Optuna version?); resume with the "
                                  f"Optuna version that started the run")
            self.tell([np.array(g) for g in genomes], losses, costs)
