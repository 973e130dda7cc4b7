"""The merge methods, one short function each, registered by name.

Each function below receives tensors already in the working dtype on base's device and its genes
validated (see `registry.register`); callers use the wrapper returned by the decorator, e.g.
`get_method("ties").fn(base, experts, weight=[...], density=[...])`.

Semantics, parameter names and defaults follow mergekit 0.1.5 (normalize / rescale per method,
TIES sign election, magnitude top-k rule, slerp's colinearity threshold, ...); mergekit's
`lambda` is spelled `lambda_`. Random masks are evomerge's own (seeded per expert), so random
methods match mergekit in distribution only.

An expert passed as the base tensor itself (the merger does this, with a prepared store, for an
expert whose tensor equals the base's bit for bit: `prepared.Prepared.same_as_base`) has a zero
task vector: the task-vector methods (task_arithmetic, ties, dare_*, breadcrumbs*, della*) skip
its mask, draws and arithmetic, and give the base itself when every expert is the base. The
results are those of the full computation (a zero delta adds nothing, is never kept by the sign
election, and each expert's random stream is its own); tests/test_merge_prepared.py checks it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from evomerge.errors import MergeError
from evomerge.merge.chunked import (
    combine_into,
    copy_into,
    dare_mask,
    dot_and_norms,
    magnitude_mask,
    magprune_mask,
    mix_task_vectors_into,
    outlier_mask,
    rescale_factor,
)
from evomerge.merge.registry import register
from evomerge.merge.tensor_ops import (
    WEIGHT_SUM_EPS,
    RescaleMode,
    check_magprune,
    exact_combination,
    resolve_rescale,
    task_vectors,
)

SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: nearly colinear, interpolate linearly (mergekit)
SLERP_NORM_EPS = 1e-8  # a vector with a norm at or below this is not normalized (mergekit)


@register("linear", genes=("weight",), needs_base=False, streams=True,
          reference="https://arxiv.org/abs/2203.05482")
def linear(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
           weight: list[float], normalize: bool = True) -> torch.Tensor:
    """Model soup: sum_i w_i theta_i / sum_i w_i (without the division when normalize=False).

    `base` is not used. Weights one-hot (1, 0, ...) give that expert bit-exactly. With normalize
    on, weights summing to ~0 (|sum| < 1e-8) are a MergeError.
    """
    if normalize and abs(sum(weight)) < WEIGHT_SUM_EPS:
        raise MergeError(
            f"linear: weights {weight} sum to {sum(weight):g}; expected a non-zero sum with normalize on"
        )
    return combine_into(out, experts, weight, work, divisor=sum(weight) if normalize else None)


@register("task_arithmetic", genes=("weight",), needs_base=True, streams=True,
          reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
                    weight: list[float], normalize: bool = False, lambda_: float = 1.0) -> torch.Tensor:
    """Task arithmetic: theta_base + lambda * sum_i w_i (theta_i - theta_base) [/ sum_i w_i].

    Computed as mergekit does (task vectors, weighted sum, normalize by sum w with |sum| < 1e-8
    -> 1, times lambda, plus base). Exact cases: when every effective coefficient
    c_i = lambda * w_i [/ sum w] is 0 the result is base bit-exactly; when one c_i is 1 and the
    others 0 (e.g. weights (1, 0, ...), lambda 1) it is that expert bit-exactly.
    """
    total = sum(weight)
    divisor = total if normalize and abs(total) >= WEIGHT_SUM_EPS else 1.0
    exact = exact_combination(base, experts, [lambda_ * w / divisor for w in weight])
    if exact is not None:
        return copy_into(out, exact)
    return mix_task_vectors_into(out, base, experts, weight, work, consensus=False, normalize=normalize,
                                 lambda_=lambda_)


@register("ties", genes=("weight", "density"), needs_base=True, streams=True,
          reference="https://arxiv.org/abs/2306.01708")
def ties(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
         weight: list[float], density: list[float], normalize: bool = True, rescale: bool | str = False,
         lambda_: float = 1.0) -> torch.Tensor:
    """TIES-Merging: trim each task vector to its top-density magnitudes, elect signs, disjoint mean.

    `rescale=True` rescales each trimmed task vector to its original L1 norm (mergekit's option).
    """
    mode = resolve_rescale(rescale, natural="l1")
    masks = [magnitude_mask(base, expert, d, work) if d < 1 and expert is not base else None
             for expert, d in zip(experts, density)]
    return _mix_sparse(out, base, experts, weight, density, masks, mode, work, consensus=True,
                       normalize=normalize, lambda_=lambda_)


def _mix_sparse(out: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor], weight: list[float],
                density: list[float], masks: list[torch.Tensor | None], mode: RescaleMode | None,
                work: torch.dtype, **mix: Any) -> torch.Tensor:
    """Each task vector kept where its mask says (None: whole) and rescaled by `mode`, then mixed."""
    factors = [1.0 if mask is None else rescale_factor(base, expert, mask, d, mode, work)
               for expert, mask, d in zip(experts, masks, density)]
    return mix_task_vectors_into(out, base, experts, weight, work, masks=masks, factors=factors, **mix)


def _dare(base: torch.Tensor, experts: Sequence[torch.Tensor], out: torch.Tensor, work: torch.dtype,
          weight: list[float], density: list[float], seed: int, *, consensus: bool, normalize: bool,
          rescale: bool | str, lambda_: float) -> torch.Tensor:
    """DARE: drop each delta entry with probability 1 - density and rescale the kept ones.

    `rescale=True` matches each dropped task vector's L1 norm to the original's, as mergekit
    0.1.5 does (`sparsify.bernoulli` with `RescaleNorm.l1`); the paper's 1/density is
    `rescale='density'`. Both scale the kept entries by ~1/density in expectation.

    Expert i's mask comes from its own stream seeded by (seed, i). The mask depends only on
    (seed, i, shape, density): callers merging many tensors should give each tensor its own seed
    (e.g. derived from the run seed and the tensor name), or same-shaped tensors share masks.
    """
    mode = resolve_rescale(rescale, natural="l1")
    masks = [dare_mask(base.numel(), d, seed, i) if d < 1 and experts[i] is not base else None
             for i, d in enumerate(density)]
    return _mix_sparse(out, base, experts, weight, density, masks, mode, work, consensus=consensus,
                       normalize=normalize, lambda_=lambda_)


@register("dare_ties", genes=("weight", "density"), needs_base=True, random=True, streams=True,
          reference="https://arxiv.org/abs/2311.03099")
def dare_ties(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
              weight: list[float], density: list[float], seed: int, normalize: bool = False,
              rescale: bool | str = True, lambda_: float = 1.0) -> torch.Tensor:
    """DARE drop-and-rescale of each task vector, then TIES sign election and disjoint merge.

    `rescale`: True / 'l1' matches each task vector's L1 norm after the drop (mergekit's default),
    'density' divides kept entries by density (the paper), False keeps them as they are.
    """
    return _dare(base, experts, out, work, weight, density, seed, consensus=True,
                 normalize=normalize, rescale=rescale, lambda_=lambda_)


@register("dare_linear", genes=("weight", "density"), needs_base=True, random=True, streams=True,
          reference="https://arxiv.org/abs/2311.03099")
def dare_linear(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
                weight: list[float], density: list[float], seed: int, normalize: bool = False,
                rescale: bool | str = True, lambda_: float = 1.0) -> torch.Tensor:
    """DARE drop-and-rescale of each task vector, then a plain weighted sum (no sign election).

    `rescale` as for dare_ties.
    """
    return _dare(base, experts, out, work, weight, density, seed, consensus=False,
                 normalize=normalize, rescale=rescale, lambda_=lambda_)


@register("slerp", genes=("t",), needs_base=True, max_experts=1, streams=True,
          reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
          t: float) -> torch.Tensor:
    """Spherical interpolation from base (t=0) to the single expert (t=1), as mergekit does it.

    The angle theta comes from the flattened, L2-normalized tensors; the result is
    sin((1-t) theta)/sin(theta) * base + sin(t theta)/sin(theta) * expert on the original
    (unnormalized) tensors. When |cos theta| > 0.9995 it falls back to (1-t) base + t expert.
    t=0 and t=1 give base and the expert bit-exactly.
    """
    v0, v1 = base, experts[0]
    dot, n0, n1 = dot_and_norms(v0, v1, work)
    dot /= (n0 if n0 > SLERP_NORM_EPS else 1.0) * (n1 if n1 > SLERP_NORM_EPS else 1.0)
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return combine_into(out, [v0, v1], [1.0 - t, t], work)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0, s1 = math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta
    return combine_into(out, [v0, v1], [s0, s1], work)


def _breadcrumbs(base: torch.Tensor, experts: Sequence[torch.Tensor], out: torch.Tensor, work: torch.dtype,
                 weight: list[float], density: list[float], gamma: list[float], *, consensus: bool, normalize: bool,
                 rescale: bool | str, lambda_: float) -> torch.Tensor:
    """Drop each task vector's largest (gamma) and smallest magnitudes, keep density, then mix."""
    mode = resolve_rescale(rescale, natural="l1")
    masks = [outlier_mask(base, expert, d, g, work) if d < 1 and expert is not base else None
             for expert, d, g in zip(experts, density, gamma)]
    return _mix_sparse(out, base, experts, weight, density, masks, mode, work, consensus=consensus,
                       normalize=normalize, lambda_=lambda_)


