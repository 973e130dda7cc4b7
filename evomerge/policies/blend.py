"""Blend (Chai: "Blending Is All You Need", arXiv 2401.02994): every request is served by one
member drawn at random, with probabilities given by the genes (uniform: the paper's setting).

The draw of a unit (a generation request, or all the choices of one question) comes from its
own ``numpy.random.Generator`` seeded with ``(seed, crc32(task name + context), occurrence)``,
where occurrence counts earlier units of the same call with the same task and context
(lm-eval's repeats).  The global RNG is never touched, and a request's draw does not depend
on which other requests share its batch, so a run repeats exactly.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from evomerge.policies.base import PolicyLM, Unit, unit_key
from evomerge.policies.members import Member

__all__ = ["Blend", "normalize_probs"]


def normalize_probs(probs: Sequence[float], n: int) -> list[float]:
    """``probs`` (non-negative, finite, not all zero) scaled to sum to 1."""
    values = [float(p) for p in probs]
    if len(values) != n:
        raise ValueError(f"blend: {len(values)} probabilities for {n} members")
    if any(not math.isfinite(p) or p < 0 for p in values):
        raise ValueError(f"blend: probabilities must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError("blend: probabilities sum to 0")
    return [p / total for p in values]


class Blend(PolicyLM):
    kind = "blend"
    params = ("probs",)

    @classmethod
    def genes(cls, config: Any) -> list[tuple[str, float, float]]:
        """One share per member; the probabilities are the shares normalised (uniform when all are 0)."""
        return [("share", 0.0, 1.0)] * len(config.members)

    @classmethod
    def decode(cls, config: Any, values: list[float]) -> dict[str, Any]:
        total = sum(values)
        return {"probs": [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)}

    @classmethod
    def build(cls, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
              scorers: Sequence[Member] | None = None, router: Any = None) -> Blend:
        return cls(members, params.get("probs"), seed)

    def __init__(self, members: Sequence[Member], probs: Sequence[float] | None = None, seed: int = 0):
        super().__init__(members)
        n = len(self.members)
        self.probs = normalize_probs([1.0] * n if probs is None else probs, n)
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"blend: seed must be non-negative, got {seed}")
        self._cdf = np.cumsum(self.probs)
        last = max(i for i, p in enumerate(self.probs) if p > 0)
        self._cdf[last:] = 1.0  # rounding never sends a draw past the last member with mass
        # one member with all the mass (a candidate served alone) gets every draw: none is made
        self._sole = last if sum(p > 0 for p in self.probs) == 1 else None
        # Served (policies.load): a prompt's draw ignores its repeats in a call, so a member is a
        # function of the prompt and the seed alone. The search keeps lm-eval's repeats apart.
        self.per_prompt = False

    def draw(self, unit: Unit) -> int:
        rng = np.random.default_rng([self.seed, unit_key(unit), 0 if self.per_prompt else unit.occurrence])
        # u in [0, 1): the member i with cdf[i-1] <= u < cdf[i] (never one with probability 0)
        return int(np.searchsorted(self._cdf, rng.random(), side="right"))

    def route(self, units: list[Unit], request_type: str) -> tuple[list[int], list[int]]:
        if self._sole is not None:
            return [self._sole] * len(units), [0] * len(units)
        return [self.draw(unit) for unit in units], [0] * len(units)
