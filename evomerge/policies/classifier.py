"""Classifier router (RouteLLM's classifier routers, arXiv 2406.18665, generalised to N members):
a small model the run trains itself predicts, from the prompt alone, each source member's
probability of answering correctly; the member with the best predicted quality minus
``cost_weight`` times its relative cost serves the request.

Features: character n-grams (1 to 3) of the prompt, hashed (zlib.crc32, the same on every
machine) into ``dim`` buckets, counts scaled to unit length. No model the run holds is run to
route: the features cost no forward pass (docs/design.md, "Routing that learns", measured a
base-model hidden state against them).

Model: one linear layer, ``dim`` inputs, one output per labelled member, a sigmoid on each
(a member's correctness is its own yes/no question: several members may be right). Trained
full-batch with Adam from zero weights on binary cross-entropy plus weight decay: no random
draw anywhere, so the same labels give the same router.

Members without labels (``merged``: it changes with every candidate, so labels learned once
cannot describe it) get the ``threshold`` gene as their predicted quality: the merged model
serves a prompt unless some source is predicted to be right with a probability above it.

Cost: ``relative cost`` of a member is its FLOPs per token over the largest member's; the
router's own FLOPs per unit are its matrix product, ``2 * dim * outputs`` (hashing the
n-grams is counted as nothing: no multiply-add).

The router file is safetensors (``weight``, ``bias``) with its settings as metadata
(``members``: the labelled member names, ``dim``, ``ngrams``), so an export is self-contained.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from evomerge.policies.base import PolicyLM, Unit
from evomerge.policies.members import Member

__all__ = ["ClassifierRouter", "TrainedRouter", "text_features", "train_router", "ROUTER_FILE"]

ROUTER_FILE = "router.safetensors"
DIM = 4096
NGRAMS = (1, 3)
KEPT_MAX = 1 << 16  # distinct prompts whose prediction a router keeps; past that it starts again


def text_features(texts: Sequence[str], dim: int = DIM, ngrams: tuple[int, int] = NGRAMS) -> torch.Tensor:
    """Hashed character n-gram counts of each text, each row of unit length (``[len(texts), dim]``)."""
    low, high = ngrams
    flat: list[int] = []  # row * dim + bucket of every n-gram, counted at once below
    for r, text in enumerate(texts):
        data, offset = text.encode("utf-8"), r * dim
        flat.extend(offset + zlib.crc32(data[i:i + n]) % dim
                    for n in range(low, high + 1) for i in range(len(data) - n + 1))
    counts = torch.bincount(torch.tensor(flat, dtype=torch.long), minlength=len(texts) * dim)
    return torch.nn.functional.normalize(counts.view(len(texts), dim).float(), dim=1)


@dataclass
class TrainedRouter:
    """Predicts each labelled member's probability of a correct answer from a prompt."""

    members: list[str]  # the labelled members, in the order of the outputs
    weight: torch.Tensor  # [outputs, dim]
    bias: torch.Tensor  # [outputs]
    ngrams: tuple[int, int] = NGRAMS
    _kept: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def flops_per_prompt(self) -> int:
        """Multiply-adds of one prediction, counted as 2 FLOPs each (dense, as computed)."""
        return 2 * self.weight.numel()

    def predict(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), outputs]`` probabilities. A worker asks the same prompts of candidate after
        candidate: each distinct text is predicted once and kept (its FLOPs are still charged to
        every request, as a server answering it afresh would spend them)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._kept))
        if todo:
            if len(self._kept) + len(todo) > KEPT_MAX:
                self._kept.clear()
            rows = torch.sigmoid(text_features(todo, self.dim, self.ngrams) @ self.weight.T + self.bias)
            self._kept.update(zip(todo, rows))
        if not texts:
            return torch.zeros(0, len(self.members))
        return torch.stack([self._kept[t] for t in texts])

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(tmp),
                  metadata={"format": "evomerge-classifier-router", "members": json.dumps(self.members),
                            "ngrams": json.dumps(list(self.ngrams))})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainedRouter:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"classifier router: no router file at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "evomerge-classifier-router":
                raise ValueError(f"{path}: not an evomerge classifier router file")
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        return cls(json.loads(meta["members"]), weight, bias, tuple(json.loads(meta["ngrams"])))


