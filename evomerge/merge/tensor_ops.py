"""Building blocks shared by the merge methods: task vectors, sparsification, sign consensus, mixing.

All functions are pure: they never modify their inputs (sparsify_* at density 1 return the input
itself, every other result is a new tensor). They compute on whole tensors: the methods that
stream (evomerge/merge/chunked.py) are held to these formulas by tests/test_merge_streaming.py
(breadcrumbs and della, which stream too, by tests/test_merge_methods_vs_mergekit.py); the others
(model_stock, nuslerp, multislerp, passthrough) use them directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from evomerge.errors import MergeError

RescaleMode = Literal["density", "l1"]

# mergekit's guards: a divisor |sum of weights| below this counts as zero; an L1 norm below
# L1_EPS is not rescaled.
WEIGHT_SUM_EPS = 1e-8
L1_EPS = 1e-7


def task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """tau_i = theta_i - theta_base (Ilharco et al., 2022, eq. 1)."""
    return [expert - base for expert in experts]


def stack_weights(weight: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """The weights as a tensor of like's dtype and device, shaped to broadcast over a stack."""
    return torch.tensor(list(weight), dtype=like.dtype, device=like.device).view(-1, *[1] * like.dim())


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """sum_i c_i * x_i over a stack, as mergekit computes it.

    Bit-exact where it matters: with coefficients that are one 1.0 and otherwise 0.0 the result
    equals that tensor exactly (x * 1, 0 * y and x + 0 are exact for finite values).
    """
    return torch.stack(list(tensors)).mul_(stack_weights(coefficients, tensors[0])).sum(dim=0)


def exact_combination(
    base: torch.Tensor, experts: Sequence[torch.Tensor], coefficients: Sequence[float]
) -> torch.Tensor | None:
    """The tensor a combination equals exactly: base when every coefficient is 0, expert i when
    c_i is 1 and the others 0 (`coefficients`: the effective per-expert factors on the task
    vectors); None for any other coefficients. The tensor itself, not a copy."""
    if all(c == 0 for c in coefficients):
        return base
    ones = [i for i, c in enumerate(coefficients) if c == 1]
    if len(ones) == 1 and all(c == 0 for i, c in enumerate(coefficients) if i != ones[0]):
        return experts[ones[0]]
    return None


def resolve_rescale(rescale: bool | str | None, natural: RescaleMode) -> RescaleMode | None:
    """Map the `rescale` option to a mode: True -> the method's natural mode, False/None -> none."""
    if rescale is True:
        return natural
    if rescale is False or rescale is None:
        return None
    if rescale in ("density", "l1"):
        return rescale  # type: ignore[return-value]
    raise MergeError(f"rescale={rescale!r}; expected true, false, 'density' or 'l1'")


def _rescaled(
    delta: torch.Tensor, keep: torch.Tensor, density: float, mode: RescaleMode | None
) -> torch.Tensor:
    """delta masked by `keep`, then rescaled: by 1/density (DARE) or to delta's L1 norm."""
    kept = delta * keep
    if mode == "density":
        return kept / density
    if mode == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        if before < L1_EPS or after < L1_EPS:
            return kept
        return kept * (before / after)
    return kept


