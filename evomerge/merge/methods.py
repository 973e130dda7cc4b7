"""The merge methods, one short function each, registered by name.

Each function below receives tensors already in the working dtype on base's device and its genes
validated (see `registry.register`); callers use the wrapper returned by the decorator, e.g.
`get_method("ties").fn(base, experts, weight=[...], density=[...])`.

Semantics and defaults follow mergekit (normalize / rescale per method, TIES sign election,
magnitude top-k rule, slerp's colinearity threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from evomerge.errors import MergeError
from evomerge.merge.registry import register
from evomerge.merge.tensor_ops import (
    WEIGHT_SUM_EPS,
    exact_combination,
    expert_generator,
    merge_task_vectors,
    resolve_rescale,
    sparsify_magnitude,
    sparsify_random,
    stack_weights,
    stacked_task_vectors,
    task_vectors,
    weighted_sum,
)

SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: nearly colinear, interpolate linearly (mergekit)
SLERP_NORM_EPS = 1e-8  # a vector with a norm at or below this is not normalized (mergekit)


@register("linear", genes=("weight",), needs_base=False,
          reference="https://arxiv.org/abs/2203.05482")
def linear(
    base: torch.Tensor, experts: Sequence[torch.Tensor], *, weight: list[float], normalize: bool = True
) -> torch.Tensor:
    """Model soup: sum_i w_i theta_i / sum_i w_i (without the division when normalize=False).

    `base` is not used. Weights one-hot (1, 0, ...) give that expert bit-exactly. With normalize
    on, weights summing to ~0 (|sum| < 1e-8) are a MergeError.
    """
    merged = weighted_sum(experts, weight)
    if not normalize:
        return merged
    if abs(sum(weight)) < WEIGHT_SUM_EPS:
        raise MergeError(
            f"linear: weights {weight} sum to {sum(weight):g}; expected a non-zero sum with normalize on"
        )
    return merged.div_(stack_weights(weight, merged).sum())


@register("task_arithmetic", genes=("weight",), needs_base=True,
          reference="https://arxiv.org/abs/2212.04089")
def task_arithmetic(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weight: list[float],
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
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
        return exact
    return merge_task_vectors(base, task_vectors(base, experts), weight,
                              consensus=False, normalize=normalize, lambda_=lambda_)


@register("ties", genes=("weight", "density"), needs_base=True,
          reference="https://arxiv.org/abs/2306.01708")
def ties(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    normalize: bool = True,
    rescale: bool | str = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """TIES-Merging: trim each task vector to its top-density magnitudes, elect signs, disjoint mean.

    `rescale=True` rescales each trimmed task vector to its original L1 norm (mergekit's option).
    """
    mode = resolve_rescale(rescale, natural="l1")
    deltas = stacked_task_vectors(base, experts, lambda i, d: sparsify_magnitude(d, density[i], mode))
    return merge_task_vectors(base, deltas, weight, consensus=True, normalize=normalize, lambda_=lambda_)


def _dare(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weight: list[float],
    density: list[float],
    seed: int,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool | str,
    lambda_: float,
) -> torch.Tensor:
    """DARE: drop each delta entry with probability 1 - density and rescale the kept ones.

    Expert i's mask comes from its own stream seeded by (seed, i). The mask depends only on
    (seed, i, shape, density): callers merging many tensors should give each tensor its own seed
    (e.g. derived from the run seed and the tensor name), or same-shaped tensors share masks.
    """
    mode = resolve_rescale(rescale, natural="density")
    deltas = stacked_task_vectors(
        base, experts, lambda i, d: sparsify_random(d, density[i], expert_generator(seed, i), mode))
    return merge_task_vectors(base, deltas, weight, consensus=consensus, normalize=normalize, lambda_=lambda_)


@register("dare_ties", genes=("weight", "density"), needs_base=True, random=True,
          reference="https://arxiv.org/abs/2311.03099")
def dare_ties(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    seed: int,
    normalize: bool = False,
    rescale: bool | str = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DARE drop-and-rescale of each task vector, then TIES sign election and disjoint merge.

    `rescale`: True / 'density' divides kept entries by density (the paper), 'l1' matches the
    task vector's L1 norm instead (what newer mergekit's rescale does), False keeps them as they are.
    """
    return _dare(base, experts, weight, density, seed, consensus=True,
                 normalize=normalize, rescale=rescale, lambda_=lambda_)


@register("dare_linear", genes=("weight", "density"), needs_base=True, random=True,
          reference="https://arxiv.org/abs/2311.03099")
def dare_linear(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    weight: list[float],
    density: list[float],
    seed: int,
    normalize: bool = False,
    rescale: bool | str = True,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """DARE drop-and-rescale of each task vector, then a plain weighted sum (no sign election).

    `rescale` as for dare_ties.
    """
    return _dare(base, experts, weight, density, seed, consensus=False,
                 normalize=normalize, rescale=rescale, lambda_=lambda_)


@register("slerp", genes=("t",), needs_base=True, max_experts=1,
          reference="https://en.wikipedia.org/wiki/Slerp")
def slerp(base: torch.Tensor, experts: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """Spherical interpolation from base (t=0) to the single expert (t=1), as mergekit does it.

    The angle theta comes from the flattened, L2-normalized tensors; the result is
    sin((1-t) theta)/sin(theta) * base + sin(t theta)/sin(theta) * expert on the original
    (unnormalized) tensors. When |cos theta| > 0.9995 it falls back to (1-t) base + t expert.
    t=0 and t=1 give base and the expert bit-exactly.
    """
    v0, v1 = base, experts[0]
    n0 = float(torch.linalg.vector_norm(v0))
    n1 = float(torch.linalg.vector_norm(v1))
    dot = float((v0 * v1).sum())
    dot /= (n0 if n0 > SLERP_NORM_EPS else 1.0) * (n1 if n1 > SLERP_NORM_EPS else 1.0)
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return weighted_sum([v0, v1], [1.0 - t, t])
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    s0, s1 = math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta
    return weighted_sum([v0, v1], [s0, s1])
