"""What a sparsifying merge computes that no gene changes, computed once and kept.

Over one search the sources and the run seed are fixed; only the genes (weights, densities)
change from candidate to candidate. TIES's trim, breadcrumbs' band, DELLA's and DARE's drops each
start from something that depends on the sources alone:

- TIES: the flat indices of each tensor's magnitudes |expert - base| in ascending order
  (`MagnitudeOrder`: a stable sort, int32 indices, 4 bytes per entry and expert). A density's
  k-th largest magnitude t is then one entry read from the sources, and the flat index c of the
  last entry tied at t that the rule "the k largest, ties by lowest flat index" keeps is found by
  reading the run of ties around it (ties are the rule, not the exception, on real fine-tunes: a
  float32 task vector is a multiple of its base entry's ulp); the mask is |delta| > t, or
  |delta| == t at flat index <= c: the same set `chunked.magnitude_mask` finds by partitioning
  the whole tensor.
- Breadcrumbs: the same magnitude order; its rank band [bottom, bottom + kept) is two such
  bounds, each a threshold and the flat index where tied entries start (or stop) being kept.
- DELLA: each entry's magnitude rank within its row, normalized to [0, 1] and doubled (float32),
  and the draws below: its probabilities are then `tensor_ops.magprune_probabilities`'s own operations.
- DARE: the uniform draws behind its masks. The mask of a density is `draws < density`; the
  draws of (seed, expert, tensor) are those `chunked.random_mask` draws, so the mask is exactly
  the same. Kept as float32: 4 bytes per entry and expert.

The masks are applied slice by slice inside the merge's own pass with float operations
(`Keep.apply`: TIES's trim is one `torch.hardshrink` of the task vector at the threshold, DARE's
drop a product with the comparison written as 1.0 / 0.0), with no full-size mask and no pass over
the task vector before the merge.

The store also records, once per (base, expert) tensor pair, whether the expert equals the base
bit for bit (`same_as_base`): the merger then passes the base tensor itself, and the task-vector
methods skip that expert (evomerge/merge/methods.py). On a fine-tune that touches few tensors
this is most of the merge's work; such tensors hold no magnitude order and no draws.

A `Prepared` store is used only while it is active (`with store.active():`); outside, every
method computes as before. Entries are keyed by the tensors themselves (the merger passes the
same source tensor objects to every merge) and dropped when a tensor is modified in place
(torch's version counter) or freed.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Callable, Iterator

import torch

MIN_NUMEL = 1 << 14  # smaller tensors are cheap to trim from scratch: not kept

# flat indices (a tensor) -> the magnitudes |expert - base| there, as the sort saw them
Magnitudes = Callable[[torch.Tensor], torch.Tensor]

_ACTIVE: contextvars.ContextVar[Prepared | None] = contextvars.ContextVar("evomerge_prepared", default=None)


class Keep:
    """A keep mask applied slice by slice, in place, with float operations only (a bool tensor
    costs 5-30x a float operation per entry on the CPU): `apply` zeroes the slice's entries the
    mask drops and leaves the kept ones as they are, which is what multiplying by the bool mask
    gives (up to the sign of a zero)."""

    def apply(self, values: torch.Tensor, part: slice, scratch: torch.Tensor) -> torch.Tensor:
        """values (the slice `part` of the task vector, or of its magnitude) masked in place."""
        raise NotImplementedError


def at_least(threshold: float, dtype: torch.dtype) -> float:
    """The largest value of `dtype` below a threshold >= 0 (0 for 0): |x| > it exactly when |x| >= threshold."""
    if not threshold:
        return 0.0
    t = torch.tensor(threshold, dtype=dtype)
    return float(torch.nextafter(t, torch.zeros((), dtype=dtype)))


def _split(values: torch.Tensor, part: slice, split: int, op: Callable[[torch.Tensor, float, slice], None],
           before: float, after: float) -> torch.Tensor:
    """op(view, lambda, local slice) on `values` (the slice `part` of a flat tensor): with `before` for
    flat indices below `split`, `after` from it on."""
    head = min(max(split - part.start, 0), part.stop - part.start)
    if head:
        op(values[:head], before, slice(0, head))
    if head < part.stop - part.start:
        op(values[head:], after, slice(head, None))
    return values


def _keep_above(values: torch.Tensor, lam: float, local: slice) -> None:
    """Zero the entries with |x| <= lam (hardshrink: one vectorized pass, compared in values' dtype)."""
    torch.hardshrink(values, lam, out=values)


class ThresholdKeep(Keep):
    """|delta| > threshold, and |delta| == threshold at flat indices up to `cutoff` (None: all of them)."""

    def __init__(self, threshold: float, cutoff: int | None):
        self.threshold, self.cutoff = threshold, cutoff

    def apply(self, values: torch.Tensor, part: slice, scratch: torch.Tensor) -> torch.Tensor:
        split = part.stop if self.cutoff is None else self.cutoff + 1  # tied entries kept below it
        return _split(values, part, split, _keep_above, at_least(self.threshold, values.dtype), self.threshold)


class BandKeep(Keep):
    """Ranks [bottom, top] of the stable ascending order of |delta| (ties in flat order; Model
    Breadcrumbs' mask): |delta| above `low`, or equal to it at flat indices from `low_from` on;
    and below `high`, or equal to it at flat indices up to `high_to`. None: no bound on that side."""

    def __init__(self, low: float | None, low_from: int, high: float | None, high_to: int):
        self.low, self.low_from, self.high, self.high_to = low, low_from, high, high_to

    def apply(self, values: torch.Tensor, part: slice, scratch: torch.Tensor) -> torch.Tensor:
        if self.low is not None:
            _split(values, part, self.low_from, _keep_above, self.low, at_least(self.low, values.dtype))
        if self.high is not None:
            def keep_below(view: torch.Tensor, lam: float, local: slice) -> None:
                # x - hardshrink(x, lam): x where |x| <= lam, else x - x = 0 (exact)
                view.sub_(torch.hardshrink(view, lam, out=scratch[local][: view.numel()]))
            _split(values, part, self.high_to + 1, keep_below, self.high, at_least(self.high, values.dtype))
        return values


class MagPruneKeep(Keep):
    """DELLA's draws < (density - epsilon) + rank_norm * 2 * epsilon (`tensor_ops.magprune_probabilities`,
    the same operations), from kept row ranks and draws."""

    def __init__(self, twice_rank_norm: torch.Tensor, draws: torch.Tensor, density: float, epsilon: float):
        self.twice_rank_norm, self.draws, self.density, self.epsilon = twice_rank_norm, draws, density, epsilon

    def apply(self, values: torch.Tensor, part: slice, scratch: torch.Tensor) -> torch.Tensor:
        p = torch.mul(self.twice_rank_norm[part].to(scratch.device), self.epsilon, out=scratch)
        p.add_(self.density - self.epsilon)
        return values.mul_(torch.lt(self.draws[part].to(scratch.device), p, out=p))  # u < p as 1.0 / 0.0


class DrawKeep(Keep):
    """DARE's draws < density."""

    def __init__(self, draws: torch.Tensor, density: float):
        self.draws, self.density = draws, density

    def apply(self, values: torch.Tensor, part: slice, scratch: torch.Tensor) -> torch.Tensor:
        # the comparison written as floats (1.0 / 0.0): one vectorized pass, the comparison random_mask makes
        return values.mul_(torch.lt(self.draws[part].to(scratch.device), self.density, out=scratch))


class MagnitudeOrder:
    """The flat indices of a tensor pair's magnitudes |expert - base| in ascending order (a stable
    sort, so equal magnitudes are in flat order; int32): 4 bytes an entry. The magnitudes
    themselves are not kept: `at(indices)` reads them back from the sources at given flat
    indices (a few hundred entries per mask)."""

    WINDOW = 64  # sorted positions read at a time while looking for the ends of a run of ties

    def __init__(self, magnitude: torch.Tensor):
        order = torch.sort(magnitude, stable=True).indices
        self.order = order.to(torch.int32) if magnitude.numel() < 2**31 else order
        self.numel = magnitude.numel()

    def _value(self, position: int, at: Magnitudes) -> float:
        return float(at(self.order[position:position + 1])[0])

    def _boundary(self, low: int, high: int, value: float, at: Magnitudes, *, tied: bool) -> int:
        """The first sorted position in [low, high] whose magnitude is not below `value` (with
        `tied`: is above it), found by reading WINDOW evenly spaced positions at a time (the
        magnitudes ascend): a few reads, however long a run of ties."""
        while high - low > self.WINDOW:
            probes = low + (high - low) * torch.arange(1, self.WINDOW, dtype=torch.int64) // self.WINDOW
            values = at(self.order[probes])
            below = int((values <= value if tied else values < value).sum())
            low, high = (low, int(probes[0])) if below == 0 else (
                int(probes[below - 1]) + 1, int(probes[below]) if below < len(probes) else high)
        values = at(self.order[low:high])
        return low + int((values <= value if tied else values < value).sum())

    def _tied(self, position: int, value: float, at: Magnitudes) -> tuple[int, int]:
        """[first, last): the sorted positions around `position` whose magnitude is `value`."""
        return (self._boundary(0, position, value, at, tied=False),
                self._boundary(position + 1, self.numel, value, at, tied=True))

    def top(self, k: int, at: Magnitudes) -> ThresholdKeep | None:
        """The keep mask of the k largest magnitudes, ties at the k-th kept by lowest flat index: the
        k-th largest t, and the flat index of the last tied entry kept. None for a NaN threshold (the
        caller computes the mask itself). Tied zeros are all kept: kept or not, 0 * 1 == 0 * 0."""
        position = self.numel - k
        threshold = self._value(position, at)
        if threshold != threshold:
            return None
        if threshold == 0.0:
            return ThresholdKeep(threshold, None)
        first, last = self._tied(position, threshold, at)
        missing = k - (self.numel - last)  # tied entries to keep, 1..last - first
        if missing == last - first:
            return ThresholdKeep(threshold, None)
        return ThresholdKeep(threshold, int(self.order[first + missing - 1]))

    def band(self, bottom: int, kept: int, at: Magnitudes) -> BandKeep | None:
        """The keep mask of ranks [bottom, bottom + kept) in ascending order, ties in flat order
        (kept >= 1); None where a bound is NaN (the caller computes the mask itself)."""
        top = bottom + kept - 1
        low = self._value(bottom, at) if bottom > 0 else None
        high = self._value(top, at) if top < self.numel - 1 else None
        if any(bound is not None and bound != bound for bound in (low, high)):
            return None
        return BandKeep(low, int(self.order[bottom]), high, int(self.order[top]))

    @property
    def nbytes(self) -> int:
        return self.numel * self.order.element_size()


class Prepared:
    """A per-worker store of gene-free merge inputs (see the module doc)."""

    def __init__(self, skip_unchanged: bool = True, keep_masks: bool = True) -> None:
        # the merger passes an expert equal to the base as the base itself (off: every tensor is
        # merged in full, what a fine-tune touching every tensor costs; benchmarks/real_model.py)
        self.skip_unchanged = skip_unchanged
        # off: only that skip, for a single merge (`evomerge merge`), where sorting magnitudes or
        # keeping draws would cost more than computing each mask once
        self.keep_masks = keep_masks
        # (kind, id(base), id(expert)) -> (base ref, expert ref, base version, expert version, value)
        self._pairs: dict[tuple[str, int, int], tuple[weakref.ref, weakref.ref, int, int, object]] = {}
        self._draws: dict[tuple[int, int, int], torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[Prepared]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @property
    def nbytes(self) -> int:
        """Bytes the store holds (magnitude orders and draws; a few bytes per tensor pair besides)."""
        kept = [entry[-1] for entry in self._pairs.values()]
        return (sum(value.nbytes for value in kept if isinstance(value, MagnitudeOrder))
                + sum(value.numel() * value.element_size() for value in kept if isinstance(value, torch.Tensor))
                + sum(d.numel() * d.element_size() for d in self._draws.values()))

    def _pair(self, kind: str, base: torch.Tensor, expert: torch.Tensor, build: Callable[[], object]) -> object:
        """The kept value of (kind, base, expert), built by `build()` when missing or when either
        tensor was freed or changed in place since."""
        key = (kind, id(base), id(expert))
        entry = self._pairs.get(key)
        if entry is not None:
            base_ref, expert_ref, base_version, expert_version, value = entry
            if (base_ref() is base and expert_ref() is expert
                    and _version(base) == base_version and _version(expert) == expert_version):
                return value
        value = build()
        self._pairs[key] = (weakref.ref(base), weakref.ref(expert), _version(base), _version(expert), value)
        return value

    def magnitude_order(self, base: torch.Tensor, expert: torch.Tensor,
                        magnitude: Callable[[], torch.Tensor]) -> MagnitudeOrder:
        """The kept order of |expert - base|; `magnitude()` (that tensor, flat) builds it when missing."""
        return self._pair("order", base, expert, lambda: MagnitudeOrder(magnitude()))  # type: ignore[return-value]

    def twice_rank_norm(self, base: torch.Tensor, expert: torch.Tensor,
                        build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """DELLA's kept row ranks of |expert - base| normalized to [0, 1], times 2 (exact; flat):
        `build()` makes them."""
        return self._pair("ranks", base, expert, build)  # type: ignore[return-value]

    def same_as_base(self, base: torch.Tensor, expert: torch.Tensor) -> bool:
        """Whether `expert` holds bit for bit what `base` holds (its task vector is zero), checked
        once per pair. Such an expert can be replaced by the base tensor itself in any merge:
        the values are the same, and methods recognize the base object (see methods.py)."""
        return self._pair("same", base, expert, lambda: bitwise_equal(base, expert))  # type: ignore[return-value]

    def draws(self, key: tuple[int, int, int]) -> torch.Tensor | None:
        return self._draws.get(key)

    def keep_draws(self, key: tuple[int, int, int], draws: torch.Tensor) -> None:
        self._draws[key] = draws


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (unlike torch.equal, -0.0 differs from 0.0 and equal NaNs are equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(a.element_size())
    if bits is None or not (a.is_contiguous() and b.is_contiguous()):
        return bool(torch.equal(a, b)) and bool(torch.equal(torch.signbit(a), torch.signbit(b)))
    return bool(torch.equal(a.view(bits), b.view(bits)))


def _version(tensor: torch.Tensor) -> int:
    """torch's count of in-place changes; -1 for an inference tensor (it has none, and cannot
    be changed outside inference mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


def active() -> Prepared | None:
    """The active store, or None (then merges compute everything themselves)."""
    return _ACTIVE.get()