@register("breadcrumbs", genes=("weight", "density", "gamma"), needs_base=True, fixed=("gamma",), streams=True,
          reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
                weight: list[float], density: list[float], gamma: list[float], normalize: bool = False,
                rescale: bool | str = False, lambda_: float = 1.0) -> torch.Tensor:
    """Model Breadcrumbs: outlier-and-small-magnitude masks on the task vectors, weighted sum.

    Per expert, the gamma share of largest |delta| and enough of the smallest are dropped to keep
    density (see `tensor_ops.sparsify_outliers`); `rescale=True` restores each task vector's L1
    norm (mergekit's rescale).
    """
    return _breadcrumbs(base, experts, out, work, weight, density, gamma, consensus=False,
                        normalize=normalize, rescale=rescale, lambda_=lambda_)


@register("breadcrumbs_ties", genes=("weight", "density", "gamma"), needs_base=True, fixed=("gamma",), streams=True,
          reference="https://arxiv.org/abs/2312.06795")
def breadcrumbs_ties(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
                     weight: list[float], density: list[float], gamma: list[float], normalize: bool = False,
                     rescale: bool | str = False, lambda_: float = 1.0) -> torch.Tensor:
    """Model Breadcrumbs masks, then TIES sign election and disjoint merge."""
    return _breadcrumbs(base, experts, out, work, weight, density, gamma, consensus=True,
                        normalize=normalize, rescale=rescale, lambda_=lambda_)


