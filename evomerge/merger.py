"""Merges recipes into one preallocated model, in place, from source weights loaded once.

The merger holds the base's and the experts' parameters (same names as the model's
`named_parameters()`, so tied embeddings appear once) on the model's device. `merge_into`
writes every parameter of the model from the recipe; buffers keep the base's values.
The same code serves the workers (one merge per candidate) and `export`.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Protocol, Sequence

import torch

from evomerge.config import ModelsConfig
from evomerge.errors import MergeError
from evomerge.merge import get_method
from evomerge.sources import load_model


class TensorRecipe(Protocol):
    """What the merger reads: a method name and its keyword arguments per tensor (a `Recipe`, or
    the `MergePlan` of a mergekit config)."""

    method: str

    def for_tensor(self, name: str) -> dict[str, Any]: ...


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed for random-drop methods: same run seed and name -> same masks."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a model's parameters (tied weights once), as merge sources."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


class Merger:
    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], seed: int):
        self.base = dict(base)
        self.experts = [dict(expert) for expert in experts]
        self.seed = seed

    @torch.inference_mode()
    def merge_into(self, model: torch.nn.Module, recipe: TensorRecipe) -> None:
        """Overwrite every parameter of `model` with the recipe's merge. Raises MergeError naming a tensor."""
        method = get_method(recipe.method)
        for name, param in model.named_parameters():
            if name not in self.base:
                raise MergeError(f"tensor {name!r}: in the model but not in the sources")
            try:
                merged = method.fn(self.base[name], [expert[name] for expert in self.experts],
                                   seed=tensor_seed(self.seed, name), **recipe.for_tensor(name))
            except MergeError as exc:
                raise MergeError(f"tensor {name!r}: {exc}") from None
            if not torch.isfinite(merged).all():
                raise MergeError(f"tensor {name!r}: merge produced non-finite values")
            param.copy_(merged)


def load_merge_target(models: ModelsConfig, seed: int, device: torch.device) -> tuple[torch.nn.Module, Merger]:
    """The base loaded as the model to merge into, and a merger holding every source's parameters."""
    model = load_model(models.base, models, device)
    experts = []
    for path in models.experts:
        expert = load_model(path, models, device)
        experts.append({name: p.detach() for name, p in expert.named_parameters()})
        del expert
    return model, Merger(parameters_of(model), experts, seed=seed)
