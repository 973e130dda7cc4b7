"""Cascade (FrugalGPT, arXiv 2305.05176; RouteLLM-style thresholds): the members answer in turn,
in the order given (list the cheapest first: the order is not sorted by cost); a request
escalates from member ``i`` to ``i + 1`` while its confidence under member ``i`` is below
``thresholds[i]``.  The last member's answer is final.

Confidence of a unit under a member:

* generation: mean log-probability of the generated tokens (stop token included) under the
  member, recorded while generating (no extra forward);
* log-likelihood, several requests of one question (multiple choice): the margin between the
  best two choices' log-probabilities (lm-eval's ``acc`` compares these raw sums);
* log-likelihood, a single request: its log-probability.

The two log-likelihood confidences and the generation one live on different scales (a margin
is >= 0, a mean log-prob <= 0); ``thresholds`` is either one list for every request type or a
dict ``{"generate_until": [...], "loglikelihood": [...]}`` (a missing type never escalates).
NaN counts as -inf and +inf as the largest float, so a threshold of -inf never escalates and
+inf always does.  Every consulted member's FLOPs are counted.  Each stage is one batched
call with the units still undecided.  ``loglikelihood_rolling`` has no answer to be
confident about and is refused.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping, Sequence

from evomerge.policies.base import PolicyLM, make_units, serve_units
from evomerge.policies.members import Member
from evomerge.policies.metering import Served

__all__ = ["Cascade", "unit_confidence"]


def unit_confidence(served: Served, start: int, count: int, request_type: str) -> float:
    """Confidence of the unit whose requests are ``served.*[start:start + count]``."""
    values = served.confidence[start:start + count]
    if request_type == "loglikelihood" and count >= 2:
        best, second = sorted(values, reverse=True)[:2]
        value = best - second if math.isfinite(best) else -math.inf
    else:
        value = values[0]
    if math.isnan(value):
        return -math.inf
    return min(value, sys.float_info.max)


class Cascade(PolicyLM):
    kind = "cascade"
    params = ("thresholds",)

    @classmethod
    def genes(cls, config: Any) -> list[tuple[str, float, float]]:
        """One confidence threshold per escalation (members - 1), in [0, 1]: `decode` maps it onto
        `bounds.threshold` for generation and `bounds.margin` for multiple choice."""
        return [("threshold", 0.0, 1.0)] * (len(config.members) - 1)

    @classmethod
    def decode(cls, config: Any, values: list[float]) -> dict[str, Any]:
        (t_low, t_high), (m_low, m_high) = config.bound("threshold"), config.bound("margin")
        return {"thresholds": {"generate_until": [t_low + v * (t_high - t_low) for v in values],
                               "loglikelihood": [m_low + v * (m_high - m_low) for v in values]}}

    @classmethod
    def build(cls, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
              scorers: Sequence[Member] | None = None, router: Any = None) -> Cascade:
        if "thresholds" not in params:
            raise ValueError(f"policy {cls.kind}: parameter thresholds is required")
        return cls(members, params["thresholds"])

    def __init__(self, members: Sequence[Member], thresholds: Sequence[float] | Mapping[str, Sequence[float]]):
        super().__init__(members)
        if isinstance(thresholds, Mapping):
            unknown = set(thresholds) - {"generate_until", "loglikelihood"}
            if unknown:
                raise ValueError(f"cascade: thresholds for unknown request type(s) {', '.join(sorted(unknown))}")
            self.thresholds = {kind: self._check(values) for kind, values in thresholds.items()}
        else:
            self.thresholds = self._check(thresholds)

    def _check(self, values: Sequence[float]) -> list[float]:
        values = [float(t) for t in values]
        if len(values) != len(self.members) - 1:
            raise ValueError(f"cascade: {len(self.members)} members need {len(self.members) - 1} "
                             f"thresholds, got {len(values)}")
        if any(math.isnan(t) for t in values):
            raise ValueError("cascade: a threshold is NaN")
        return values

    def thresholds_for(self, request_type: str) -> list[float]:
        if isinstance(self.thresholds, dict):
            return self.thresholds.get(request_type, [-math.inf] * (len(self.members) - 1))
        return self.thresholds

    def dispatch(self, requests: list[Any], request_type: str) -> list[Any]:
        if request_type == "loglikelihood_rolling":
            raise NotImplementedError("cascade: loglikelihood_rolling (perplexity) has no answer to be "
                                      "confident about; use blend or router for perplexity tasks")
        if not requests:
            return []
        results: list[Any] = [None] * len(requests)
        flops = [0] * len(requests)
        member_of = [0] * len(requests)
        active = make_units(requests, request_type)
        thresholds = self.thresholds_for(request_type)
        last = len(self.members) - 1
        for m, member in enumerate(self.members):
            if not active:
                break
            instances = [requests[i] for unit in active for i in unit.indices]
            served = serve_units(member, instances, active, request_type)
            self._account_member(m, len(instances), sum(served.flops), served=False)
            escalate, pos = [], 0
            for unit in active:
                count = len(unit.indices)
                for j, i in enumerate(unit.indices):
                    flops[i] += served.flops[pos + j]
                if m < last and unit_confidence(served, pos, count, request_type) < thresholds[m]:
                    escalate.append(unit)
                else:
                    for j, i in enumerate(unit.indices):
                        results[i], member_of[i] = served.results[pos + j], m
                    self.stats.served[m] += count
                pos += count
            active = escalate
        self._account_requests(flops, member_of)
        return results
