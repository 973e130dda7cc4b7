"""Inference-time policies over member models, as lm-eval LMs (see ``base`` for the design).

Each policy class owns its kind name, parameters, genes and their decoding (``POLICIES`` lists
them by kind):

* ``Blend`` (``blend``): params ``{"probs": [p_0, ...]}`` (non-negative, normalised; uniform if absent);
* ``PrefixRouter`` (``prefix_router``): params ``{"k": int}`` (optional ``scorers``: one router model
  per member, hand-made or, with ``policy.scorers: learned``, trained by the run: ``evomerge.router_lms``);
* ``Cascade`` (``cascade``): params ``{"thresholds": [t_0, ..., t_{n-2}]}`` (members answer in the
  order given), or per request type ``{"thresholds": {"generate_until": [...], "loglikelihood": [...]}}``.

* ``ClassifierRouter`` (``classifier``): params ``{"outputs": [...], "threshold": t, "cost_weight": w}``
  with the router the run trained (``classifier.TrainedRouter``; see that module).

``make_policy(kind, members, params, seed)`` builds one; ``save_policy(path, kind, params,
member_folders)`` writes a small JSON file; ``load(path)`` (an export folder or its
``policy.json``) loads the member folders and returns a ``PolicyServer`` whose ``generate``,
``loglikelihood`` and ``choose`` serve with that policy, each call's statistics returned with its
answers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evomerge.errors import ConfigError
from evomerge.policies.base import PolicyLM
from evomerge.policies.blend import Blend
from evomerge.policies.cascade import Cascade
from evomerge.policies.classifier import ROUTER_FILE, ClassifierRouter, TrainedRouter
from evomerge.policies.members import Member
from evomerge.policies.metering import PolicyStats
from evomerge.policies.router import PrefixRouter

__all__ = ["POLICIES", "Member", "PolicyLM", "PolicyStats", "Blend", "PrefixRouter", "Cascade", "ClassifierRouter",
           "TrainedRouter", "ROUTER_FILE", "policy_class", "make_policy", "save_policy", "load", "PolicyServer",
           "Answers"]

POLICIES: dict[str, type[PolicyLM]] = {cls.kind: cls for cls in (Blend, PrefixRouter, Cascade, ClassifierRouter)}
FORMAT = "evomerge-policy"
VERSION = 1


def policy_class(kind: str) -> type[PolicyLM]:
    """The class of a policy kind (or of an older name of it)."""
    for cls in POLICIES.values():
        if kind == cls.kind or kind in cls.aliases:
            return cls
    raise ValueError(f"policy kind: unknown {kind!r}, expected one of {', '.join(POLICIES)}")


def make_policy(kind: str, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
                scorers: Sequence[Member] | None = None, router: TrainedRouter | None = None) -> PolicyLM:
    """A policy of ``kind`` over ``members`` (built once and reused: a policy holds no state
    but its ``stats``, which ``stats.reset()`` clears)."""
    cls = policy_class(kind)
    params = dict(params or {})
    unknown = set(params) - set(cls.params)
    if unknown:
        raise ValueError(f"policy {cls.kind}: unknown parameter(s) {', '.join(sorted(unknown))}")
    if scorers is not None and not cls.takes_scorers:
        raise ValueError(f"policy {cls.kind}: takes no scorers (router models)")
    if router is not None and not cls.takes_router:
        raise ValueError(f"policy {cls.kind}: takes no trained router")
    return cls.build(members, params, seed, scorers, router)


def save_policy(path: str | os.PathLike, kind: str, params: dict[str, Any],
                member_folders: Sequence[str | os.PathLike], seed: int = 0,
                scorer_folders: Sequence[str | os.PathLike] | None = None,
                router_file: str | os.PathLike | None = None) -> Path:
    """Write a policy file: kind, params, seed and the member folders (relative to the file's
    folder when they lie under it, absolute otherwise); a classifier's trained router file too.
    +-inf thresholds are written as the strings "inf"/"-inf" (JSON has no infinities)."""
    kind = policy_class(kind).kind
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
        record["router_file"] = where(router_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


class Answers(list):
    """A list of answers, one per request, with ``stats``: what this call served and cost
    (``PolicyStats.as_dict()`` of this call alone: requests, served per member, FLOPs, ...)."""

    def __init__(self, answers: Sequence[Any], stats: dict[str, Any]):
        super().__init__(answers)
        self.stats = stats


@dataclass
class PolicyServer:
    """A loaded policy serving the request types the search scored: ``generate`` (greedy),
    ``loglikelihood`` of continuations, and ``choose`` (multiple choice, by log-likelihood).
    Each returns ``Answers``: the results, with this call's statistics in ``.stats``."""

    policy: PolicyLM
    kind: str
    params: dict[str, Any]

    def _serve(self, request_type: str, requests: list[Any]) -> Answers:
        self.policy.stats.reset()  # statistics are per call
        results = getattr(self.policy, request_type)(requests)
        stats = self.policy.stats.as_dict()
        self.policy.stats.reset()
        return Answers(results, stats)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32,
                 until: Sequence[str] | str | None = ("\n",)) -> Answers:
        from lm_eval.api.instance import Instance

        stops = [until] if isinstance(until, str) else list(until or [])
        kwargs = {"until": stops, "max_gen_toks": int(max_new_tokens), "do_sample": False}
        requests = [Instance("generate_until", {}, (prompt, dict(kwargs)), i, ("generate", i, 1))
                    for i, prompt in enumerate(prompts)]
        return self._serve("generate_until", requests)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> Answers:
        """(log-probability of the continuation after the context, whether it is the greedy one) per pair."""
        from lm_eval.api.instance import Instance

        requests = [Instance("loglikelihood", {}, (context, continuation), 0, ("loglikelihood", i, 1))
                    for i, (context, continuation) in enumerate(pairs)]
        return self._serve("loglikelihood", requests)

    def choose(self, questions: Sequence[tuple[str, Sequence[str]]]) -> Answers:
        """Multiple choice as lm-eval's ``acc`` scores it: per (context, choices), the index of the
        choice with the highest log-likelihood. The choices of a question go to one member together
        (a cascade escalates on the margin of its best two), as in the search."""
        from lm_eval.api.instance import Instance

        requests, owner = [], []
        for q, (context, choices) in enumerate(questions):
            if not choices:
                raise ValueError(f"choose: question {q} has no choices")
            for c, choice in enumerate(choices):
                requests.append(Instance("loglikelihood", {}, (context, choice), c, ("choose", q, 1)))
                owner.append(q)
        served = self._serve("loglikelihood", requests)
        scores: dict[int, list[float]] = {}
        for q, (logprob, _) in zip(owner, served):
            scores.setdefault(q, []).append(logprob)
        return Answers([max(range(len(s)), key=s.__getitem__) for _, s in sorted(scores.items())], served.stats)