# della needs density +/- epsilon strictly inside (0, 1): epsilon is capped at this share of the room.
DELLA_EPSILON_ROOM = 0.99


def cap_epsilon(genes: dict[str, list[float]]) -> dict[str, list[float]]:
    """A search's decoded della genes made valid: epsilon becomes
    min(epsilon, 0.99 * min(density, 1 - density)) where density < 1; the recipe holds the value used."""
    genes["epsilon"] = [eps if rho >= 1 else min(eps, DELLA_EPSILON_ROOM * min(rho, 1 - rho))
                        for eps, rho in zip(genes["epsilon"], genes["density"])]
    return genes


def _della(name: str, base: torch.Tensor, experts: Sequence[torch.Tensor], out: torch.Tensor, work: torch.dtype,
           weight: list[float], density: list[float], epsilon: list[float], seed: int, *, consensus: bool,
           normalize: bool, rescale: bool | str, lambda_: float) -> torch.Tensor:
    """MagPrune each task vector (expert i's mask from the stream seeded by (seed, i)), then mix."""
    mode = resolve_rescale(rescale, natural="l1")
    for i, (rho, eps) in enumerate(zip(density, epsilon)):
        try:
            check_magprune(rho, eps)
        except MergeError as exc:
            raise MergeError(f"{name}: expert {i}: {exc}") from None
    masks = [magprune_mask(base, expert, rho, eps, seed, i, work) if rho < 1 and expert is not base else None
             for i, (expert, rho, eps) in enumerate(zip(experts, density, epsilon))]
    return _mix_sparse(out, base, experts, weight, density, masks, mode, work, consensus=consensus,
                       normalize=normalize, lambda_=lambda_)


