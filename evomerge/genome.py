"""A flat vector in the unit box <-> a merge recipe.

The search works in [0, 1]^n; `GenomeLayout.decode` maps each coordinate linearly onto its
gene's bounds. Genes are laid out group by group, then expert by expert, then gene by gene
(weight before density), so a layout reads like a table:

    group        expert  gene     index
    layers.0     0       weight   0
    layers.0     1       weight   1
    ...
    embed_head   1       weight   n-1

Groups follow `merge.granularity`: `global` (one group), `layer` (one per transformer layer),
`block:N` (N consecutive layers), each plus `embed_head` (embeddings, final norm, lm_head and
anything else outside the layer stack). Two options refine them (both absent: the layout above,
unchanged):

- `merge.modules` splits each group by module kind (`module_kind`: attention, mlp, norm, embed;
  unlisted kinds share `other`): `layers.3/attention`, `layers.3/other`, `embed_head/embed`...;
  only kinds the model has in that group get genes.
- `merge.smooth: N` evolves N control points `smooth.0` ... `smooth.N-1` instead of one value
  per layer group; layer group j of G takes the value at t = j / (G - 1), linearly interpolated
  between the control points as mergekit interpolates a gradient list. `embed_head` keeps its own
  genes.

A recipe holds the decoded value of every gene for every group (control points expanded), plus
the fixed extra genes (breadcrumbs' gamma, della's epsilon): plain data, JSON in the journal,
the input of the merger and of the mergekit export.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from evomerge.config import MoeConfig, PolicyConfig
from evomerge.errors import ConfigError, MergeError

EMBED_HEAD = "embed_head"
ALL = "all"
OTHER = "other"
SMOOTH = "smooth"
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

# Genes each method evolves per expert ("t" is one value per group: slerp has one expert).
# breadcrumbs' gamma and della's epsilon are added when they evolve (merge.gamma / merge.epsilon).
METHOD_GENES: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "slerp": ("t",),
    "breadcrumbs": ("weight", "density"),
    "breadcrumbs_ties": ("weight", "density"),
    "della": ("weight", "density"),
    "della_linear": ("weight", "density"),
    "model_stock": (),
    "nuslerp": ("weight",),
    "multislerp": ("weight",),
    "passthrough": ("scale",),
}
# della needs density +/- epsilon strictly inside (0, 1): epsilon is capped at this share of the room.
DELLA_EPSILON_ROOM = 0.99

# Module kinds by parameter-name component, checked in this order (a norm inside attention is a norm).
_NORM = re.compile(r"norm|^ln(?:_|\d|$)|_ln(?:_|\d|$)")
_EMBED = re.compile(r"embed|^lm_head$|^wte$|^wpe$")
_ATTENTION = re.compile(r"attn|attention")
_MLP = re.compile(r"mlp|feed_forward|ffn|^ff$|^fc_?(?:1|2|in|out)$|moe|^experts$|dense_h_to_4h|dense_4h_to_h")
_KIND_PATTERNS = (("norm", _NORM), ("embed", _EMBED), ("attention", _ATTENTION), ("mlp", _MLP))


def layer_index(name: str) -> int | None:
    """Index of the transformer layer a parameter belongs to (`model.layers.3.mlp...` -> 3)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str | None:
    """The kind of module a parameter belongs to: attention, mlp, norm, embed, or None.

    Read from the dotted name's components, so it covers the causal LMs transformers ships:
    `self_attn`/`attn`/`attention`/`self_attention`, `mlp`/`feed_forward`/`fc1`/`block_sparse_moe`,
    `*norm*`/`ln_*`, `embed_*`/`lm_head`/`wte`/`wpe`. Norms win over their parent (`self_attn.q_norm`
    is a norm).
    """
    parts = name.lower().split(".")
    for kind, pattern in _KIND_PATTERNS:
        if any(pattern.search(part) for part in parts):
            return kind
    return None


def module_group(name: str, modules: Sequence[str]) -> str:
    """The module sub-group of a parameter: its kind if listed in `modules`, else `other`."""
    kind = module_kind(name)
    return kind if kind in modules else OTHER