def policy_file(path: str | os.PathLike) -> Path:
    """The policy file of an export folder (``folder/policy.json``), or the file itself."""
    path = Path(path)
    if path.is_dir():
        if not (path / "policy.json").is_file():
            raise ConfigError(f"{path}: neither a policy.json nor a model's config.json in this folder "
                              f"(expected an evomerge export folder)")
        return path / "policy.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no such policy file or export folder")
    return path


def read_policy(path: str | os.PathLike) -> tuple[dict[str, Any], list[Path], list[Path] | None]:
    """A policy file's record, its member folders and its scorer folders (None: no scorers),
    the folders resolved against the file's folder."""
    path = policy_file(path)
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise ValueError(f"{path}: not an {FORMAT} file of version {VERSION}")
    scorers = record.get("scorers")
    return (record, [path.parent / f for f in record["members"]],
            [path.parent / f for f in scorers] if scorers is not None else None)


def load(path: str | os.PathLike, device: str = "cpu", batch_size: int | str = 16) -> PolicyServer:
    """Load an export folder or a policy file with its member (and scorer) models: a folder's
    ``policy.json`` when it has one, else the folder's model served alone (kind ``model``: a
    merged, MoE or layer-path export). A blend served this way sends a prompt to the member its
    prompt and seed draw, wherever the prompt stands in a call and however often it repeats."""
    path = Path(path)
    if path.is_dir() and not (path / "policy.json").is_file() and (path / "config.json").is_file():
        alone = Member.from_folder(path, name="merged", device=device, batch_size=batch_size)
        return PolicyServer(Blend([alone]), "model", {})
    record, member_folders, scorer_folders = read_policy(path)

    def members(folders: list[Path]) -> list[Member]:
        return [Member.from_folder(folder, device=device, batch_size=batch_size) for folder in folders]

    scorers = members(scorer_folders) if scorer_folders is not None else None
    params = _decode(record["params"])
    router = TrainedRouter.load(policy_file(path).parent / record["router_file"]) if "router_file" in record else None
    policy = make_policy(record["kind"], members(member_folders), params, record.get("seed", 0), scorers, router)
    if isinstance(policy, Blend):
        policy.per_prompt = True
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
