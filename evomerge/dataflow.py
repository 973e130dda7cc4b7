"""The data-flow space: a path of decoder layers through several models (Sakana AI, arXiv 2403.13187).

Akiba et al., "Evolutionary Optimization of Model Merging Recipes", section 3.2: the layers
of the M models used are laid end to end (M layers in all) and repeated r times, giving
T = M x r *slots*; an indicator per slot says whether that layer is on the path, and a
scaling matrix W in R^{M x M} scales the hidden state passed from one layer to the next
(W[i, j] when layer j follows layer i), which the paper found necessary because the
distribution shift between layers of different models hurts. Here the scale is **one
gene per slot** (the input of that layer when it is kept): for a given path every W
amounts to one scale per kept slot, so this is at least as expressive for that path, with
T genes instead of M^2 (W would tie slots that share a layer pair; ours does not).

    genome  = include[0..T-1] ++ scale[0..T-1]      (scale genes only with dataflow.scaling)
    slot t  = layer (t mod M) of the concatenated layer lists of dataflow.models
    kept    = include[t] > 0.5, in slot order       (dataflow.start: none, Sakana's rule)
              include[t] > 0.25 on the start path, > 0.75 elsewhere   (dataflow.start: first)
    path    = [(model, layer, scale), ...]

With `start: first` (the default) the start path is the first member's layers in the first
pass, so the centre of the box, where every search starts (search.x0 = 0.5, scales at the
middle of their bounds, 1.0 for the default [0.5, 1.5]), is the first member itself and the
search explores paths around it; with `none`, half the slots are on the path at random.

The first model gives the embeddings, the final norm and the head. `LayerPath` builds the
candidate in memory from the sources' own decoder-layer modules (no weight copies): a shell
of the first model's architecture whose layer list holds one `PathLayer` per step. A
`PathLayer` multiplies its input by the scale and, while its layer runs, points every
module with a `layer_idx` (the attention's key into the KV cache) at the step's position,
so a layer that occurs twice writes two cache entries; the shell's config says how many
layers the path has (`num_hidden_layers`, per-step `layer_types`), which is what
transformers sizes the cache and masks from. Rotary embeddings are the first model's
(computed once per forward by the shell and handed to every layer).

`materialize` writes the path out as an ordinary model of the first model's architecture
(every layer's weights copied). A scaled path folds its scales into the weights: with the
residual stream carried as u_j = c_j h_j, c_0 = 1, c_j = c_{j-1} / s_j, layer j's output
projections (attention out, MLP down) are multiplied by c_j; pre-norm layers see
norm(u / c) = norm(u), so the folded model computes the same function up to the norms'
epsilon. That needs pre-norm layers whose residual branches end in known projections
(`FOLDABLE`); unscaled paths export for any architecture, and also as a mergekit
`passthrough` config of `slices:` (`evomerge.merge.mergekit.passthrough_yaml`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from evomerge.errors import ModelMismatchError
from evomerge.genome import Recipe

INCLUDE_THRESHOLD = 0.5  # a slot is on the path when its include gene is above this (Sakana: > 0.5)
# dataflow.start: first: slots of the start path are kept above 0.5 - START_MARGIN, the others
# above 0.5 + START_MARGIN, so the centre of the box (x0 = 0.5) is the first member itself
START_MARGIN = 0.25
# model_type -> the output projections of the residual branches of one decoder layer
FOLDABLE: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen3": ("self_attn.o_proj", "mlp.down_proj"),
}


@dataclass(frozen=True)
class Step:
    """One layer on the path: layer `layer` of model `model` (index into the members), its input scaled."""

    model: int
    layer: int
    scale: float = 1.0


def path_of(dataflow: dict[str, Any]) -> list[Step]:
    """The steps of a recipe's `dataflow` entry."""
    return [Step(int(m), int(layer), float(s)) for m, layer, s in dataflow["path"]]


# --------------------------------------------------------------------------- the genome