def group_names(granularity: str, num_layers: int) -> list[str]:
    if granularity == "global":
        return [ALL]
    size = 1 if granularity == "layer" else int(granularity.split(":")[1])
    groups = [_block_name(start, min(start + size, num_layers)) for start in range(0, num_layers, size)]
    return [*groups, EMBED_HEAD]


def _block_name(start: int, stop: int) -> str:
    return f"layers.{start}" if stop - start == 1 else f"layers.{start}-{stop - 1}"


def group_of(name: str, granularity: str, num_layers: int) -> str:
    """The group a parameter's coefficients come from."""
    if granularity == "global":
        return ALL
    index = layer_index(name)
    if index is None or index >= num_layers:
        return EMBED_HEAD
    size = 1 if granularity == "layer" else int(granularity.split(":")[1])
    start = index - index % size
    return _block_name(start, min(start + size, num_layers))


@dataclass(frozen=True)
class Recipe:
    """What to merge: a method, and per group the per-expert gene values."""

    method: str
    granularity: str
    num_layers: int
    params: dict[str, dict[str, list[float]]]  # group -> gene -> one value per expert (t: one value)
    label: str | None = None  # references: "base", "expert:1", "uniform"
    policy: dict[str, Any] | None = None  # {"kind", "members", "params"}; None: the merged model alone
    moe: dict[str, Any] | None = None  # {"experts_per_token", "temperature"}: upcycle the merge (evomerge/moe.py)
    modules: tuple[str, ...] | None = None  # merge.modules: groups are split as `group/kind`
    # {"models": [member, ...], "path": [[model, layer, scale], ...]}: serve a layer path through
    # the merge and the sources instead of the merge alone (evomerge/dataflow.py)
    dataflow: dict[str, Any] | None = None

    def group(self, name: str) -> str:
        """The group whose values a parameter tensor takes."""
        group = group_of(name, self.granularity, self.num_layers)
        return group if self.modules is None else f"{group}/{module_group(name, self.modules)}"

    def for_tensor(self, name: str) -> dict[str, Any]:
        """Keyword arguments for the merge method for one parameter tensor."""
        if not self.params:  # a method without genes (model_stock)
            return {}
        genes = self.params.get(self.group(name))
        if genes is None:
            raise MergeError(f"the recipe has no values for group {self.group(name)!r}")
        return {gene: (values[0] if gene == "t" else list(values)) for gene, values in genes.items()}

    def to_json(self) -> dict[str, Any]:
        data = {"method": self.method, "granularity": self.granularity, "num_layers": self.num_layers,
                "params": self.params}
        if self.label is not None:
            data["label"] = self.label
        if self.policy is not None:
            data["policy"] = self.policy
        if self.moe is not None:
            data["moe"] = self.moe
        if self.modules is not None:
            data["modules"] = list(self.modules)
        if self.dataflow is not None:
            data["dataflow"] = self.dataflow
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        modules = data.get("modules")
        return cls(method=data["method"], granularity=data["granularity"], num_layers=int(data["num_layers"]),
                   params={g: {k: [float(v) for v in vs] for k, vs in genes.items()}
                           for g, genes in data["params"].items()},
                   label=data.get("label"), policy=data.get("policy"), moe=data.get("moe"),
                   modules=tuple(modules) if modules is not None else None, dataflow=data.get("dataflow"))


@dataclass(frozen=True)
class Gene:
    group: str
    expert: int  # index into models.experts; 0 for slerp's t
    name: str
    low: float
    high: float


