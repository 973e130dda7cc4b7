"""Inference-time policies over member models, as lm-eval LMs (see ``base`` for the design).

Each policy class owns its kind name, parameters, genes and their decoding (``POLICIES`` lists
them by kind):

* ``Blend`` (``blend``): params ``{"probs": [p_0, ...]}`` (non-negative, normalised; uniform if absent);
* ``PrefixRouter`` (``prefix_router``): params ``{"k": int}`` (optional ``scorers``: one router model
  per member);
* ``Cascade`` (``cascade``): params ``{"thresholds": [t_0, ..., t_{n-2}]}`` (members answer in the
  order given), or per request type ``{"thresholds": {"generate_until": [...], "loglikelihood": [...]}}``.

``make_policy(kind, members, params, seed)`` builds one; ``save_policy(path, kind, params,
member_folders)`` writes a small JSON file; ``load(path)`` loads the member folders and returns a
``PolicyServer`` whose ``generate(prompts)`` serves with that policy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evomerge.policies.base import PolicyLM
from evomerge.policies.blend import Blend
from evomerge.policies.cascade import Cascade
from evomerge.policies.members import Member
from evomerge.policies.metering import PolicyStats
from evomerge.policies.router import PrefixRouter

__all__ = ["POLICIES", "Member", "PolicyLM", "PolicyStats", "Blend", "PrefixRouter", "Cascade",
           "policy_class", "make_policy", "save_policy", "load", "PolicyServer"]

POLICIES: dict[str, type[PolicyLM]] = {cls.kind: cls for cls in (Blend, PrefixRouter, Cascade)}
FORMAT = "evomerge-policy"
VERSION = 1


def policy_class(kind: str) -> type[PolicyLM]:
    """The class of a policy kind (or of an older name of it)."""
    for cls in POLICIES.values():
        if kind == cls.kind or kind in cls.aliases:
            return cls
    raise ValueError(f"policy kind: unknown {kind!r}, expected one of {', '.join(POLICIES)}")


def make_policy(kind: str, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
                scorers: Sequence[Member] | None = None) -> PolicyLM:
    """A policy of ``kind`` over ``members`` (built once and reused: a policy holds no state
    but its ``stats``, which ``stats.reset()`` clears)."""
    cls = policy_class(kind)
    params = dict(params or {})
    unknown = set(params) - set(cls.params)
    if unknown:
        raise ValueError(f"policy {cls.kind}: unknown parameter(s) {', '.join(sorted(unknown))}")
    if scorers is not None and not cls.takes_scorers:
        raise ValueError(f"policy {cls.kind}: takes no scorers (router models)")
    return cls.build(members, params, seed, scorers)


def save_policy(path: str | os.PathLike, kind: str, params: dict[str, Any],
                member_folders: Sequence[str | os.PathLike], seed: int = 0,
                scorer_folders: Sequence[str | os.PathLike] | None = None) -> Path:
    """Write a policy file: kind, params, seed and the member folders (relative to the file's
    folder when they lie under it, absolute otherwise).  +-inf thresholds are written as
    the strings "inf"/"-inf" (JSON has no infinities)."""
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
    """Load a policy file written by ``save_policy`` with its member (and scorer) models; or an
    export folder: its ``policy.json`` when it has one, else the folder's model served alone
    (kind ``model``: a merged, MoE or layer-path export)."""
    path = Path(path)
    if path.is_dir() and not (path / "policy.json").is_file():
        alone = Member.from_folder(path, name="merged", device=device, batch_size=batch_size)
        return PolicyServer(Blend([alone]), "model", {})
    if path.is_dir():
        path = path / "policy.json"
    record, member_folders, scorer_folders = read_policy(path)

    def members(folders: list[Path]) -> list[Member]:
        return [Member.from_folder(folder, device=device, batch_size=batch_size) for folder in folders]

    scorers = members(scorer_folders) if scorer_folders is not None else None
    params = _decode(record["params"])
    policy = make_policy(record["kind"], members(member_folders), params, record.get("seed", 0), scorers)
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
