"""Registry of merge methods and the uniform, validating call wrapper around each of them.

Every registered method is called the same way::

    fn(base, experts, *, weight=None, density=None, gamma=None, epsilon=None, scale=None, t=None,
       seed=0, **options) -> Tensor

`weight`, `density`, `gamma`, `epsilon` and `scale` carry one value per expert (mergekit's
per-model parameters of the same names), `t` is one float (slerp). A method takes
exactly the genes it declares in `MergeMethod.genes`: a missing one, or one it does not declare,
is a `MergeError`. `seed` is always accepted and only used by methods with `random=True`.
`options` are the method's own keyword settings (e.g. `normalize`, `lambda_`, `rescale`); an
unknown option is a `MergeError`.

The wrapper validates shapes and genes, casts every input to the working dtype (float32 for
half / bfloat16 / 8-bit floats, the input's own dtype for float32 / float64) on base's device,
calls the method, and casts the result back to base's dtype. Inputs are never modified.

`out=` (a tensor of base's shape, e.g. a model's parameter) receives the result in place and is
returned. Methods registered with `streams=True` (evomerge/merge/chunked.py) are then called
with the inputs as they are, `out` and the working dtype `work`, and widen and write one slice
at a time: no full-size copy of any input and no new result tensor.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.errors import MergeError


@dataclass(frozen=True)
class GeneSpec:
    """What a gene is, wherever it is read: config bounds, genome layout, mergekit in and out."""

    name: str
    per_expert: bool  # one value per expert (mergekit's per-model parameter); else one value (shared)
    bounds: tuple[float, float]  # the search range when merge.bounds does not set one
    default: float | None  # mergekit's value when a config omits it; None: required
    valid: tuple[float, float, bool]  # (low, high, high included): the values a method accepts

    def accepts(self, value: float) -> bool:
        low, high, closed = self.valid
        return math.isfinite(value) and low <= value and (value <= high if closed else value < high)

    def describe_valid(self) -> str:
        low, high, closed = self.valid
        if math.isinf(high):
            return "a finite number"
        return f"[{low:g}, {high:g}" + ("]" if closed else ")")


_ANY = (-math.inf, math.inf, False)
GENES: dict[str, GeneSpec] = {spec.name: spec for spec in (
    GeneSpec("weight", True, (0.0, 1.5), None, _ANY),
    GeneSpec("density", True, (0.1, 1.0), 1.0, (0.0, 1.0, True)),  # (0, 1]: checked apart, density > 0
    GeneSpec("gamma", True, (0.0, 0.1), 0.01, (0.0, 1.0, True)),
    GeneSpec("epsilon", True, (0.0, 0.3), 0.15, (0.0, 0.5, False)),
    GeneSpec("scale", True, (0.5, 1.5), 1.0, _ANY),
    GeneSpec("t", False, (0.0, 1.0), None, (0.0, 1.0, True)),
)}
GENE_NAMES = tuple(GENES)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method; `fn` has the uniform signature described in the module doc."""

    name: str
    fn: Callable[..., torch.Tensor]
    genes: tuple[str, ...]  # per-expert values it takes, mergekit's per-model parameters ("t": one value)
    needs_base: bool  # works on task vectors (expert - base) rather than on the experts alone
    max_experts: int | None  # most experts the method can combine; None: any number
    min_experts: int  # fewest experts the method needs
    random: bool  # uses `seed`
    reference: str  # URL of the paper / reference
    streams: bool = False  # writes into `out` slice by slice (evomerge/merge/chunked.py)
    options: tuple[str, ...] = ()  # its own keyword settings (normalize, lambda_, rescale, ...), in order
    # genes a search holds at GENES[gene].default unless the config sets a value or `evolve`
    # (breadcrumbs' gamma, della's epsilon)
    fixed: tuple[str, ...] = ()
    # makes a recipe's decoded genes valid for the method (della: epsilon within density's room);
    # takes and returns {gene: one value per expert} of one group
    adjust: Callable[[dict[str, list[float]]], dict[str, list[float]]] | None = None

    @property
    def evolved(self) -> tuple[str, ...]:
        """The genes a search evolves by default, in the method's order."""
        return tuple(gene for gene in self.genes if gene not in self.fixed)

    @property
    def per_expert(self) -> bool:
        """Whether its genes carry one value per expert (slerp's t does not)."""
        return any(GENES[gene].per_expert for gene in self.genes) or not self.genes

    def expert_count_problem(self, count: int) -> str | None:
        """Why `count` experts do not fit the method, or None."""
        high = self.max_experts if self.max_experts is not None else count
        if self.min_experts <= count <= high:
            return None
        wanted = (f"exactly {self.min_experts}" if self.min_experts == self.max_experts
                  else f"at least {self.min_experts}" if count < self.min_experts else f"at most {self.max_experts}")
        return f"{self.name} merges {wanted} expert(s) (got {count} experts)"