@dataclass(frozen=True)
class GenomeLayout:
    method: str
    granularity: str
    num_layers: int
    num_experts: int
    genes: tuple[Gene, ...] = field(repr=False)
    policy: PolicyConfig | None = None
    moe: MoeConfig | None = None
    modules: tuple[str, ...] | None = None  # merge.modules
    smooth: int | None = None  # merge.smooth: control points per gene across the layer groups
    fixed: dict[str, float] = field(default_factory=dict)  # extra genes that do not evolve (gamma, epsilon)

    @classmethod
    def build(cls, method: str, granularity: str, num_layers: int, num_experts: int,
              bounds: dict[str, tuple[float, float]], policy: PolicyConfig | None = None,
              moe: MoeConfig | None = None, *,
              modules: Sequence[str] | None = None, smooth: int | None = None,
              fixed: dict[str, float] | None = None, extra: Sequence[str] = (),
              parameter_names: Sequence[str] | None = None) -> GenomeLayout:
        """Lay out the genes. `extra`: evolved extra genes (gamma, epsilon); `fixed`: their values
        when they do not evolve; `parameter_names` (the model's) are needed with `modules`."""
        if method not in METHOD_GENES:
            raise ConfigError(f"merge.method: unknown {method!r}; expected one of: {', '.join(METHOD_GENES)}")
        per_expert = (*METHOD_GENES[method], *extra)
        experts = 1 if per_expert == ("t",) else num_experts
        modules = tuple(modules) if modules is not None else None
        groups = gene_groups(granularity, num_layers, modules, smooth, parameter_names)
        merge_genes = () if moe is not None and moe.attention == "base" else tuple(
            Gene(group, expert, gene, *bounds[gene])
            for group in groups
            for expert in range(experts)
            for gene in per_expert
        )
        genes = merge_genes + policy_genes(policy) + moe_genes(moe)
        if not genes:
            raise ConfigError(f"merge.method: {method} has no genes to evolve and there is no policy to search; "
                              f"expected a method with genes or a policy with genes")
        return cls(method, granularity, num_layers, num_experts, genes, policy, moe, modules, smooth,
                   dict(fixed or {}))

    @property
    def size(self) -> int:
        return len(self.genes)

    def decode(self, x: Sequence[float], label: str | None = None) -> Recipe:
        """Map a point of the unit box to a recipe. Raises ValueError naming a bad index or value."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.size,):
            raise ValueError(f"genome: expected {self.size} values, got shape {tuple(x.shape)}")
        params: dict[str, dict[str, list[float]]] = {}
        for index, (gene, value) in enumerate(zip(self.genes, x)):
            if not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"genome[{index}] ({gene.group}/{gene.name}/expert {gene.expert}): "
                                 f"expected a value in [0, 1], got {float(value)!r}")
            if gene.group in (POLICY, MOE):
                continue
            actual = gene.low + float(value) * (gene.high - gene.low)
            params.setdefault(gene.group, {}).setdefault(gene.name, []).append(actual)
        if self.smooth is not None:
            params = expand_control_points(params, group_names(self.granularity, self.num_layers)[:-1])
        params = complete_params(self.method, params, self.fixed, self.num_experts)
        policy_values = [float(v) for gene, v in zip(self.genes, x) if gene.group == POLICY]
        moe = decode_moe(self.moe, {g.name: float(v) for g, v in zip(self.genes, x) if g.group == MOE})
        if self.moe is not None and self.moe.attention == "base":  # attention etc. from the base itself
            return Recipe("task_arithmetic", "global", self.num_layers, {ALL: {"weight": [0.0] * self.num_experts}},
                          label, decode_policy(self.policy, policy_values), moe)
        return Recipe(self.method, self.granularity, self.num_layers, params, label,
                      decode_policy(self.policy, policy_values), moe, self.modules)

    def encode(self, recipe: Recipe) -> np.ndarray:
        """Inverse of decode for a recipe of this layout (values clipped into the box).

        Smooth layouts have no inverse (a recipe holds interpolated values, not control points).
        """
        if self.smooth is not None:
            raise ValueError("encode: a smooth layout's recipes hold interpolated values; they cannot be encoded")
        x = np.empty(self.size)
        counters: dict[tuple[str, str], int] = {}
        for index, gene in enumerate(self.genes):
            if gene.group in (POLICY, MOE):
                raise ValueError(f"encode: recipes with {gene.group} genes cannot be encoded")
            slot = counters.get((gene.group, gene.name), 0)
            counters[(gene.group, gene.name)] = slot + 1
            value = recipe.params[gene.group][gene.name][slot]
            x[index] = (value - gene.low) / (gene.high - gene.low)
        return np.clip(x, 0.0, 1.0)

    def describe(self) -> list[dict[str, Any]]:
        return [{"index": i, "group": g.group, "expert": g.expert, "gene": g.name, "bounds": [g.low, g.high]}
                for i, g in enumerate(self.genes)]


def gene_groups(granularity: str, num_layers: int, modules: tuple[str, ...] | None, smooth: int | None,
                parameter_names: Sequence[str] | None) -> list[str]:
    """The groups that carry genes, in layout order (see the module docstring)."""
    groups = group_names(granularity, num_layers)
    if smooth is not None:
        layer_groups = groups[:-1]
        if granularity == "global" or smooth > len(layer_groups):
            raise ConfigError(f"merge.smooth: {smooth} control points but {len(layer_groups)} layer group(s) "
                              f"({granularity}); expected at most {len(layer_groups)}")
        groups = [f"{SMOOTH}.{k}" for k in range(smooth)] + [EMBED_HEAD]
    if modules is None:
        return groups
    if parameter_names is None:
        raise ValueError("gene_groups: merge.modules needs the model's parameter names")
    kinds: dict[str, set[str]] = {}  # group -> module kinds of its tensors (all layer groups under smooth)
    for name in parameter_names:
        group = group_of(name, granularity, num_layers)
        for owner in ([f"{SMOOTH}.{k}" for k in range(smooth)] if smooth and group != EMBED_HEAD else [group]):
            kinds.setdefault(owner, set()).add(module_group(name, modules))
    return [f"{group}/{kind}" for group in groups for kind in (*modules, OTHER) if kind in kinds.get(group, ())]


def interpolate(controls: Sequence[float], t: float) -> float:
    """A gradient list's value at t in [0, 1], computed the way mergekit computes it."""
    scaled = t * (len(controls) - 1)
    i0 = int(scaled)
    i1 = min(len(controls) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * controls[i0] + frac * controls[i1]


def expand_control_points(params: dict[str, dict[str, list[float]]],
                          layer_groups: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Per-layer-group values from `smooth.k[/kind]` control points; other groups as they are.

    Layer group j of G sits at t = j / (G - 1) (t = 1 for a single group, as in mergekit).
    """
    controls: dict[str, list[dict[str, list[float]]]] = {}  # "" or "/kind" -> control points in order
    expanded: dict[str, dict[str, list[float]]] = {}
    for group, genes in params.items():
        if group.startswith(SMOOTH + "."):
            _, _, kind = group.partition("/")
            controls.setdefault(f"/{kind}" if kind else "", []).append(genes)
    count = len(layer_groups)
    for j, layer_group in enumerate(layer_groups):
        t = j / (count - 1) if count > 1 else 1.0
        for suffix, points in controls.items():
            expanded[layer_group + suffix] = {
                gene: [interpolate([point[gene][i] for point in points], t) for i in range(len(values))]
                for gene, values in points[0].items()
            }
    expanded.update({group: genes for group, genes in params.items() if not group.startswith(SMOOTH + ".")})
    return expanded


def complete_params(method: str, params: dict[str, dict[str, list[float]]], fixed: dict[str, float],
                    num_experts: int) -> dict[str, dict[str, list[float]]]:
    """Add the fixed extra genes to every group and cap della's epsilon inside its density's room.

    della refuses density +/- epsilon outside (0, 1) (for density < 1), so epsilon becomes
    min(epsilon, 0.99 * min(density, 1 - density)); the recipe holds the value that is used.
    """
    for genes in params.values():
        for gene, value in fixed.items():
            genes[gene] = [float(value)] * num_experts
        if method in ("della", "della_linear"):
            genes["epsilon"] = [eps if rho >= 1 else min(eps, DELLA_EPSILON_ROOM * min(rho, 1 - rho))
                                for eps, rho in zip(genes["epsilon"], genes["density"])]
    return params


POLICY = "policy"
POLICY_KINDS = {"blend": "blend", "prefix_router": "router", "cascade": "cascade",  # config -> evomerge.policies
                "classifier": "classifier"}


def policy_genes(policy: PolicyConfig | None) -> tuple[Gene, ...]:
    """Genes of a routing policy, appended after the merge genes (see PolicyConfig)."""
    if policy is None or policy.kind == "none":
        return ()
    if policy.kind == "blend":
        return tuple(Gene(POLICY, i, "share", 0.0, 1.0) for i in range(len(policy.members)))
    if policy.kind == "prefix_router":
        return () if policy.k is not None else (Gene(POLICY, 0, "k", *policy.bound("k")),)
    if policy.kind == "classifier":
        from evomerge.policies.classifier import ClassifierRouter

        return ClassifierRouter.genes(policy)
    return tuple(Gene(POLICY, i, "threshold", 0.0, 1.0) for i in range(len(policy.members) - 1))


def decode_policy(policy: PolicyConfig | None, values: list[float]) -> dict[str, Any] | None:
    """The policy of a candidate from its policy genes (each in [0, 1])."""
    if policy is None or policy.kind == "none":
        return None
    if policy.kind == "blend":
        total = sum(values)
        params: dict[str, Any] = {"probs": [v / total for v in values] if total > 0 else
                                  [1.0 / len(values)] * len(values)}
    elif policy.kind == "prefix_router":
        low, high = policy.bound("k")
        params = {"k": policy.k if policy.k is not None else int(round(low + values[0] * (high - low)))}
    elif policy.kind == "classifier":
        from evomerge.policies.classifier import ClassifierRouter

        params = ClassifierRouter.decode(policy, values)
    else:
        (t_low, t_high), (m_low, m_high) = policy.bound("threshold"), policy.bound("margin")
        params = {"thresholds": {"generate_until": [t_low + v * (t_high - t_low) for v in values],
                                 "loglikelihood": [m_low + v * (m_high - m_low) for v in values]}}
    return {"kind": POLICY_KINDS[policy.kind], "members": list(policy.members), "params": params}


MOE = "moe"


def moe_genes(moe: MoeConfig | None) -> tuple[Gene, ...]:
    """Genes of a mixture of experts, appended last: experts_per_token unless fixed, then temperature."""
    if moe is None:
        return ()
    count = () if moe.experts_per_token is not None else (Gene(MOE, 0, "experts_per_token",
                                                               *moe.bound("experts_per_token")),)
    return count + (Gene(MOE, 0, "temperature", *moe.bound("temperature")),)


def decode_moe(moe: MoeConfig | None, values: dict[str, float]) -> dict[str, Any] | None:
    """The mixture's settings from its genes (each in [0, 1]).

    experts_per_token: the whole numbers low..high in equal bins of the unit interval;
    temperature: log-uniform, low * (high / low) ** x, so x = 0.5 is the geometric middle
    (1.0 for the default [0.25, 4]).
    """
    if moe is None:
        return None
    count = moe.experts_per_token
    if count is None:
        low, high = (int(v) for v in moe.bound("experts_per_token"))
        count = min(high, low + int(values["experts_per_token"] * (high - low + 1)))
    low, high = moe.bound("temperature")
    return {"experts_per_token": count, "temperature": low * (high / low) ** values["temperature"]}


def reference_recipes(num_experts: int, num_layers: int) -> list[Recipe]:
    """The reference points of generation 0: the base, each expert, the uniform merge of the experts.

    Base is task arithmetic with all weights 0; expert i is a linear merge with one-hot weights
    (both reproduce the source exactly); uniform is the plain average of the experts.
    """
    zeros = [0.0] * num_experts
    recipes = [Recipe("task_arithmetic", "global", num_layers, {ALL: {"weight": zeros}}, label="base")]
    for i in range(num_experts):
        one_hot = [1.0 if j == i else 0.0 for j in range(num_experts)]
        recipes.append(Recipe("linear", "global", num_layers, {ALL: {"weight": one_hot}}, label=f"expert:{i}"))
    if num_experts > 1:
        recipes.append(Recipe("linear", "global", num_layers, {ALL: {"weight": [1.0] * num_experts}},
                              label="uniform"))
    return recipes