@dataclass(frozen=True)
class DataflowLayout:
    """Unit box <-> a layer-path recipe over `members` (with `layers[i]` decoder layers each).

    Every decoded recipe carries `merge` as its merge part: what the `merged` member holds
    (the base itself in a dfs-only run, the parameter-space result after a ps stage).
    """

    members: tuple[str, ...]
    layers: tuple[int, ...]
    repeats: int
    scale_bounds: tuple[float, float] | None  # None: no scale genes, every scale is 1
    merge: Recipe
    start: tuple[int, ...] = ()  # slots of the start path (dataflow.start: first); () for none

    def threshold(self, t: int) -> float:
        """Slot t is kept when its include gene is above this."""
        if not self.start:
            return INCLUDE_THRESHOLD
        return INCLUDE_THRESHOLD - START_MARGIN if t in self.start else INCLUDE_THRESHOLD + START_MARGIN

    @property
    def slots(self) -> list[tuple[int, int]]:
        """(model, layer) of every slot: all layers of all members, `repeats` times."""
        one_pass = [(m, layer) for m, count in enumerate(self.layers) for layer in range(count)]
        return one_pass * self.repeats

    @property
    def size(self) -> int:
        return len(self.slots) * (2 if self.scale_bounds is not None else 1)

    def decode(self, x: Sequence[float], label: str | None = None) -> Recipe:
        """A point of the unit box -> the recipe of its path. Raises ValueError naming a bad index."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.size,):
            raise ValueError(f"genome: expected {self.size} values, got shape {tuple(x.shape)}")
        for index, value in enumerate(x):
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"genome[{index}] ({self._gene_name(index)}): expected a value in [0, 1], "
                                 f"got {float(value)!r}")
        slots = self.slots
        path = []
        for t, (model, layer) in enumerate(slots):
            if x[t] > self.threshold(t):
                scale = 1.0
                if self.scale_bounds is not None:
                    low, high = self.scale_bounds
                    scale = low + float(x[len(slots) + t]) * (high - low)
                path.append(Step(model, layer, scale))
        return self.recipe(path, label)

    def recipe(self, path: Sequence[Step], label: str | None = None) -> Recipe:
        """The recipe serving `path` (on top of this layout's merge)."""
        dataflow = {"models": list(self.members), "path": [[s.model, s.layer, s.scale] for s in path]}
        return Recipe(self.merge.method, self.merge.granularity, self.merge.num_layers, self.merge.params,
                      label, modules=self.merge.modules, dataflow=dataflow)

    def encode(self, path: Sequence[Step]) -> np.ndarray:
        """A genome whose decoding is `path` (steps in slot order; scales clipped into the bounds)."""
        slots, x = self.slots, np.zeros(self.size)
        if self.scale_bounds is not None:
            x[len(slots):] = 0.5
        t = 0
        for step in path:
            while t < len(slots) and slots[t] != (step.model, step.layer):
                t += 1
            if t == len(slots):
                raise ValueError(f"path: step {step} is not in slot order (or not in the {len(slots)} slots)")
            x[t] = 1.0
            if self.scale_bounds is not None:
                low, high = self.scale_bounds
                x[len(slots) + t] = min(1.0, max(0.0, (step.scale - low) / (high - low)))
            elif step.scale != 1.0:
                raise ValueError(f"path: scale {step.scale} but dataflow.scaling is off")
            t += 1
        return x

    def references(self) -> list[Recipe]:
        """Each member's own layers once, unscaled (labelled `path:MEMBER`); only the first member's
        is that member exactly (the others keep the first member's embeddings and head)."""
        return [self.recipe([Step(m, layer) for layer in range(self.layers[m])], label=f"path:{name}")
                for m, name in enumerate(self.members)]

    def _gene_name(self, index: int) -> str:
        slots = self.slots
        gene = "include" if index < len(slots) else "scale"
        model, layer = slots[index % len(slots)]
        return f"slot {index % len(slots)}/{self.members[model]} layer {layer}/{gene}"

    def describe(self) -> list[dict[str, Any]]:
        slots = self.slots
        rows = [{"index": t, "group": f"slot.{t}", "model": self.members[m], "layer": layer, "gene": "include",
                 "bounds": [0.0, 1.0]} for t, (m, layer) in enumerate(slots)]
        if self.scale_bounds is not None:
            rows += [{"index": len(slots) + t, "group": f"slot.{t}", "model": self.members[m], "layer": layer,
                      "gene": "scale", "bounds": list(self.scale_bounds)} for t, (m, layer) in enumerate(slots)]
        return rows


# --------------------------------------------------------------------------- the model


def layer_list_path(model: torch.nn.Module) -> str:
    """Dotted name of the ModuleList holding a causal LM's decoder layers (`model.layers` for
    Llama/Mistral/Qwen2, `transformer.h` for GPT-2, ...): the shortest-named ModuleList with
    `config.num_hidden_layers` entries."""
    count = getattr(model.config, "num_hidden_layers", None)
    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count and count]
    if not found:
        raise ModelMismatchError(f"{type(model).__name__}: no ModuleList of its {count} decoder layers; "
                                 f"the data-flow space needs one")
    return min(found, key=lambda name: (name.count("."), len(name)))


class PathLayer(torch.nn.Module):
    """Step `index` of a path: a source's decoder layer (shared, not copied) fed `scale * hidden_states`."""

    def __init__(self, layer: torch.nn.Module, index: int, scale: float):
        super().__init__()
        self.layer = layer
        self.index = index
        self.scale = scale
        self._indexed = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        saved = [m.layer_idx for m in self._indexed]
        for module in self._indexed:  # this step's own KV-cache entry, even for a repeated layer
            module.layer_idx = self.index
        try:
            if self.scale != 1.0:
                hidden_states = hidden_states * self.scale
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            for module, index in zip(self._indexed, saved):
                module.layer_idx = index


def check_models(models: Sequence[torch.nn.Module], names: Sequence[str]) -> None:
    """Refuse members whose layers cannot follow one another (naming the member and field)."""
    first = models[0].config
    for model, name in zip(models[1:], names[1:]):
        for key in ("model_type", "hidden_size"):
            if getattr(model.config, key, None) != getattr(first, key, None):
                raise ModelMismatchError(f"dataflow.models: {name} has config.{key} "
                                         f"{getattr(model.config, key, None)!r}"
                                         f" but {names[0]} has {getattr(first, key, None)!r}")