def train_router(texts: Sequence[str], labels: torch.Tensor, members: Sequence[str], *, dim: int = DIM,
                 steps: int = 300, lr: float = 0.1, weight_decay: float = 1e-4) -> TrainedRouter:
    """Fit the router to ``labels`` (``[len(texts), len(members)]``, each in [0, 1]: a member's
    score on that document). Deterministic: zero start, full batch, no random draw."""
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.shape != (len(texts), len(members)):
        raise ValueError(f"classifier router: labels of shape {tuple(labels.shape)}, expected "
                         f"({len(texts)}, {len(members)})")
    if not texts:
        raise ValueError("classifier router: no training documents")
    x = text_features(texts, dim)
    weight = torch.zeros(len(members), dim, requires_grad=True)
    bias = torch.zeros(len(members), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = x @ weight.T + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            loss = loss + weight_decay * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
    return TrainedRouter(list(members), weight.detach().clone(), bias.detach().clone())


class ClassifierRouter(PolicyLM):
    """Routes each unit to ``argmax_m (quality_m - cost_weight * relative_cost_m)``, ties to the
    lowest member index; ``quality_m`` is the router's prediction for a labelled member and
    ``threshold`` for the others (``outputs[m] < 0``)."""

    kind = "classifier"
    params = ("outputs", "threshold", "cost_weight")
    takes_router = True

    # --- genes: `threshold` when a member has no labels (the merged model), then `cost_weight`
    # unless fixed; each gene is in [0, 1], mapped onto [0, 1] (a probability) and bounds.cost_weight

    @classmethod
    def genes(cls, policy: Any) -> list[tuple[str, float, float]]:
        """The policy genes of a `PolicyConfig` of this kind."""
        genes = []
        if "merged" in policy.members:
            genes.append(("threshold", 0.0, 1.0))
        if policy.cost_weight is None:
            genes.append(("cost_weight", *policy.bound("cost_weight")))
        return genes

    @classmethod
    def decode(cls, policy: Any, values: Sequence[float]) -> dict[str, Any]:
        """The params of a candidate from its policy genes (each in [0, 1])."""
        values = list(values)
        outputs, labelled = [], 0
        for name in policy.members:  # the router's outputs are the source members, in order
            outputs.append(-1 if name == "merged" else labelled)
            labelled += name != "merged"
        params: dict[str, Any] = {"outputs": outputs}
        if "merged" in policy.members:
            params["threshold"] = float(values.pop(0))
        if policy.cost_weight is None:
            low, high = policy.bound("cost_weight")
            params["cost_weight"] = low + float(values.pop(0)) * (high - low)
        else:
            params["cost_weight"] = float(policy.cost_weight)
        return params

    def __init__(self, members: Sequence[Member], router: TrainedRouter, outputs: Sequence[int],
                 threshold: float = 0.5, cost_weight: float = 0.0):
        super().__init__(members)
        outputs = [int(o) for o in outputs]
        if len(outputs) != len(self.members):
            raise ValueError(f"classifier: {len(outputs)} outputs for {len(self.members)} members")
        if any(o >= len(router.members) for o in outputs):
            raise ValueError(f"classifier: outputs {outputs} but the router has {len(router.members)}")
        if not any(o >= 0 for o in outputs):
            raise ValueError("classifier: no member has router labels (every output is -1)")
        for name, value in (("threshold", threshold), ("cost_weight", cost_weight)):
            if not math.isfinite(float(value)):
                raise ValueError(f"classifier: {name} must be finite, got {value!r}")
        self.router, self.outputs = router, outputs
        self.threshold, self.cost_weight = float(threshold), float(cost_weight)
        per_token = [member.cost.forward_flops(1) for member in self.members]
        self.relative_cost = torch.tensor([c / max(per_token) for c in per_token])

    @classmethod
    def build(cls, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
              scorers: Sequence[Member] | None = None, router: TrainedRouter | None = None) -> ClassifierRouter:
        if router is None:
            raise ValueError(f"policy {cls.kind}: needs its trained router (policy.router_file, or the run's "
                             f"router_training/{ROUTER_FILE})")
        if "outputs" not in params:
            raise ValueError(f"policy {cls.kind}: parameter outputs is required")
        return cls(members, router, params["outputs"], params.get("threshold", 0.5), params.get("cost_weight", 0.0))

    def member_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), members]``: predicted quality minus cost_weight x relative cost."""
        predicted = self.router.predict(texts)
        quality = torch.full((len(texts), len(self.members)), self.threshold)
        for m, o in enumerate(self.outputs):
            if o >= 0:
                quality[:, m] = predicted[:, o]
        return quality - self.cost_weight * self.relative_cost

    def route(self, units: list[Unit], request_type: str) -> tuple[list[int], list[int]]:
        scores = self.member_scores([unit.text for unit in units])
        # first maximum: ties go to the lowest member index
        choice = [int(torch.nonzero(row == row.max())[0]) for row in scores]
        return choice, [self.router.flops_per_prompt] * len(units)
