"""Policies: inference-time combinations of member models, each an lm-eval ``LM``.

A *member* (``members.Member``) is a model that can serve a request (a source model or the
candidate's merged model): an lm-eval ``HFLM`` plus its ``CostModel``.  A ``PolicyLM`` receives
lm-eval's requests, decides which member(s) serve each one, and records who served it and what
it cost (``metering.PolicyStats``; how FLOPs are counted: ``metering``).

Dispatch stays batched: the policy decides the member of every request first, then calls
each member's HFLM once with its share and puts the results back in the original order.

Units.  Requests that must be decided together form a *unit*: the log-likelihood requests
of one document (same ``task_name`` and ``doc_id``: the choices of a multiple-choice
question) always go to the same member, since comparing log-probabilities of choices from
different models is meaningless.  Every ``generate_until`` and ``loglikelihood_rolling``
request is a unit of its own.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from lm_eval.api.model import LM

from evomerge.policies.members import Member
from evomerge.policies.metering import PolicyStats, Served, serve

__all__ = ["PolicyLM", "Unit", "make_units", "serve_units", "unit_key"]


@dataclass
class Unit:
    """Requests decided together: indices into the request list, in order."""

    indices: list[int]
    text: str  # the first request's context (the string for loglikelihood_rolling)
    task_name: str | None
    occurrence: int  # how many earlier units of the same call had the same (task_name, text)


def unit_key(unit: Unit) -> int:
    """Stable 32-bit hash of a unit's task and text (zlib.crc32: same on every run and machine)."""
    return zlib.crc32(f"{unit.task_name or ''}\x00{unit.text}".encode("utf-8"))


def make_units(requests: Sequence[Any], request_type: str) -> list[Unit]:
    """The units of a request list (see the module docstring)."""
    groups: dict[Any, list[int]] = {}
    for i, inst in enumerate(requests):
        task, doc = getattr(inst, "task_name", None), getattr(inst, "doc_id", None)
        if request_type == "loglikelihood" and task is not None and doc is not None:
            groups.setdefault(("doc", task, doc), []).append(i)
        else:
            groups[("one", i)] = [i]
    units, seen = [], defaultdict(int)
    for indices in groups.values():  # in order of each unit's first request
        first = requests[indices[0]]
        text, task = first.args[0], getattr(first, "task_name", None)
        units.append(Unit(indices, text, task, seen[(task, text)]))
        seen[(task, text)] += 1
    return units


class PolicyLM(LM):
    """Base of the policies: an lm-eval ``LM`` over members.

    Subclasses implement ``route(units, request_type) -> (member per unit, routing FLOPs
    per unit)``; ``Cascade`` overrides ``dispatch`` instead.
    """

    # A policy class owns its facts: the `kind` name configs, journals and policy files use (and
    # older `aliases`), the parameters it is built from, whether it takes router models (`scorers`)
    # or a router the run trains (`router`),
    # its genes and how they decode into parameters (evomerge/genome.py lays them out).
    kind: ClassVar[str] = "policy"
    aliases: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[str, ...]] = ()
    takes_scorers: ClassVar[bool] = False
    takes_router: ClassVar[bool] = False  # a router the run trains (policies.classifier.TrainedRouter)

    @classmethod
    def genes(cls, config: Any) -> list[tuple[str, float, float]]:
        """(name, low, high) of each policy gene for a PolicyConfig, in genome order."""
        raise NotImplementedError

    @classmethod
    def decode(cls, config: Any, values: list[float]) -> dict[str, Any]:
        """The parameters of a candidate from its policy genes (each in [0, 1])."""
        raise NotImplementedError

    @classmethod
    def build(cls, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
              scorers: Sequence[Member] | None = None, router: Any = None) -> PolicyLM:
        """The policy from its parameters (a policy file's or a recipe's)."""
        raise NotImplementedError

    def __init__(self, members: Sequence[Member]):
        super().__init__()
        if not members:
            raise ValueError("a policy needs at least one member")
        self.members = list(members)
        self.stats = PolicyStats(len(self.members))

    # --- lm-eval's interface ----------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.dispatch(list(requests), "loglikelihood")

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self.dispatch(list(requests), "generate_until")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.dispatch(list(requests), "loglikelihood_rolling")

    @property
    def tokenizer_name(self) -> str:
        return "+".join(str(getattr(m.lm, "tokenizer_name", m.name)) for m in self.members)

    def get_model_info(self) -> dict[str, Any]:
        return {"policy": self.kind, "members": [m.name for m in self.members]}

    @property
    def device(self):
        return self.members[0].lm.device

    # --- routing ------------------------------------------------------------------------------

    def route(self, units: list[Unit], request_type: str) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def dispatch(self, requests: list[Any], request_type: str) -> list[Any]:
        if not requests:
            return []
        units = make_units(requests, request_type)
        choice, routing = self.route(units, request_type)
        if len(choice) != len(units) or any(not 0 <= c < len(self.members) for c in choice):
            raise RuntimeError(f"{self.kind}: route returned {choice!r} for {len(units)} units")
        results: list[Any] = [None] * len(requests)
        flops = [0] * len(requests)
        member_of = [0] * len(requests)
        for m, member in enumerate(self.members):
            mine = [u for u, c in zip(units, choice) if c == m]
            if not mine:
                continue
            served = serve_units(member, [requests[i] for u in mine for i in u.indices], mine, request_type)
            pos = 0
            for unit in mine:
                for i in unit.indices:
                    results[i], flops[i], member_of[i] = served.results[pos], served.flops[pos], m
                    pos += 1
            self._account_member(m, len(served.results), sum(served.flops), served=True)
        for unit, cost in zip(units, routing):
            flops[unit.indices[0]] += cost
            self.stats.routing_flops += cost
            self.stats.flops += cost
        self._account_requests(flops, member_of)
        return results

    # --- bookkeeping --------------------------------------------------------------------------

    def _account_member(self, m: int, count: int, flops: int, served: bool) -> None:
        self.stats.consulted[m] += count
        if served:
            self.stats.served[m] += count
        self.stats.member_flops[m] += flops
        self.stats.flops += flops

    def _account_requests(self, flops: list[int], member_of: list[int]) -> None:
        self.stats.requests += len(flops)
        self.stats.request_flops.extend(flops)
        self.stats.request_member.extend(member_of)


def serve_units(member: Member, instances: list[Any], units: list[Unit], request_type: str) -> Served:
    """``serve`` over the concatenated requests of ``units`` (in unit order)."""
    return serve(member, instances, request_type, [len(unit.indices) for unit in units])