METHODS: dict[str, MergeMethod] = {}


def get_method(name: str) -> MergeMethod:
    """The registered method called `name`; an unknown name is a MergeError listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MergeError(
            f"unknown merge method {name!r}; expected one of: {', '.join(METHODS)}"
        ) from None


def register(
    name: str,
    *,
    genes: Sequence[str],
    needs_base: bool,
    reference: str,
    max_experts: int | None = None,
    min_experts: int = 1,
    random: bool = False,
    streams: bool = False,
    fixed: Sequence[str] = (),
    adjust: Callable[[dict[str, list[float]]], dict[str, list[float]]] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register a method implementation under `name` and return its public wrapper.

    The implementation is called with working-dtype tensors, its declared genes as keyword
    arguments (`weight`/`density` as lists of floats, `t` as a float), `seed` if `random`, and
    the caller's options. Its own keyword-only parameters other than those are its options.
    """
    genes = tuple(genes)
    unknown = [g for g in genes if g not in GENE_NAMES]
    if unknown:
        raise ValueError(f"register({name!r}): unknown genes {unknown}; expected among {GENE_NAMES}")
    if name in METHODS:
        raise ValueError(f"register({name!r}): a method with this name is already registered")
    fixed = tuple(fixed)
    if any(gene not in genes or GENES[gene].default is None for gene in fixed):
        raise ValueError(f"register({name!r}): fixed genes {fixed} must be among its genes {genes} and have a default")

    def decorator(impl: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        params = inspect.signature(impl).parameters
        allowed_options = tuple(
            p for p, spec in params.items()
            if spec.kind is inspect.Parameter.KEYWORD_ONLY and p not in (*GENE_NAMES, "seed", "out", "work")
        )

        def fn(
            base: torch.Tensor,
            experts: Sequence[torch.Tensor],
            *,
            weight: Sequence[float] | None = None,
            density: Sequence[float] | None = None,
            gamma: Sequence[float] | None = None,
            epsilon: Sequence[float] | None = None,
            scale: Sequence[float] | None = None,
            t: float | None = None,
            seed: int = 0,
            out: torch.Tensor | None = None,
            **options: Any,
        ) -> torch.Tensor:
            extra = sorted(set(options) - set(allowed_options))
            if extra:
                raise MergeError(
                    f"{name}: unknown option(s) {', '.join(extra)}; "
                    f"expected among: {', '.join(allowed_options) or 'none'}"
                )
            experts = list(experts)
            _check_tensors(name, base, experts, min_experts, max_experts)
            given = {"weight": weight, "density": density, "gamma": gamma, "epsilon": epsilon,
                     "scale": scale, "t": t}
            kwargs = {g: _check_gene(name, g, given[g], len(experts)) for g in genes}
            for gene, value in given.items():
                if gene not in genes and value is not None:
                    raise MergeError(
                        f"{name}: does not take {gene!r}; its genes are: {', '.join(genes) or 'none'}"
                    )
            if random:
                kwargs["seed"] = int(seed)
            work = working_dtype(base.dtype)
            if out is not None and out.shape != base.shape:
                raise MergeError(f"{name}: out has shape {tuple(out.shape)}; expected base's shape {tuple(base.shape)}")
            if streams:
                target = out if out is not None and out.is_contiguous() else torch.empty_like(base)
                impl(base, experts, out=target, work=work, **kwargs, **options)
                return target if out is None or target is out else out.copy_(target)
            base_w = base.to(dtype=work)
            # an expert that is the base tensor itself (prepared.Prepared.same_as_base) stays base_w
            experts_w = [base_w if e is base else e.to(device=base.device, dtype=work) for e in experts]
            result = impl(base_w, experts_w, **kwargs, **options)
            return result.to(base.dtype) if out is None else out.copy_(result)

        fn.__name__, fn.__qualname__, fn.__doc__ = impl.__name__, impl.__qualname__, impl.__doc__
        fn.__module__ = impl.__module__
        fn.__wrapped__ = impl  # inspect.signature(fn) shows the method's own options

        METHODS[name] = MergeMethod(
            name=name, fn=fn, genes=genes, needs_base=needs_base,
            max_experts=max_experts, min_experts=min_experts, random=random, reference=reference,
            streams=streams, options=allowed_options, fixed=fixed, adjust=adjust,
        )
        fn.method = METHODS[name]  # type: ignore[attr-defined]  # e.g. methods.linear.method.name
        return fn

    return decorator


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for floating dtypes narrower than 32 bits, else the dtype itself."""
    if not dtype.is_floating_point:
        raise MergeError(f"cannot merge a tensor of dtype {dtype}; expected a floating-point tensor")
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _check_tensors(
    name: str, base: torch.Tensor, experts: list[torch.Tensor], min_experts: int, max_experts: int | None
) -> None:
    if not experts:
        raise MergeError(f"{name}: no expert tensors given; expected at least {min_experts}")
    if len(experts) < min_experts:
        raise MergeError(f"{name}: got {len(experts)} experts; expected at least {min_experts}")
    if max_experts is not None and len(experts) > max_experts:
        raise MergeError(f"{name}: got {len(experts)} experts; expected at most {max_experts}")
    for i, expert in enumerate(experts):
        if expert.shape != base.shape:
            raise MergeError(
                f"{name}: expert {i} has shape {tuple(expert.shape)}; "
                f"expected base's shape {tuple(base.shape)}"
            )
        working_dtype(expert.dtype)
    working_dtype(base.dtype)


def _check_gene(name: str, gene: str, value: Any, num_experts: int) -> Any:
    """Validate one gene: present, one value per expert (a shared gene: one float), each within
    GENES[gene].valid (density also above 0; della needs density +/- epsilon inside (0, 1))."""
    spec = GENES[gene]
    if value is None:
        raise MergeError(f"{name}: missing {gene!r}; expected " + (
            f"one value per expert ({num_experts})" if spec.per_expert else "a float"))
    if not spec.per_expert:
        if isinstance(value, (list, tuple)) or not _is_real(value) or not spec.accepts(float(value)):
            raise MergeError(f"{name}: {gene}={value!r}; expected a float in {spec.describe_valid()}")
        return float(value)
    values = list(value)
    if len(values) != num_experts:
        raise MergeError(
            f"{name}: got {len(values)} {gene} value(s); expected one per expert ({num_experts})"
        )
    for v in values:
        if not _is_real(v) or not math.isfinite(float(v)):
            raise MergeError(f"{name}: {gene} value {v!r} is not a finite number")
        if not spec.accepts(float(v)) or (gene == "density" and float(v) <= 0.0):
            bounds = "(0, 1]" if gene == "density" else spec.describe_valid()
            raise MergeError(f"{name}: {gene} {float(v)} is outside {bounds}")
    return [float(v) for v in values]


def _is_real(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return not isinstance(value, bool)
