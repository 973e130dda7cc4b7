"""Merges recipes into one preallocated model, in place, from source weights loaded once.

The merger holds the base's and the experts' parameters (same names as the model's
`named_parameters()`, so tied embeddings appear once). On the CPU they are memory-mapped
from the sources' safetensors files (`sources.source_parameters`): K sources of S bytes
cost no copy, and merging touches each source page once per merge. On a GPU they are
copied to the device once. `merge_into` writes every parameter of the model from the
recipe; buffers keep the base's values. The same code serves the workers (one merge per
candidate) and `export`.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch

from evomerge.config import ModelsConfig
from evomerge.errors import MergeError
from evomerge.merge import get_method
from evomerge.merge.prepared import Prepared
from evomerge.models.sources import load_model, source_parameters


class TensorRecipe(Protocol):
    """What the merger reads: a method name and its keyword arguments per tensor (a `Recipe`, or
    the `MergePlan` of a mergekit config)."""

    method: str

    def for_tensor(self, name: str) -> dict[str, Any]: ...


def tensor_seed(seed: int, name: str) -> int:
    """A stable per-tensor seed for random-drop methods: same run seed and name -> same masks."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class Merger:
    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], seed: int):
        self.base = dict(base)
        self.experts = [dict(expert) for expert in experts]
        self.seed = seed
        # Gene-free work of sparsifying methods (magnitude orders, DARE draws), kept across merges
        # when set (the workers set it: evomerge/merge/prepared.py); None: every merge from scratch.
        self.prepared: Prepared | None = None

    @torch.inference_mode()
    def merged(self, recipe: TensorRecipe, names: Sequence[str] | None = None,
               into: Mapping[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) for each name (default: every source tensor), one at a time;
        with `into`, each merge is written into `into[name]` (in place) and that tensor is yielded.

        Raises MergeError naming the tensor (missing from the sources, failed, or not finite).
        """
        method = get_method(recipe.method)
        for name in self.base if names is None else names:
            if name not in self.base:
                raise MergeError(f"tensor {name!r}: in the model but not in the sources")
            base, experts = self.base[name], [expert[name] for expert in self.experts]
            # with a store, an expert equal to the base bit for bit is passed as the base itself
            if self.prepared is not None and self.prepared.skip_unchanged:
                experts = [base if self.prepared.same_as_base(base, expert) else expert for expert in experts]
            try:
                keep = self.prepared is not None and self.prepared.keep_masks
                with self.prepared.active() if keep else contextlib.nullcontext():
                    merged = method.fn(base, experts,
                                       seed=tensor_seed(self.seed, name), out=None if into is None else into[name],
                                       **recipe.for_tensor(name))
            except MergeError as exc:
                raise MergeError(f"tensor {name!r}: {exc}") from None
            # A sum is finite when every entry is (checked entry by entry only when it is not:
            # an overflowing sum of finite entries is possible, if rare).
            if not torch.isfinite(merged.sum()) and not torch.isfinite(merged).all():
                raise MergeError(f"tensor {name!r}: merge produced non-finite values")
            yield name, merged

    @torch.inference_mode()
    def merge_into(self, model: torch.nn.Module, recipe: TensorRecipe) -> None:
        """Overwrite every parameter of `model` with the recipe's merge, in place (every method
        writes its result straight into the parameter). Raises MergeError naming a tensor."""
        params = {name: param.data for name, param in model.named_parameters()}
        for _ in self.merged(recipe, list(params), into=params):
            pass


def load_merge_target(models: ModelsConfig, seed: int, device: torch.device,
                      spread: bool = False) -> tuple[torch.nn.Module, Merger]:
    """The base loaded as the model to merge into, and a merger over every source's parameters.

    The model is the only full copy; the sources are memory-mapped where their files allow
    (see `sources.source_parameters`). With `spread` the model is split over the process's GPUs
    and each source tensor sits on its parameter's GPU, so every merge stays on one device
    (GPU-only branch).
    """
    model = load_model(models.base, models, device, spread=spread)
    params = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in params.items()}
    placement = {name: p.device for name, p in params.items()} if spread else None
    base, *experts = [source_parameters(path, shapes, models, device, placement) for path in models.sources]
    return model, Merger(base, experts, seed=seed)