@register("della", genes=("weight", "density", "epsilon"), needs_base=True, random=True, fixed=("epsilon",),
          adjust=cap_epsilon, streams=True, reference="https://arxiv.org/abs/2406.11617")
def della(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
          weight: list[float], density: list[float], epsilon: list[float], seed: int, normalize: bool = True,
          rescale: bool | str = True, lambda_: float = 1.0) -> torch.Tensor:
    """DELLA: MagPrune (keep probability density +/- epsilon by magnitude rank within each row),
    rescale, TIES sign election, disjoint merge.

    `rescale=True` restores each pruned task vector's L1 norm (mergekit's rescale; the paper
    divides each kept entry by its own keep probability instead). density < 1 needs
    density - epsilon > 0 and density + epsilon < 1 (MergeError otherwise).
    """
    return _della("della", base, experts, out, work, weight, density, epsilon, seed, consensus=True,
                  normalize=normalize, rescale=rescale, lambda_=lambda_)


@register("della_linear", genes=("weight", "density", "epsilon"), needs_base=True, random=True, fixed=("epsilon",),
          adjust=cap_epsilon, streams=True, reference="https://arxiv.org/abs/2406.11617")
def della_linear(base: torch.Tensor, experts: Sequence[torch.Tensor], *, out: torch.Tensor, work: torch.dtype,
                 weight: list[float], density: list[float], epsilon: list[float], seed: int, normalize: bool = False,
                 rescale: bool | str = True, lambda_: float = 1.0) -> torch.Tensor:
    """DELLA's MagPrune and rescale, then a plain weighted sum (no sign election)."""
    return _della("della_linear", base, experts, out, work, weight, density, epsilon, seed, consensus=False,
                  normalize=normalize, rescale=rescale, lambda_=lambda_)


MODEL_STOCK_NORM_EPS = 1e-6  # norm products are clamped to at least this (mergekit)
MODEL_STOCK_SINGULAR_EPS = 1e-6  # |1 + (N-1) cos| below this: keep the base (mergekit)


@register("model_stock", genes=(), needs_base=True, min_experts=2,
          reference="https://arxiv.org/abs/2403.19522")