def sparsify_magnitude(
    delta: torch.Tensor, density: float, rescale: RescaleMode | None = None
) -> torch.Tensor:
    """TIES step 1 "trim": keep the k = int(density * numel) entries of largest |delta|.

    density >= 1 returns delta itself (not a copy). Among entries tied at the k-th magnitude the
    lowest flat indices are kept (what a stable descending argsort gives). Where
    int(density * numel) is 0 (mergekit aborts there) one entry, the largest, is kept.
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    k = max(1, int(density * numel))
    threshold = kth_largest(delta.abs().flatten(), k)
    keep = (delta > threshold) | (delta < -threshold)  # |delta| > threshold, without a float temporary
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:
        keep = keep.flatten()
        tied = torch.nonzero(delta.abs().flatten() == threshold).flatten()[:missing]
        keep[tied] = True
    return _rescaled(delta, keep.view_as(delta), density, rescale)


# kth_largest: tensors of at least this many entries are narrowed to a band first (below it numpy's
# partition of the whole tensor is as fast); the band comes from a sample of about BAND_SAMPLE entries.
BAND_MIN_NUMEL = 1 << 20
BAND_SAMPLE = 1 << 14


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a flat tensor, as a 0-d tensor (an order statistic: the same value
    however found; NaN counts as larger than any number, as in numpy's sort); `values` is left as
    it is. On the CPU numpy's partition finds it about 2x faster than torch.kthvalue, and for large
    tensors `_kth_largest_in_band` 2-3x faster again (benchmarks/merge_throughput.py)."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64):
        found = _kth_largest_in_band(values, k) if values.numel() >= BAND_MIN_NUMEL else None
        if found is not None:
            return found
        array = values.numpy()
        return torch.tensor(np.partition(array, array.size - k)[array.size - k], dtype=values.dtype)
    return torch.kthvalue(values, values.numel() - k + 1).values


def _kth_largest_in_band(values: torch.Tensor, k: int) -> torch.Tensor | None:
    """The k-th largest entry, found by partitioning only the entries in a band [lo, hi] that a
    sample says holds it; None when the band misses it (the caller then partitions everything).

    Exact whatever the sample: when fewer than k entries lie above hi (NaN included) and at
    least k lie at or above lo, the k-th largest is in the band, at rank k - above there. The
    band is 8 standard deviations of the sample's rank estimate wide, about 6% of the entries;
    the sample's stride is odd so that it crosses every column of a power-of-two-wide matrix."""
    numel = values.numel()
    sample = values.numpy()[:: max(1, numel // BAND_SAMPLE) | 1].copy()
    size = sample.size
    rank = (numel - k) * size // numel  # where the k-th largest falls in the sample, ascending
    margin = 4 * int(size ** 0.5) + 8
    low, high = max(rank - margin, 0), min(rank + margin, size - 1)
    sample.partition([low, high])  # NaN sorts last
    lo, hi = float(sample[low]), float(sample[high])
    at_most_hi = values <= hi  # false for NaN: NaN counts above the band
    above = numel - int(torch.count_nonzero(at_most_hi))
    if above >= k:
        return None
    band = values[at_most_hi.logical_and_(values >= lo)].numpy()
    if above + band.size < k:
        return None
    at = band.size - (k - above)
    band.partition(at)  # in place: the band is already a copy
    return torch.tensor(band[at], dtype=values.dtype)


def expert_generator(seed: int, expert_index: int) -> torch.Generator:
    """An independent CPU random stream for (seed, expert): same pair -> same stream on any device."""
    state = np.random.SeedSequence([seed % 2**64, expert_index]).generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def sparsify_random(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: RescaleMode | None = "density",
) -> torch.Tensor:
    """DARE "drop and rescale" (Yu et al., 2023, eq. 2): keep each entry with probability density.

    The keep mask is u < density for u ~ U[0, 1) drawn on the CPU from `generator`, then moved
    to delta's device, so masks are identical on CPU and CUDA and nested across densities.
    density >= 1 returns delta itself (not a copy).
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device="cpu") < density
    return _rescaled(delta, keep.to(delta.device), density, rescale)


def sign_consensus(weighted: torch.Tensor) -> torch.Tensor:
    """TIES step 2 "elect": per entry, the sign of the sum of the weighted deltas (>= 0 -> +1).

    `weighted` stacks the experts on dim 0. Returns a bool mask of the same shape, true where an
    expert's weighted delta has the elected sign; zeros never agree (their sign is 0).
    """
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = torch.empty(weighted.shape, dtype=torch.bool, device=weighted.device)
    for i in range(weighted.shape[0]):  # expert by expert: no stack-sized float temporary
        torch.eq(weighted[i].sign(), elected, out=agree[i])
    return agree


def merge_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor] | torch.Tensor,
    weight: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """base + lambda * mix(w_i * delta_i), mergekit's generalized task arithmetic.

    With `consensus` (TIES step 3, "disjoint merge") only the deltas agreeing with the elected sign
    are summed and `normalize` divides by the sum of the weights of those experts (0 -> 1);
    without it all deltas are summed and `normalize` divides by sum(w) (|sum| < 1e-8 -> 1).
    `deltas` may be a stacked tensor (experts on dim 0), which is then used as working memory
    (overwritten).
    """
    w = stack_weights(weight, base)
    weighted = deltas if isinstance(deltas, torch.Tensor) else torch.stack(list(deltas))
    weighted.mul_(w)
    if consensus:
        agree = sign_consensus(weighted)
        mixed = weighted.mul_(agree).sum(dim=0)
        divisor = torch.mul(w, agree, out=weighted).sum(dim=0)  # the stack is free again: reused
        del agree
        divisor.masked_fill_(divisor == 0, 1.0)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor.masked_fill_(divisor.abs() < WEIGHT_SUM_EPS, 1.0)
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)  # = base + mixed (addition commutes exactly), without a new tensor


def sparsify_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: RescaleMode | None = None
) -> torch.Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky, 2023): drop the largest and the smallest |delta|.

    Of n entries, keep int(density * n): the int(gamma * n) largest magnitudes go first, the
    smallest ones fill the rest of the drop (when density + gamma > 1 fewer large ones are
    dropped, so density always holds; int(density * n) = 0 keeps nothing). density >= 1 returns
    delta itself, outliers included, as mergekit does. Ties in magnitude are ordered by flat index.
    """
    if density >= 1:
        return delta
    flat = delta.abs().flatten()
    n = flat.numel()
    kept, top = int(density * n), int(gamma * n)
    bottom = max(0, n - kept - top)
    ascending = torch.argsort(flat, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[ascending[bottom:bottom + kept]] = True
    return _rescaled(delta, keep.view_as(delta), density, rescale)


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities (Deep et al., 2024), laid out as mergekit lays them out.

    Ranks are taken along dim 1 (within each row of a matrix; a vector is one row): the
    smallest |delta| of a row gets density - epsilon, the largest density + epsilon, linearly in
    rank between (ties ordered by index). A row of one entry gets density. Returns a tensor of
    delta's shape (a vector or a scalar comes back as [1, n]).
    """
    return (density - epsilon) + magprune_rank_norm(delta) * 2 * epsilon


def magprune_rank_norm(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's rank of |delta| within its row (dim 1; ties by index) over the row's length - 1,
    in [0, 1] (0.5 for rows of one entry); a vector or a scalar comes back as [1, n]."""
    rows = delta if delta.dim() >= 2 else delta.reshape(1, -1)
    n = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(delta.dtype)
    return ranks / (n - 1) if n > 1 else torch.full_like(ranks, 0.5)


def check_magprune(density: float, epsilon: float) -> None:
    """MagPrune's keep probabilities density +/- epsilon must lie strictly inside (0, 1) where density < 1."""
    if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
        raise MergeError(
            f"density {density:g} and epsilon {epsilon:g}: expected density - epsilon > 0 "
            f"and density + epsilon < 1"
        )


def sparsify_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: RescaleMode | None = "l1",
) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with its magnitude-ranked probability, then rescale.

    The keep mask is u < p for u ~ U[0, 1) drawn on the CPU from `generator` (as in
    `sparsify_random`). density >= 1 returns delta itself; otherwise density - epsilon and
    density + epsilon must lie strictly inside (0, 1) (MergeError), as mergekit requires.
    """
    if density >= 1:
        return delta
    check_magprune(density, epsilon)
    probabilities = magprune_probabilities(delta, density, epsilon)
    draw = torch.rand(probabilities.shape, generator=generator, device="cpu")
    keep = (draw < probabilities.cpu()).to(delta.device).view_as(delta)
    return _rescaled(delta, keep, density, rescale)
