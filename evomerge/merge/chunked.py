"""Merge kernels that stream a tensor in slices and write the merge straight into its target.

The whole-tensor formulas of `tensor_ops` make several full-size temporaries per expert (task
vectors, masks, weighted stacks, sign votes) and a new result tensor, so a merge moves many
times the bytes it reads. Here every element-wise step runs on one slice of `CHUNK` elements at
a time: its temporaries (a few MiB) stay in cache, the sources are read once, the target (a
model's parameter, preallocated) is written once, and narrow dtypes (bfloat16, float16) are
widened one slice at a time. What needs the whole tensor first (a magnitude threshold, an L1
norm, a random mask) is computed in a pass before. Random masks are drawn slice by slice from
the expert's own generator, which gives the same numbers as one whole-tensor draw.

Results equal the whole-tensor formulas up to floating-point rounding order (the tests hold
them to each other and to mergekit); the exact cases (weights (1, 0, ...) give that expert,
t = 0 / 1 give an endpoint) stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from evomerge.merge import fused, prepared
from evomerge.merge.tensor_ops import (
    L1_EPS,
    WEIGHT_SUM_EPS,
    RescaleMode,
    expert_generator,
    kth_largest,
    magprune_rank_norm,
)

CHUNK = 1 << 18  # elements per slice on the CPU: 1 MiB of float32, a slice's temporaries fit in L2
CHUNK_CUDA = 1 << 24  # on a GPU, fewer and larger kernels


def chunk_size(device: torch.device) -> int:
    return CHUNK_CUDA if device.type == "cuda" else CHUNK


def slices(numel: int, device: torch.device) -> Iterator[slice]:
    size = chunk_size(device)
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


class Stream:
    """Flat views of a merge's inputs (and target), read and written slice by slice in `work` dtype
    on `device` (the target's)."""

    def __init__(self, inputs: Sequence[torch.Tensor], work: torch.dtype, out: torch.Tensor | None = None,
                 device: torch.device | None = None):
        self.inputs = [t.reshape(-1) for t in inputs]  # sources are contiguous: views, no copies
        self.work = work
        self.out = out.view(-1) if out is not None else None
        self.device = out.device if out is not None else (device or inputs[0].device)
        self.numel = self.inputs[0].numel()
        # Compute straight into the target when it has the working dtype.
        self.direct = out is not None and out.dtype == work
        self._size = min(self.numel, chunk_size(self.device))
        self._scratch: dict[str, torch.Tensor] = {}

    def slices(self) -> Iterator[slice]:
        return slices(self.numel, self.device)

    def read(self, index: int, part: slice) -> torch.Tensor:
        """Input `index`'s slice in the working dtype on the device (the view itself when it has both)."""
        return self.inputs[index][part].to(device=self.device, dtype=self.work)

    def scratch(self, name: str, part: slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A temporary of the slice's length, one per name, reused slice after slice."""
        buffer = self._scratch.get(name)
        if buffer is None:
            buffer = self._scratch[name] = torch.empty(self._size, dtype=dtype or self.work, device=self.device)
        return buffer[: part.stop - part.start]

    def target(self, part: slice) -> torch.Tensor:
        """Where the slice's result is computed: the target itself, or a working-dtype temporary."""
        assert self.out is not None
        return self.out[part] if self.direct else self.scratch("result", part)

    def write(self, part: slice, result: torch.Tensor) -> None:
        assert self.out is not None
        if not self.direct:
            self.out[part].copy_(result)


def combine_into(out: torch.Tensor, tensors: Sequence[torch.Tensor], coefficients: Sequence[float],
                 work: torch.dtype, divisor: float | None = None) -> torch.Tensor:
    """out = sum_i c_i x_i [/ divisor]. With one coefficient 1 and the others 0 it is that tensor exactly."""
    stream = Stream(tensors, work, out)
    for part in stream.slices():
        result = stream.target(part)
        torch.mul(stream.read(0, part), coefficients[0], out=result)
        for i in range(1, len(tensors)):
            result.add_(stream.read(i, part), alpha=coefficients[i])
        if divisor is not None:
            result.div_(divisor)
        stream.write(part, result)
    return out


def copy_into(out: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    out.copy_(tensor.to(device=out.device))
    return out


def mix_task_vectors_into(
    out: torch.Tensor,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weight: Sequence[float],
    work: torch.dtype,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    masks: Sequence[torch.Tensor | None] | None = None,
    factors: Sequence[float] | None = None,
) -> torch.Tensor:
    """out = base + lambda * mix(w_i * f_i * m_i * (x_i - base)), `tensor_ops.merge_task_vectors`
    slice by slice: m_i a keep mask (None: keep all), f_i a rescale factor (default 1).

    With `consensus` (TIES's elect + disjoint merge) only deltas agreeing with the sign of their
    sum count and `normalize` divides by the sum of the agreeing experts' weights (0 -> 1);
    without it all count and `normalize` divides by sum(w) (|sum| < 1e-8 -> 1).
    """
    masks = masks or [None] * len(experts)
    scale = [w * (factors[i] if factors is not None else 1.0) for i, w in enumerate(weight)]
    total = sum(weight)
    plain_divisor = total if abs(total) >= WEIGHT_SUM_EPS else 1.0
    # An expert passed as the base itself has a zero delta: it adds nothing to the mix nor, never
    # agreeing with an elected sign, to the consensus divisor (the plain divisor counts its weight).
    live = [i for i, expert in enumerate(experts) if expert is not base]
    if not live:
        return copy_into(out, base)
    experts, masks, scale, weight = ([xs[i] for i in live] for xs in (experts, masks, scale, weight))
    if fused.mix_into(out, base, experts, masks, scale, weight, consensus=consensus, normalize=normalize,
                      lambda_=lambda_, divisor=plain_divisor):  # float32 or bfloat16 on the CPU: one compiled pass
        return out
    count = len(experts)
    stream = Stream([base, *experts], work, out)
    for part in stream.slices():
        b = stream.read(0, part)
        deltas = []
        for i in range(count):
            delta = stream.scratch(f"delta{i}", part)
            torch.sub(stream.read(i + 1, part), b, out=delta)
            if masks[i] is not None:
                apply_mask(masks[i], delta, part, stream.scratch("mask", part))
            delta.mul_(scale[i])
            deltas.append(delta)
        mixed = stream.scratch("mixed", part)
        torch.add(deltas[0], deltas[1], out=mixed) if count > 1 else mixed.copy_(deltas[0])
        for delta in deltas[2:]:
            mixed.add_(delta)
        if consensus:
            # Elect the sign of the sum: +1 where it is >= 0 (sign + 0.5 is positive for 0 and -0:
            # a -0 sum has only zero deltas, which never agree), -1 below. Keep each delta that has
            # it, with float operations only: delta * elected > 0 exactly where the delta agrees.
            # The kept deltas all have the elected sign, so their sum is that of their magnitudes
            # times it (negation is exact).
            elected = torch.sign(mixed, out=stream.scratch("elected", part)).add_(0.5).sign_()
            divisor = stream.scratch("divisor", part)
            indicator = stream.scratch("indicator", part)
            for i, delta in enumerate(deltas):
                delta.mul_(elected).clamp_min_(0.0)  # |delta| where it agrees, else 0
                if normalize:
                    torch.sign(delta, out=indicator)  # 1 where it agrees, else 0
                    if i == 0:
                        torch.mul(indicator, float(weight[0]), out=divisor)
                    else:
                        divisor.add_(indicator, alpha=float(weight[i]))
            torch.add(deltas[0], deltas[1], out=mixed) if count > 1 else mixed.copy_(deltas[0])
            for delta in deltas[2:]:
                mixed.add_(delta)
            mixed.mul_(elected)
            if normalize:
                mixed.div_(_nonzero(divisor, weight))
        elif normalize:
            mixed.div_(plain_divisor)
        if lambda_ != 1:
            mixed.mul_(lambda_)
        result = stream.target(part)
        torch.add(mixed, b, out=result)
        stream.write(part, result)
    return out


TINY = torch.finfo(torch.float32).tiny


def _nonzero(divisor: torch.Tensor, weight: Sequence[float]) -> torch.Tensor:
    """The divisor with its zeros (no expert agrees, so the mixed delta is 0 there) set to 1. With
    weights >= 0 (no nonzero one below float32's smallest normal) every sum of them is 0 or at
    least TINY, and a clamp does it."""
    if all(w == 0 or w >= TINY for w in weight):
        return divisor.clamp_min_(TINY)
    return divisor.masked_fill_(divisor == 0, 1.0)


# --------------------------------------------------------------------------- what a slice needs first


def apply_mask(keep: torch.Tensor | prepared.Keep, values: torch.Tensor, part: slice,
               scratch: torch.Tensor) -> torch.Tensor:
    """values *= the keep mask's slice `part` (in place; as a bool mask gives, up to the sign of a
    zero); `values` is the slice's task vector or its magnitude (what a `prepared.Keep` decides from)."""
    if isinstance(keep, torch.Tensor):
        return values.mul_(keep[part].to(values.device))
    return keep.apply(values, part, scratch)



def magnitude_mask(base: torch.Tensor, expert: torch.Tensor, density: float,
                   work: torch.dtype) -> torch.Tensor | prepared.Keep:
    """TIES's trim as a keep mask: the k = max(1, int(density * numel)) largest |expert - base|,
    ties at the k-th magnitude broken towards the lowest flat index (`sparsify_magnitude`).

    With a `prepared.Prepared` store active, the magnitude order is computed once per (base,
    expert) pair and each mask is read from it (the same mask)."""
    numel = base.numel()
    k = max(1, int(density * numel))
    store = prepared.active()
    if store is not None and numel >= prepared.MIN_NUMEL:
        order = store.magnitude_order(base, expert, lambda: _magnitude(base, expert, work))
        keep = order.top(k, _magnitudes_at(base, expert, work))
        if keep is not None:
            return keep
    magnitude = _magnitude(base, expert, work)
    threshold = kth_largest(magnitude, k)
    keep = magnitude > threshold
    missing = k - int(torch.count_nonzero(keep))
    if missing > 0:  # the first `missing` entries equal to the threshold, in flat order
        keep[torch.nonzero(magnitude == threshold).flatten()[:missing]] = True
    return keep


def _magnitude(base: torch.Tensor, expert: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """|expert - base|, flat, in the working dtype (computed slice by slice)."""
    magnitude = torch.empty(base.numel(), dtype=work, device=base.device)
    stream = Stream([base, expert], work, device=base.device)
    for part in stream.slices():
        torch.sub(stream.read(1, part), stream.read(0, part), out=magnitude[part]).abs_()
    return magnitude


def _magnitudes_at(base: torch.Tensor, expert: torch.Tensor, work: torch.dtype) -> prepared.Magnitudes:
    """flat indices -> |expert - base| there, in the working dtype: `_magnitude`'s values, entry by entry."""
    flat_base, flat_expert = base.reshape(-1), expert.reshape(-1)

    def at(indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(device=base.device, dtype=torch.int64)
        return torch.sub(flat_expert[indices].to(work), flat_base[indices].to(work)).abs_()
    return at


def random_mask(numel: int, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's keep mask u < density, u ~ U[0, 1) drawn on the CPU from `generator` slice by slice
    (the same numbers as one draw of `numel`: `sparsify_random`'s mask)."""
    keep = torch.empty(numel, dtype=torch.bool)
    draw = torch.empty(min(numel, chunk_size(torch.device("cpu"))))
    for part in slices(numel, torch.device("cpu")):
        torch.lt(torch.rand(part.stop - part.start, generator=generator, out=draw[: part.stop - part.start]),
                 density, out=keep[part])
    return keep


def dare_mask(numel: int, density: float, seed: int, index: int) -> torch.Tensor | prepared.Keep:
    """`random_mask` of expert `index`'s stream for `seed` (`tensor_ops.expert_generator`). With a
    `prepared.Prepared` store active the draws are made once and kept: the same mask, by one
    comparison."""
    store = prepared.active()
    if store is None or numel < prepared.MIN_NUMEL:
        return random_mask(numel, density, expert_generator(seed, index))
    return prepared.DrawKeep(_kept_draws(store, numel, seed, index), density)


def _kept_draws(store: prepared.Prepared, numel: int, seed: int, index: int) -> torch.Tensor:
    """The U[0, 1) draws of expert `index`'s stream for `seed`, made once per store and kept."""
    key = (seed, index, numel)
    draws = store.draws(key)
    if draws is None:
        draws = torch.empty(numel)
        generator = expert_generator(seed, index)
        for part in slices(numel, torch.device("cpu")):
            torch.rand(part.stop - part.start, generator=generator, out=draws[part])
        store.keep_draws(key, draws)
    return draws


def outlier_mask(base: torch.Tensor, expert: torch.Tensor, density: float, gamma: float,
                 work: torch.dtype) -> torch.Tensor | prepared.Keep:
    """Model Breadcrumbs' keep mask (`tensor_ops.sparsify_outliers`): of n entries, ranks
    [bottom, bottom + int(density * n)) of the stable ascending order of |expert - base|, where
    bottom = max(0, n - int(density * n) - int(gamma * n)). With a store active, read from the
    kept magnitude order (the same mask)."""
    numel = base.numel()
    kept, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - kept - top)
    store = prepared.active()
    if kept > 0 and store is not None and numel >= prepared.MIN_NUMEL:
        order = store.magnitude_order(base, expert, lambda: _magnitude(base, expert, work))
        keep = order.band(bottom, kept, _magnitudes_at(base, expert, work))
        if keep is not None:
            return keep
    ascending = torch.argsort(_magnitude(base, expert, work), stable=True)
    mask = torch.zeros(numel, dtype=torch.bool, device=base.device)
    mask[ascending[bottom:bottom + kept]] = True
    return mask


def magprune_mask(base: torch.Tensor, expert: torch.Tensor, density: float, epsilon: float, seed: int,
                  index: int, work: torch.dtype) -> torch.Tensor | prepared.Keep:
    """DELLA's MagPrune keep mask (`tensor_ops.sparsify_magprune`): u < p, p from the rank of
    |expert - base| within its row, u from expert `index`'s stream for `seed`. With a store
    active, the row ranks and the draws are computed once and kept (the same mask)."""
    numel = base.numel()

    def rank_norm() -> torch.Tensor:
        return magprune_rank_norm(_magnitude(base, expert, work).view(base.shape)).reshape(-1)

    store = prepared.active()
    if store is not None and numel >= prepared.MIN_NUMEL:
        twice = store.twice_rank_norm(base, expert, lambda: rank_norm().mul_(2))  # the doubling of r * 2 * eps
        return prepared.MagPruneKeep(twice, _kept_draws(store, numel, seed, index), density, epsilon)
    probabilities = (density - epsilon) + rank_norm() * 2 * epsilon
    draws = torch.rand(numel, generator=expert_generator(seed, index), device="cpu")
    return (draws < probabilities.cpu()).to(base.device)


def rescale_factor(base: torch.Tensor, expert: torch.Tensor, keep: torch.Tensor | prepared.Keep, density: float,
                   mode: RescaleMode | None, work: torch.dtype) -> float:
    """The factor `tensor_ops._rescaled` gives the kept entries: 1 / density, or (`l1`) the task
    vector's L1 norm over the kept part's (1 where either is below 1e-7)."""
    if mode == "density":
        return 1.0 / density
    if mode != "l1":
        return 1.0
    sums = fused.l1_norms(base, expert, keep)  # float32 or bfloat16 on the CPU: one compiled pass, any mask form
    if sums is not None:
        before, after = sums
    else:
        before = after = 0.0
        stream = Stream([base, expert], work, device=base.device)
        for part in stream.slices():
            magnitude = torch.sub(stream.read(1, part), stream.read(0, part),
                                  out=stream.scratch("magnitude", part)).abs_()
            before += float(magnitude.sum())
            after += float(apply_mask(keep, magnitude, part, stream.scratch("mask", part)).sum())
    if before < L1_EPS or after < L1_EPS:
        return 1.0
    return before / after


def dot_and_norms(a: torch.Tensor, b: torch.Tensor, work: torch.dtype) -> tuple[float, float, float]:
    """(a . b, |a|, |b|) over the flattened tensors, in the working dtype, slice by slice."""
    dot = squares_a = squares_b = 0.0
    stream = Stream([a, b], work, device=a.device)
    for part in stream.slices():
        x, y = stream.read(0, part), stream.read(1, part)
        dot += float(torch.dot(x, y))
        squares_a += float(torch.dot(x, x))
        squares_b += float(torch.dot(y, y))
    return dot, squares_a ** 0.5, squares_b ** 0.5