def model_stock(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock (Jang et al., 2024): move from the base towards the experts' average by
    t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of the experts' task vectors.

    Computed over the flattened tensor, or per row with `filter_wise` (a vector is one row).
    Where 1 + (N - 1) cos is ~0 the base is kept. No genes: the ratio comes from the geometry.
    """
    if filter_wise:
        w0 = base if base.dim() > 1 else base.unsqueeze(0)
        ws = [e if e.dim() > 1 else e.unsqueeze(0) for e in experts]
    else:
        w0, ws = base.reshape(-1), [e.reshape(-1) for e in experts]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=MODEL_STOCK_NORM_EPS)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < MODEL_STOCK_SINGULAR_EPS
    t = torch.where(singular, torch.zeros_like(cos),
                    n * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = ws[0]
    for w in ws[1:]:
        average = average + w
    average = average / n
    return (t * average + (1 - t) * w0).reshape(base.shape)


NUSLERP_NORM_EPS = 1e-7  # norms are clamped to at least this before normalizing (mergekit)
NUSLERP_COLINEAR_EPS = 1e-8  # 1 - cos^2 <= this squared: interpolate linearly (mergekit)
NUSLERP_WEIGHT_SUM_EPS = 1e-6  # |w0 + w1| below this: t = 0.5 (mergekit)


def _nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """Slerp from v0 (t=0) to v1 (t=1) over the flattened tensors, or per column (per row with
    row_wise); nearly colinear vectors are interpolated linearly."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= NUSLERP_COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@register("nuslerp", genes=("weight",), needs_base=True, min_experts=2, max_experts=2,
          reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#nuslerp-nuslerp")
def nuslerp(base: torch.Tensor, experts: Sequence[torch.Tensor], *, weight: list[float],
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False,
            relative_to_base: bool = True) -> torch.Tensor:
    """mergekit's NuSLERP: slerp between two experts' task vectors at t = w1 / (w0 + w1).

    |w0 + w1| < 1e-6 gives t = 0.5. `nuslerp_flatten=False` slerps per column (per row with
    `nuslerp_row_wise`). `relative_to_base=False` slerps the experts themselves (mergekit
    without a base_model).
    """
    total = weight[0] + weight[1]
    t = 0.5 if abs(total) < NUSLERP_WEIGHT_SUM_EPS else weight[1] / total
    if not relative_to_base:
        return _nuslerp_vectors(t, experts[0], experts[1], row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    v0, v1 = task_vectors(base, experts)
    return base + _nuslerp_vectors(t, v0, v1, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)


@register("multislerp", genes=("weight",), needs_base=True,
          reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(base: torch.Tensor, experts: Sequence[torch.Tensor], *, weight: list[float],
               normalize_weights: bool = True, eps: float = 1e-8, relative_to_base: bool = True) -> torch.Tensor:
    """Barycentric interpolation on the hypersphere (mergekit's multislerp) of the task vectors.

    The flattened vectors are projected onto the unit sphere, mapped into the tangent space at
    their weighted mean direction, mixed there, mapped back with the exponential map and scaled
    by the weighted mean of their norms. One expert gives that expert. Weights summing to ~0
    with `normalize_weights`, or unit vectors whose weighted mean is ~0 (three or more experts;
    two fall back to a weighted sum), are a MergeError.
    """
    if len(experts) == 1:
        return experts[0].clone()
    stacked = torch.stack(list(experts))
    if relative_to_base:
        stacked = stacked - base
    flat = stacked.reshape(len(experts), -1)
    w = torch.tensor(weight, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        if abs(sum(weight)) < WEIGHT_SUM_EPS:
            raise MergeError(f"multislerp: weights {weight} sum to {sum(weight):g}; expected a non-zero sum")
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(dim=0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(experts) != 2:
            raise MergeError("multislerp: the weighted mean of the experts' directions is ~0 "
                             "(opposite vectors with balancing weights); expected other weights")
        mixed = stacked[0] * w[0] + stacked[1] * w[1]
        return mixed + base if relative_to_base else mixed
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(dim=-1, keepdim=True) * mean
    tangent = (tangents * w.view(-1, 1)).sum(dim=0)
    length = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * w).sum()).view(base.shape)
    return result + base if relative_to_base else result


@register("passthrough", genes=("scale",), needs_base=False, max_experts=1,
          reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md#passthrough-passthrough")
def passthrough(base: torch.Tensor, experts: Sequence[torch.Tensor], *, scale: list[float]) -> torch.Tensor:
    """The single expert's tensor times its `scale` (mergekit's passthrough); scale 1 copies it exactly."""
    return experts[0] * scale[0]
