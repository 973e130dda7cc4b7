"""Inference-time policies over member models, as lm-eval LMs (see ``base`` for the design).

* ``make_policy(kind, members, params, seed)`` builds one:
  ``blend``  params ``{"probs": [p_0, ...]}`` (non-negative, normalised; uniform if absent);
  ``router`` params ``{"k": int}`` (optional ``scorers``: one router model per member);
  ``cascade`` params ``{"thresholds": [t_0, ..., t_{n-2}]}`` (members cheapest first), or
  per request type ``{"thresholds": {"generate_until": [...], "loglikelihood": [...]}}``.
  ``classifier`` params ``{"outputs": [...], "threshold": t, "cost_weight": w}`` with its trained
  ``router`` (``classifier.TrainedRouter``; see that module).
* ``save_policy(path, kind, params, member_folders)`` writes a small JSON file; ``load(path)``
  loads the member folders and returns a ``PolicyServer`` whose ``generate(prompts)`` serves
  with that policy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evomerge.policies.base import Member, PolicyLM, PolicyStats
from evomerge.policies.blend import Blend
from evomerge.policies.cascade import Cascade
from evomerge.policies.classifier import ClassifierRouter, TrainedRouter
from evomerge.policies.router import PrefixRouter

__all__ = ["KINDS", "Member", "PolicyLM", "PolicyStats", "Blend", "PrefixRouter", "Cascade", "ClassifierRouter",
           "TrainedRouter",
           "make_policy", "save_policy", "load", "PolicyServer"]

KINDS = ("blend", "router", "cascade", "classifier")
FORMAT = "evomerge-policy"
VERSION = 1


def make_policy(kind: str, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
                scorers: Sequence[Member] | None = None, router: TrainedRouter | None = None) -> PolicyLM:
    """A policy of ``kind`` over ``members`` (built once and reused: a policy holds no state
    but its ``stats``, which ``stats.reset()`` clears)."""
    params = dict(params or {})
    if kind == ClassifierRouter.kind:
        return ClassifierRouter.from_params(members, params, router)
    expected = {"blend": {"probs"}, "router": {"k"}, "cascade": {"thresholds"}}
    if kind not in expected:
        raise ValueError(f"policy kind: unknown {kind!r}, expected one of {', '.join(KINDS)}")
    unknown = set(params) - expected[kind]
    if unknown:
        raise ValueError(f"policy {kind}: unknown parameter(s) {', '.join(sorted(unknown))}")
    if scorers is not None and kind != "router":
        raise ValueError(f"policy {kind}: scorers are for the router only")
    if kind == "blend":
        return Blend(members, params.get("probs"), seed)
    if kind == "router":
        if "k" not in params:
            raise ValueError("policy router: parameter k is required")
        return PrefixRouter(members, params["k"], scorers)
    if "thresholds" not in params:
        raise ValueError("policy cascade: parameter thresholds is required")
    return Cascade(members, params["thresholds"])


def save_policy(path: str | os.PathLike, kind: str, params: dict[str, Any],
                member_folders: Sequence[str | os.PathLike], seed: int = 0,
                scorer_folders: Sequence[str | os.PathLike] | None = None,
                router_file: str | os.PathLike | None = None) -> Path:
    """Write a policy file: kind, params, seed and the member folders (relative to the file's
    folder when they lie under it, absolute otherwise); a classifier's trained router file too.
    +-inf thresholds are written as the strings "inf"/"-inf" (JSON has no infinities)."""
    if kind not in KINDS:
        raise ValueError(f"policy kind: unknown {kind!r}, expected one of {', '.join(KINDS)}")
    path = Path(path)
    base = path.parent.resolve()

    def where(folder: str | os.PathLike) -> str:
        folder = Path(folder).resolve()
        return str(folder.relative_to(base)) if folder.is_relative_to(base) else str(folder)

    record = {"format": FORMAT, "version": VERSION, "kind": kind, "params": _encode(params), "seed": int(seed),
              "members": [where(f) for f in member_folders]}
    if scorer_folders is not None:
        record["scorers"] = [where(f) for f in scorer_folders]
    if router_file is not None:
        record["router"] = where(router_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass
class PolicyServer:
    """A loaded policy: ``generate`` answers prompts, greedily, through the policy."""

    policy: PolicyLM
    kind: str
    params: dict[str, Any]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32,
                 until: Sequence[str] | str | None = ("\n",)) -> list[str]:
        from lm_eval.api.instance import Instance

        stops = [until] if isinstance(until, str) else list(until or [])
        kwargs = {"until": stops, "max_gen_toks": int(max_new_tokens), "do_sample": False}
        requests = [Instance("generate_until", {}, (prompt, dict(kwargs)), i, ("generate", i, 1))
                    for i, prompt in enumerate(prompts)]
        return self.policy.generate_until(requests)


def read_policy(path: str | os.PathLike) -> tuple[dict[str, Any], list[Path], list[Path] | None]:
    """A policy file's record, its member folders and its scorer folders (None: no scorers),
    the folders resolved against the file's folder."""
    path = Path(path)
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(f"{path}: not an {FORMAT} file of version {VERSION}")
    scorers = record.get("scorers")
    return (record, [path.parent / f for f in record["members"]],
            [path.parent / f for f in scorers] if scorers is not None else None)


def load(path: str | os.PathLike, device: str = "cpu", batch_size: int | str = 16) -> PolicyServer:
    """Load a policy file written by ``save_policy`` with its member (and scorer) models."""
    record, member_folders, scorer_folders = read_policy(path)

    def members(folders: list[Path]) -> list[Member]:
        return [Member.from_folder(folder, device=device, batch_size=batch_size) for folder in folders]

    scorers = members(scorer_folders) if scorer_folders is not None else None
    params = _decode(record["params"])
    router = TrainedRouter.load(Path(path).parent / record["router"]) if "router" in record else None
    policy = make_policy(record["kind"], members(member_folders), params, record.get("seed", 0), scorers, router)
    return PolicyServer(policy, record["kind"], params)


def _encode(value: Any) -> Any:
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if value in ("inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
