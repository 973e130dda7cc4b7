"""NSGA-II and TPE through Optuna's ask/tell, over the unit box.

One in-memory Optuna study holds every told trial and the sampler with its seeded generator.
The state is the history of told generations (genomes, losses, costs): a resumed run builds a
fresh study with the same seed and replays the asks and tells, which leaves the sampler exactly
where it was (its draws depend only on the seed and the history), so it asks for the same
genomes. This uses Optuna's public API only (a pickled study depends on Optuna's internals: in
Optuna 5.1 NSGA-II's sampler holds a lock and cannot be pickled). Gene i is the study parameter
`x{i:05d}`, a float in [0, 1].

    nsga2   NSGAIISampler (Deb et al. 2002), two objectives minimised: (loss, cost), that is
            (-quality, FLOPs per example); its population is `search.population`, so one
            evomerge generation is one NSGA-II generation.
    tpe     TPESampler (multivariate, constant liar for the batch asked at once), the loss alone;
            the first generation is random (`n_startup_trials` = population).
"""

from __future__ import annotations

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
    def __init__(self, kind: Literal["nsga2", "tpe"], dim: int, population: int, seed: int):
        self.kind = kind
        self.population = population
        self.dim, self.seed = dim, seed
        self.history: list[tuple[list[list[float]], list[float], list[float]]] = []  # told generations
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
        self.asked: list[Any] = []  # the optuna trials of the last ask, in order

    def ask(self) -> list[np.ndarray]:
        self.asked = [self.study.ask(self.distributions) for _ in range(self.population)]
        return [np.array([trial.params[name] for name in self.distributions]) for trial in self.asked]

    def tell(self, genomes: list[np.ndarray], losses: list[float], costs: list[float]) -> None:
        if len(genomes) != len(self.asked):
            raise ValueError(f"tell: {len(genomes)} genomes for the {len(self.asked)} of the last ask")
        for trial, loss, cost in zip(self.asked, losses, costs):
            self.study.tell(trial, [float(loss), float(cost)] if self.kind == "nsga2" else float(loss))
        self.asked = []
        self.history.append(([list(map(float, g)) for g in genomes], list(map(float, losses)),
                             list(map(float, costs))))

    def get_state(self) -> bytes:
        return pickle.dumps({"strategy": self.kind, "dim": self.dim, "history": self.history})

    def set_state(self, state: bytes) -> None:
        value = unpickle_state(state, lambda v: isinstance(v, dict) and v.get("strategy") == self.kind
                               and v.get("dim") == self.dim, self.kind)
        self.history = []
        self._new_study()
        for number, (genomes, losses, costs) in enumerate(value["history"]):
            asked = self.ask()
            if [list(map(float, g)) for g in asked] != genomes:
                raise ResumeError(f"checkpoint: replaying {self.kind}'s generation {number} asked for other "
                                  f"genomes than the run did (another Optuna version?); resume with the "
                                  f"Optuna version that started the run")
            self.tell(asked, losses, costs)
