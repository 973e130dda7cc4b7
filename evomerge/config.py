"""One run's configuration: frozen pydantic models, loaded from YAML with every error at once.

`load_config(path, overrides)` reads the YAML safely, applies `a.b=value` overrides, validates
every field, resolves relative paths against the config file's folder and checks that the
model folders and task folders exist. All problems are reported together in one ConfigError
whose message is one line: `file: field: problem; field: problem`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.merge import METHODS, get_method
from evomerge.merge.registry import GENES
from evomerge.policies import POLICIES

logger = logging.getLogger(__name__)

NO_POLICY = "none"  # policy.kind of a candidate served by its merged model alone
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _once(values: list[Any], what: str) -> list[Any]:
    """`values` when none repeats, else a ValueError naming `what` repeats."""
    if len(set(values)) != len(values):
        raise ValueError(f"each {what} once (got {values})")
    return values


def _member_names(members: list[str]) -> list[str]:
    """`members` when each is merged, base or expert:I (a policy's or a layer path's models)."""
    for member in members:
        if not (member in ("merged", "base") or re.fullmatch(r"expert:\d+", member)):
            raise ValueError(f"expected merged, base or expert:I (got {member!r})")
    return members


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Bounded(_Frozen):
    """A block whose genes have search bounds: `bounds` overrides `DEFAULT_BOUNDS` gene by gene, each
    [low, high] with finite low < high and the gene's own rule (`_gene_bounds`)."""

    DEFAULT_BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {}

    @field_validator("bounds", check_fields=False)
    @classmethod
    def _bounds(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for gene, (low, high) in value.items():
            if gene not in cls.DEFAULT_BOUNDS:
                raise ValueError(f"{gene}: unknown gene; expected one of: {', '.join(cls.DEFAULT_BOUNDS)}")
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ValueError(f"{gene}: expected [low, high] with finite low < high (got [{low}, {high}])")
            problem = cls._gene_bounds(gene, low, high)
            if problem:
                raise ValueError(f"{gene}: {problem} (got [{low}, {high}])")
        return value

    @classmethod
    def _gene_bounds(cls, gene: str, low: float, high: float) -> str | None:
        """What is wrong with finite bounds low < high of `gene`, or None."""
        return None

    def bound(self, gene: str) -> tuple[float, float]:
        return tuple(self.bounds.get(gene, self.DEFAULT_BOUNDS[gene]))  # type: ignore[attr-defined, return-value]


class ModelsConfig(_Frozen):
    base: str = Field(min_length=1)
    experts: list[str] = Field(min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False
    check_finite: bool = True  # read every source tensor once before the search and refuse NaN/inf

    @property
    def sources(self) -> list[str]:
        """Base first, then the experts in config order."""
        return [self.base, *self.experts]

    @property
    def by_member_name(self) -> dict[str, str]:
        """Source paths by policy member name: `base`, `expert:0`, `expert:1`, ..."""
        return {"base": self.base, **{f"expert:{i}": path for i, path in enumerate(self.experts)}}


class MergeConfig(_Bounded):
    """How candidates are merged and which genes the search evolves.

    `modules` splits every group into one group per listed module kind (attention, mlp, norm,
    embed) plus `other` for the rest; `smooth: N` evolves N control points per gene across the
    layer groups (linearly interpolated, as mergekit's gradients) instead of one value per group;
    `gamma` (breadcrumbs) and `epsilon` (della) are fixed at mergekit's defaults unless given, or
    evolve within `bounds` when set to `evolve`.
    """

    DEFAULT_BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {name: spec.bounds for name, spec in GENES.items()}

    method: str = "task_arithmetic"  # a registered merge method (evomerge.merge.METHODS)
    granularity: str = "layer"
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    modules: list[Literal["attention", "mlp", "norm", "embed"]] | None = Field(default=None, min_length=1)
    smooth: int | None = Field(default=None, ge=2)
    gamma: float | Literal["evolve"] | None = None
    epsilon: float | Literal["evolve"] | None = None

    @field_validator("granularity")
    @classmethod
    def _granularity(cls, value: str) -> str:
        if value in ("global", "layer"):
            return value
        match = re.fullmatch(r"block:(\d+)", value)
        if match and int(match.group(1)) >= 1:
            return value
        raise ValueError(f"expected one of: global, layer, block:N with N >= 1 (got {value!r})")

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown merge method {value!r}; expected one of: {', '.join(METHODS)}")
        return value

    @classmethod
    def _gene_bounds(cls, gene: str, low: float, high: float) -> str | None:
        valid_low, valid_high, closed = GENES[gene].valid
        if not (valid_low <= low and (high <= valid_high if closed else high < valid_high)):
            return f"expected bounds within {GENES[gene].describe_valid()}"
        if gene == "density" and low <= 0.0:
            return "expected low > 0"
        return None

    @field_validator("gamma", "epsilon", mode="before")
    @classmethod
    def _number_or_evolve(cls, value: Any) -> Any:
        if value is None or value == "evolve" or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        raise ValueError(f"expected a number or 'evolve' (got {value!r})")

    @field_validator("modules")
    @classmethod
    def _modules(cls, value: list[str] | None) -> list[str] | None:
        return _once(value, "module kind") if value is not None else value

    @model_validator(mode="after")
    def _options_fit_method(self) -> MergeConfig:
        if self.method not in METHODS:  # reported by _method
            return self
        for gene in ("gamma", "epsilon"):
            value = getattr(self, gene)
            users = [m.name for m in METHODS.values() if gene in m.fixed]
            if value is not None and gene not in get_method(self.method).fixed:
                raise ValueError(f"{gene}: only {' and '.join(users)} use {gene} (merge.method is {self.method})")
            if isinstance(value, float) and not GENES[gene].accepts(value):
                raise ValueError(f"{gene}: expected a value in {GENES[gene].describe_valid()} or 'evolve' "
                                 f"(got {value})")
        if self.smooth is not None and self.granularity == "global":
            raise ValueError("smooth: interpolates across layer groups; set merge.granularity to layer or block:N "
                             "(got global)")
        return self

    def fixed_genes(self) -> dict[str, float]:
        """Values of this method's fixed genes that do not evolve (gamma, epsilon), by name."""
        return {gene: (GENES[gene].default if getattr(self, gene) is None else getattr(self, gene))
                for gene in get_method(self.method).fixed if getattr(self, gene) != "evolve"}

    def evolved_extra_genes(self) -> tuple[str, ...]:
        """This method's fixed genes that evolve after all (set to `evolve`)."""
        return tuple(gene for gene in get_method(self.method).fixed if getattr(self, gene) == "evolve")


class TaskSpec(_Frozen):
    name: str = Field(min_length=1)
    metric: str = Field(min_length=1)
    weight: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    filter: str = "none"
    higher_is_better: bool | None = None  # None: take lm-eval's own direction for the metric


class SubsampleConfig(_Frozen):
    """Cheaper fitness by successive halving over documents (evomerge/racing.py): each generation's
    candidates are scored on the first `fraction` x `eval.limit` documents of every task (the same
    documents for all), and the best `promote` share of them again on the full `eval.limit`."""

    fraction: float = Field(default=0.25, gt=0.0, lt=1.0, allow_inf_nan=False)
    promote: float = Field(default=0.5, gt=0.0, le=1.0, allow_inf_nan=False)


class EstimateConfig(_Frozen):
    """Cheaper fitness by estimation (evomerge/estimate.py): each candidate is scored on `anchors`
    documents per task (a count, or a fraction of the task's documents below 1), chosen from the
    full results of the references (and, with `refit`, of every earlier generation's full-limit
    candidates); its full quality is estimated (`method`: anchors = the weighted anchor mean; gp-irt
    = that mixed with an IRT estimate by `mix`, None: chosen by leaving each fitted model out; genome
    = a per-document model over the genome of the fully evaluated candidates, with the anchors where it
    is least sure, gp-irt until three candidates are fully evaluated), and the best `promote` share by
    estimate is scored on the full `eval.limit`."""

    anchors: float = Field(default=0.1, gt=0.0, allow_inf_nan=False)
    promote: float = Field(default=0.25, gt=0.0, le=1.0, allow_inf_nan=False)
    refit: bool = True
    method: Literal["anchors", "gp-irt", "genome"] = "genome"
    mix: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("anchors")
    @classmethod
    def _count_or_fraction(cls, value: float) -> float:
        if value >= 1.0 and value != int(value):
            raise ValueError(f"expected a whole number of documents (>= 1) or a fraction below 1, got {value}")
        return int(value) if value >= 1.0 else value


class EvalConfig(_Frozen):
    include_path: list[str] = Field(default_factory=list)
    tasks: list[TaskSpec] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    subsample: SubsampleConfig | None = None  # None: every candidate on the full limit
    estimate: EstimateConfig | None = None  # None: no estimated fitness (evomerge/estimate.py)

    @field_validator("include_path", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else ([] if value is None else value)

    @model_validator(mode="after")
    def _unique_tasks(self) -> EvalConfig:
        names = [task.name for task in self.tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"tasks: each task once (repeated: {', '.join(map(_shown, duplicates))})")
        if self.subsample is not None and self.estimate is not None:
            raise ValueError("subsample and estimate: give one of them (both cut the cost of scoring a candidate)")
        if self.subsample is not None and self.limit is not None and self.subset_limit >= self.limit:
            raise ValueError(f"subsample: fraction {self.subsample.fraction} of limit {self.limit} leaves "
                             f"{self.subset_limit} documents per task, expected fewer than the limit")
        return self

    @property
    def subset_limit(self) -> int | float | None:
        """lm-eval's `limit` for the subset: ceil(fraction x limit) documents per task; with no limit, the
        fraction itself (lm-eval then takes the first ceil(fraction x n) of each task's n documents)."""
        if self.subsample is None:
            return None
        if self.limit is None:
            return self.subsample.fraction
        return max(1, math.ceil(round(self.subsample.fraction * self.limit, 9)))


STRATEGIES = ("cma", "random", "nsga2", "tpe")


class SearchConfig(_Frozen):
    """How candidates are proposed. `cma` and `tpe` maximise quality; `nsga2` searches the front of
    quality vs FLOPs per example; `random` is the baseline. `tradeoffs` (cma only) runs one CMA-ES
    per weight w, each minimising -quality + w * log2(FLOPs per example): w is the quality a
    doubling of cost must buy. Absent: one CMA-ES on quality alone."""

    strategy: Literal["cma", "random", "nsga2", "tpe"] = "cma"
    population: int | None = Field(default=None, ge=2)  # None: CMA-ES default 4 + floor(3 ln n)
    generations: int = Field(default=10, ge=1)
    sigma0: float = Field(default=0.2, gt=0.0, le=1.0)  # cma: in the normalised [0, 1] box
    x0: float = Field(default=0.5, ge=0.0, le=1.0)  # cma: every gene starts here (normalised)
    tradeoffs: list[float] | None = Field(default=None, min_length=1)  # cma: one CMA-ES per weight
    references: bool = True  # evaluate the sources and the uniform merge in generation 0
    # steady: a strategy that allows it (random, nsga2, tpe) is asked for generation g + 1 before g
    # is told, and a worker g leaves idle starts on g + 1 at once; generation: each generation waits
    # for the last. cma always waits (it samples from what the last generation taught it), and so
    # does a run with eval.subsample (its rungs are per generation).
    dispatch: Literal["steady", "generation"] = "steady"
    # The search spaces in order: ps (parameter space: merge coefficients), dfs (data-flow space:
    # a layer path, see DataflowConfig); None: [dfs] when a dataflow block is given, else [ps].
    stages: list[Literal["ps", "dfs"]] | None = None

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and value not in (["ps"], ["dfs"], ["ps", "dfs"]):
            raise ValueError(f"expected [ps], [dfs] or [ps, dfs] (got {value})")
        return value

    @field_validator("tradeoffs")
    @classmethod
    def _tradeoffs(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return value
        if not all(math.isfinite(w) and w >= 0.0 for w in value):
            raise ValueError(f"expected finite weights >= 0 (got {value})")
        return _once(value, "weight")

    @model_validator(mode="after")
    def _tradeoffs_need_cma(self) -> SearchConfig:
        if self.tradeoffs is not None and self.strategy != "cma":
            raise ValueError(f"tradeoffs: only strategy cma scalarises over trade-offs; {self.strategy} "
                             f"takes none (remove search.tradeoffs)")
        return self


class PolicyConfig(_Bounded):
    """How a candidate serves requests: its merged model alone, or a policy over members.

    Members are `merged` (the candidate's merge), `base` and `expert:I` (a source model).
    A prefix router may score prompts with one small router model per member (`scorers`; `learned`:
    the run trains them, evomerge/router_lms.py).
    Policy genes follow the merge genes in the genome: blend one share per member, router
    `k` unless fixed, cascade one confidence threshold per escalation (mapped onto
    `bounds.threshold` for generation, the mean token log-prob, and `bounds.margin` for
    multiple choice, the margin between the best two choices).
    """

    kind: str = NO_POLICY  # NO_POLICY or a policy class's kind (evomerge.policies.POLICIES)
    members: list[str] = Field(default_factory=lambda: ["merged"], min_length=1)
    k: int | None = Field(default=None, ge=0)  # the prefix router's fixed prefix length (0: no routing); None: a gene
    # a policy that takes router models: one small model per member (folder or Hugging Face id)
    # that scores prompts in its place; `learned`: the run trains one per member from its router-training
    # documents (evomerge/router_lms.py); None: each member scores with its own model.
    scorers: list[str] | Literal["learned"] | None = None
    # a policy that takes a router the run trains (the classifier: evomerge/policies/classifier.py,
    # data: evomerge/router_data.py), trained on each source member's results on router-training
    # documents. `router_data`: task name -> a JSONL file of documents for a task whose YAML names no
    # training/validation split; `router_file`: a trained router file to use instead of training one (the
    # run sets it to its own); `cost_weight`: fixed weight of a member's relative cost (None: a gene,
    # `bounds.cost_weight`).
    router_data: dict[str, str] | None = None
    router_file: str | None = None
    cost_weight: float | None = Field(default=None, ge=0)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)

    DEFAULT_BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {
        "k": (1, 16), "threshold": (-3.0, 0.0), "margin": (0.0, 5.0), "cost_weight": (0.0, 1.0)}

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value != NO_POLICY and value not in POLICIES:
            raise ValueError(f"expected one of: {', '.join((NO_POLICY, *POLICIES))} (got {value!r})")
        return value

    @property
    def routes(self) -> bool:
        """Whether candidates serve through a policy (else the merged model alone)."""
        return self.kind != NO_POLICY

    @property
    def learns_scorers(self) -> bool:
        """Whether the run trains the policy's router models (`scorers: learned`) before any trial."""
        return self.scorers == "learned"

    @property
    def trains_router(self) -> bool:
        """Whether the policy's router (a classifier's, or router LMs) is trained by the run (before any trial)."""
        return self.routes and (POLICIES[self.kind].takes_router or self.learns_scorers)

    @field_validator("members")
    @classmethod
    def _members(cls, value: list[str]) -> list[str]:
        return _once(_member_names(value), "member")

    @model_validator(mode="after")
    def _kind_fits_members(self) -> PolicyConfig:
        if not self.routes and self.members != ["merged"]:
            raise ValueError("members: kind none serves the merged model alone; set policy.kind to route")
        if self.routes and len(self.members) < 2:
            raise ValueError(f"members: a {self.kind} policy needs two or more members")
        if self.scorers is not None:
            if not self.routes or not POLICIES[self.kind].takes_scorers:
                users = " or ".join(kind for kind, cls in POLICIES.items() if cls.takes_scorers)
                raise ValueError(f"scorers: only a {users} has scorers (kind is {self.kind})")
            if not self.learns_scorers and len(self.scorers) != len(self.members):
                raise ValueError(f"scorers: expected one per member ({len(self.members)}), got {len(self.scorers)}")
        users = " or ".join(kind for kind, cls in POLICIES.items() if cls.takes_router)
        if self.router_data is not None and not self.trains_router:
            learners = " or ".join(f"{kind} with scorers: learned" for kind, cls in POLICIES.items()
                                   if cls.takes_scorers)
            raise ValueError(f"router_data: only a {users} policy (or a {learners}) has it (kind is {self.kind})")
        for name, value in {"router_file": self.router_file, "cost_weight": self.cost_weight}.items():
            if value is not None and not (self.routes and POLICIES[self.kind].takes_router):
                raise ValueError(f"{name}: only a {users} policy has it (kind is {self.kind})")
        if self.trains_router and self.members.count("merged") == len(self.members):
            raise ValueError(f"members: a {self.kind} needs a source member (base or expert:I) to learn about")
        return self

    @classmethod
    def _gene_bounds(cls, gene: str, low: float, high: float) -> str | None:
        return "expected a prefix length of 0 or more" if gene == "k" and low < 0 else None


class MoeConfig(_Bounded):
    """Upcycle each candidate into a mixture of experts (evomerge/moe.py): attention, norms and
    embeddings from `attention` (`base`, or `merged`: the candidate's merge, whose genes then
    evolve too), one MLP expert per `models.experts` entry, routers from `gate_mode`.
    Genes: the router temperature (`bounds.temperature`) and, unless fixed,
    `experts_per_token` (`bounds.experts_per_token`)."""

    attention: Literal["base", "merged"] = "base"
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    prompts: list[list[str]] = Field(default_factory=list)  # positive prompts, one list per expert
    experts_per_token: int | None = Field(default=2, ge=1)  # None: a gene within bounds.experts_per_token
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)

    DEFAULT_BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {"experts_per_token": (1, 2), "temperature": (0.25, 4.0)}

    @model_validator(mode="after")
    def _fields_agree(self) -> MoeConfig:
        low, high = self.bound("temperature")
        if low <= 0:
            raise ValueError(f"bounds.temperature: expected low > 0 (got {low})")
        low, high = self.bound("experts_per_token")
        if low < 1 or low != int(low) or high != int(high):
            raise ValueError(f"bounds.experts_per_token: expected whole numbers >= 1 (got [{low}, {high}])")
        return self


class DataflowConfig(_Bounded):
    """The data-flow space (evomerge/dataflow.py, Sakana AI arXiv 2403.13187): a path through the
    decoder layers of `models` (members `merged`, `base`, `expert:I`; the first gives embeddings,
    final norm and head), `repeats` passes over all their layers, one include gene per slot and,
    with `scaling`, one scale gene per slot for the hidden state fed to that layer."""

    models: list[str] | None = None  # None: base + experts; after a ps stage, merged + experts
    repeats: int = Field(default=1, ge=1)
    scaling: bool = True  # False: every scale is 1 (paths then export to a mergekit passthrough config)
    # first: the centre of the box is the first model's own path (see evomerge/dataflow.py);
    # none: every slot is kept when its gene is above 0.5 (Sakana's rule)
    start: Literal["first", "none"] = "first"
    generations: int | None = Field(default=None, ge=1)  # None: search.generations
    population: int | None = Field(default=None, ge=2)  # None: search.population
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)

    DEFAULT_BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {"scale": (0.5, 1.5)}

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("expected one or more of merged, base, expert:I (got [])")
        return _once(_member_names(value), "model")

    @classmethod
    def _gene_bounds(cls, gene: str, low: float, high: float) -> str | None:
        return "expected bounds with 0 <= low" if low < 0 else None


class WorkersConfig(_Frozen):
    count: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=1, gt=0)
    gpus_per_worker: float = Field(default=0, ge=0)
    ray_address: str | None = None