class LayerPath:
    """A causal LM whose decoder layers are a path through `models`; `set_path` rebuilds it in place.

    `model` is one object for the whole run (what an Evaluator wraps); its embeddings, final norm
    and head are the first model's modules and its layers the sources' own modules, so it follows
    any in-place change of the sources' weights (the `merged` member is merged per candidate).
    """

    def __init__(self, models: Sequence[torch.nn.Module], names: Sequence[str] | None = None):
        from transformers import AutoModelForCausalLM

        names = list(names or [f"model {i}" for i in range(len(models))])
        check_models(models, names)
        self.sources = list(models)
        self.where = layer_list_path(models[0])
        self.layers = [_get(m, layer_list_path(m)) for m in models]
        first = models[0]
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(copy.deepcopy(first.config))
        _graft(shell, first, self.where.split("."))
        self.model = shell
        self._layer_types = [getattr(m.config, "layer_types", None) for m in models]
        self._install([])  # drops the shell's own (meta) layers
        leftover = [name for name, p in [*shell.named_parameters(), *shell.named_buffers()] if p.is_meta]
        if leftover:
            raise ModelMismatchError(f"{type(first).__name__}: tensor {leftover[0]!r} lies outside the modules "
                                     f"the data-flow space shares with the first model")
        shell.generation_config = copy.deepcopy(first.generation_config)
        shell.eval()

    def set_path(self, path: Sequence[Step]) -> torch.nn.Module:
        """Point the model at `path` (the config follows: num_hidden_layers, layer_types). An empty
        path is refused: no model of the architecture has no layers, and none could be exported."""
        if not path:
            raise ValueError("dataflow: the path has no layers (no include gene above its threshold)")
        for i, step in enumerate(path):
            if not (0 <= step.model < len(self.layers) and 0 <= step.layer < len(self.layers[step.model])):
                raise ValueError(f"path[{i}]: no layer {step.layer} in model {step.model}")
            if not (math.isfinite(step.scale)):
                raise ValueError(f"path[{i}]: scale {step.scale} is not finite")
        return self._install(path)

    def _install(self, path: Sequence[Step]) -> torch.nn.Module:
        steps = torch.nn.ModuleList(PathLayer(self.layers[s.model][s.layer], i, s.scale) for i, s in enumerate(path))
        owner, _, attr = self.where.rpartition(".")
        setattr(_get(self.model, owner) if owner else self.model, attr, steps)
        config = self.model.config
        config.num_hidden_layers = len(path)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [types[s.layer] if types else "full_attention"
                                  for s in path for types in [self._layer_types[s.model]]]
        self.path: list[Step] = list(path)
        return self.model


def _get(module: torch.nn.Module, dotted: str) -> Any:
    for part in dotted.split(".") if dotted else []:
        module = getattr(module, part)
    return module


def _graft(shell: torch.nn.Module, source: torch.nn.Module, layers_at: list[str]) -> None:
    """Make `shell` share every module and tensor of `source` except the decoder-layer list."""
    for name, child in source.named_children():
        if name != layers_at[0]:
            setattr(shell, name, child)
        elif len(layers_at) > 1:
            _graft(getattr(shell, name), child, layers_at[1:])
    for name, param in source.named_parameters(recurse=False):
        shell._parameters[name] = param
    for name, buffer in source.named_buffers(recurse=False):
        shell._buffers[name] = buffer


# --------------------------------------------------------------------------- export


def materialize(flow: LayerPath) -> torch.nn.Module:
    """The current path as an ordinary model of the first model's architecture (layers copied,
    scales folded into the output projections; see the module docstring)."""
    from transformers import AutoModelForCausalLM

    first, path = flow.sources[0], flow.path
    scaled = any(step.scale != 1.0 for step in path)
    projections = FOLDABLE.get(first.config.model_type)
    if scaled and projections is None:
        raise ModelMismatchError(f"dataflow: a scaled path exports only for {', '.join(FOLDABLE)} layers "
                                 f"(got model_type {first.config.model_type!r}); search with dataflow.scaling: false")
    config = copy.deepcopy(flow.model.config)
    param = next(first.parameters())
    with torch.device(param.device):
        model = AutoModelForCausalLM.from_config(config, dtype=param.dtype).eval()
    target = _get(model, layer_list_path(model))
    outside = {name: tensor for name, tensor in first.state_dict().items()
               if not name.startswith(flow.where + ".")}
    missing = model.load_state_dict(outside, strict=False).missing_keys
    missing = [name for name in missing if not name.startswith(flow.where + ".")]
    if missing:
        raise ModelMismatchError(f"dataflow: tensor {missing[0]!r} of the exported model has no source")
    factor = 1.0
    with torch.no_grad():
        for index, step in enumerate(path):
            target[index].load_state_dict(flow.layers[step.model][step.layer].state_dict())
            factor /= step.scale
            if factor != 1.0:
                for dotted in projections or ():
                    for tensor in _get(target[index], dotted).parameters():
                        tensor.mul_(factor)
    model.generation_config = copy.deepcopy(first.generation_config)
    return model