class TrackingConfig(_Frozen):
    """Log the run to experiment trackers (evomerge/tracking.py); nothing leaves the machine unless
    `tracking_uri` names a server."""

    report_to: list[Literal["mlflow"]] = Field(default_factory=list)
    tracking_uri: str | None = None  # default: sqlite:///RUN/mlflow.db (artifacts in RUN/mlflow-artifacts)
    experiment: str | None = None  # default: the run's name
    run_name: str | None = None  # default: the run directory's name


class RunConfig(_Frozen):
    name: str = Field(default="run", pattern=r"^[\w.-]+$")
    seed: int = Field(default=0, ge=0, lt=2**32)
    models: ModelsConfig
    merge: MergeConfig = Field(default_factory=MergeConfig)
    eval: EvalConfig
    search: SearchConfig = Field(default_factory=SearchConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    moe: MoeConfig | None = None  # set: every candidate is upcycled into a mixture of experts
    dataflow: DataflowConfig | None = None  # the data-flow space of a dfs stage (search.stages)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _method_fits_models(self) -> RunConfig:
        problem = get_method(self.merge.method).expert_count_problem(len(self.models.experts))
        if problem:
            raise ValueError(f"merge.method: {problem}")
        for member in self.policy.members:
            if member.startswith("expert:") and int(member.split(":")[1]) >= len(self.models.experts):
                raise ValueError(f"policy.members: {member} but there are {len(self.models.experts)} experts "
                                 f"(expert:0 to expert:{len(self.models.experts) - 1})")
        if self.moe is not None:
            self._moe_fits_models(self.moe, len(self.models.experts))
        self._stages_fit(len(self.models.experts))
        return self

    @property
    def stages(self) -> list[str]:
        """The search stages in order: search.stages, else [dfs] with a dataflow block, else [ps]."""
        if self.search.stages is not None:
            return list(self.search.stages)
        return ["dfs"] if self.dataflow is not None else ["ps"]

    @property
    def dataflow_models(self) -> list[str]:
        """The members whose layers a dfs path runs through (the first gives embeddings and head)."""
        if self.dataflow is not None and self.dataflow.models is not None:
            return list(self.dataflow.models)
        experts = [f"expert:{i}" for i in range(len(self.models.experts))]
        return ["merged", *experts] if self.stages[0] == "ps" else ["base", *experts]

    def _stages_fit(self, experts: int) -> None:
        if "dfs" not in self.stages:
            if self.dataflow is not None:
                raise ValueError(f"dataflow: search.stages is {self.stages}; add dfs to search it")
            return
        if self.dataflow is None:
            raise ValueError("dataflow: search.stages has dfs but there is no dataflow block "
                             "(e.g. dataflow: {repeats: 1})")
        for member in self.dataflow.models or []:
            if member.startswith("expert:") and int(member.split(":")[1]) >= experts:
                raise ValueError(f"dataflow.models: {member} but there are {experts} experts "
                                 f"(expert:0 to expert:{experts - 1})")
        if self.moe is not None:
            raise ValueError("moe: a dfs stage searches layer paths of dense models; remove moe or the dfs stage")
        if self.policy.routes:
            raise ValueError("policy.kind: a dfs stage serves its layer path alone; set policy.kind: none")

    def _moe_fits_models(self, moe: MoeConfig, experts: int) -> None:
        if moe.gate_mode != "random" and (not moe.prompts or any(not p or not all(p) for p in moe.prompts)):
            raise ValueError(f"moe.prompts: gate_mode {moe.gate_mode} needs a non-empty list of non-empty prompts "
                             f"per expert (or gate_mode: random)")
        if moe.gate_mode != "random" and len(moe.prompts) != experts:
            raise ValueError(f"moe.prompts: one list of prompts per expert, {experts} in models.experts "
                             f"(got {len(moe.prompts)})")
        if moe.experts_per_token is not None and moe.experts_per_token > experts:
            raise ValueError(f"moe.experts_per_token: at most the {experts} experts (got {moe.experts_per_token})")
        if moe.experts_per_token is None and moe.bound("experts_per_token")[1] > experts:
            raise ValueError(f"moe.bounds.experts_per_token: at most the {experts} experts "
                             f"(got {list(moe.bound('experts_per_token'))})")
        if self.policy.routes:
            raise ValueError("policy.kind: a moe run serves the mixture alone; set policy.kind: none")

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override, validate and resolve a config file; raise one ConfigError listing all problems."""
    path = Path(path)
    raw = read_yaml(path)
    for override in overrides:
        apply_override(raw, override)
    config = validate(raw, source=_shown(str(path)))
    for warning in ignored_settings(raw):
        logger.warning("%s: %s", _shown(str(path)), warning)
    return resolve_paths(config, path.resolve().parent, source=_shown(str(path)))


CMA_ONLY = ("sigma0", "x0")  # settings only CMA-ES reads (tradeoffs is refused outside cma)


def ignored_settings(raw: dict[str, Any]) -> list[str]:
    """Settings the config gives that its strategy ignores (each one line, for a warning)."""
    search = raw.get("search") if isinstance(raw.get("search"), dict) else {}
    strategy = search.get("strategy", "cma")
    warnings = [f"search.{name}: set to {search[name]!r}, but strategy {strategy} ignores it (CMA-ES settings)"
                for name in CMA_ONLY if name in search and strategy != "cma"]
    if search.get("dispatch") == "steady" and strategy == "cma":
        warnings.append("search.dispatch: steady is ignored by strategy cma (each generation waits for the last)")
    return warnings


def read_yaml(path: Path) -> dict[str, Any]:
    name = _shown(str(path))
    if not path.exists():
        raise ConfigError(f"{name}: no such config file")
    if path.is_dir():
        raise ConfigError(f"{name}: is a directory, expected a YAML config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{name}:{where}: invalid YAML ({problem})") from None
    except RecursionError:
        raise ConfigError(f"{name}: invalid YAML (nested too deeply)") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{name}: cannot read ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a YAML mapping at the top level (got {type(raw).__name__})")
    return raw


def validate(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a raw mapping; every invalid field is reported at once, by its dotted name."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(f"{source}: {len(problems)} error(s): " + "; ".join(problems)) from None


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(_shown(str(part)) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        parent = _model_at(error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "?"
        return f"{field}: unknown key; expected one of: {allowed}"
    if error["type"] == "missing":
        return f"{field}: required field is missing"
    message, value = error["msg"].removeprefix("Value error, "), error.get("input")
    head, sep, rest = message.partition(": ")
    if error["type"] == "value_error" and sep and isinstance(value, dict) and head.split(".")[0] in value:
        # a model or dict validator names the field inside its input (`tasks: ...`, `weight: ...`)
        field, message, value = (f"{field}.{head}" if error["loc"] else head), rest, value.get(head)
    return f"{field}: {message} (got {_short(value)})" if "got" not in message else f"{field}: {message}"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: Any = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _shown(text: str) -> str:
    """A key or path as the message shows it: as is, or quoted with escapes where empty or not printable."""
    return text if text and text.isprintable() else repr(text)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected KEY=VALUE, e.g. search.generations=5")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {_shown(part)} is not a mapping")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"override {override!r}: invalid YAML value ({problem})") from None
    except RecursionError:
        raise ConfigError(f"override {override!r}: invalid YAML value (nested too deeply)") from None


def resolve_paths(config: RunConfig, folder: Path, source: str = "config") -> RunConfig:
    """Make model and include paths absolute (relative to the config's folder) and check they exist."""
    problems: list[str] = []
    base = _resolve_model(config.models.base, folder, "models.base", problems)
    experts = [
        _resolve_model(expert, folder, f"models.experts.{i}", problems)
        for i, expert in enumerate(config.models.experts)
    ]
    includes = []
    for i, include in enumerate(config.eval.include_path):
        resolved = (folder / include).resolve()
        if not resolved.is_dir():
            problems.append(f"eval.include_path.{i}: no such folder {str(resolved)!r}")
        includes.append(str(resolved))
    scorers = config.policy.scorers if config.policy.learns_scorers else None
    if config.policy.scorers is not None and not config.policy.learns_scorers:
        scorers = [_resolve_model(scorer, folder, f"policy.scorers.{i}", problems)
                   for i, scorer in enumerate(config.policy.scorers)]
    router_data = None
    if config.policy.router_data is not None:
        router_data = {task: str((folder / path).expanduser().resolve())
                       for task, path in config.policy.router_data.items()}
        problems += [f"policy.router_data.{task}: no such file {path!r}" for task, path in router_data.items()
                     if not Path(path).is_file()]
    router = config.policy.router_file
    if router is not None:
        router = str((folder / router).expanduser().resolve())
        if not Path(router).is_file():
            problems.append(f"policy.router_file: no such file {router!r}")
    if problems:
        raise ConfigError(f"{source}: {len(problems)} error(s): " + "; ".join(problems))
    models = config.models.model_copy(update={"base": base, "experts": experts})
    evals = config.eval.model_copy(update={"include_path": includes})
    policy = config.policy.model_copy(update={"scorers": scorers, "router_data": router_data, "router_file": router})
    return config.model_copy(update={"models": models, "eval": evals, "policy": policy})


def _resolve_model(value: str, folder: Path, field: str, problems: list[str]) -> str:
    """A local folder (resolved against the config folder) or a Hugging Face id `org/name`."""
    candidate = (folder / value).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            problems.append(f"{field}: folder {str(candidate.resolve())!r} has no config.json (not a model folder)")
        return str(candidate.resolve())
    if candidate.exists():
        problems.append(f"{field}: {str(candidate.resolve())!r} is a file, expected a model folder")
        return value
    # a folder-like path (or one whose first part is a local folder) is never looked up on the hub
    looks_local = (value.startswith((".", "/", "~")) or value.count("/") > 1 or value.endswith("/")
                   or ("/" in value and (folder / value.split("/")[0]).expanduser().is_dir()))
    if looks_local or not _HF_ID.match(value):
        problems.append(f"{field}: no such model folder {str(candidate.resolve())!r}")
    return value


def dump_config(config: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_yaml_dict(), sort_keys=False), encoding="utf-8")
