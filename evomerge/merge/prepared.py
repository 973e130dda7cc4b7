"""What a sparsifying merge computes that no gene changes, computed once and kept.

Over one search the sources and the run seed are fixed; only the genes (weights, densities)
change from candidate to candidate. TIES's trim and DARE's drop each start from something that
depends on the sources alone:

- TIES (and dare's relatives that trim by magnitude): the order of each task vector's entries
  by magnitude. `MagnitudeOrder` keeps it as one byte per entry, the entry's rank bucket (256
  buckets of equal size in the order "largest |delta| first, ties by lowest flat index"). The
  keep mask of a density is then the entries of the buckets above the k-th entry's bucket plus
  the first entries of that one bucket (about n / 256 entries, gathered and sorted): the same
  set `chunked.magnitude_mask` finds by partitioning the whole tensor, exactly, with one pass
  over a byte per entry instead of several over the task vector.
- DARE: the uniform draws behind its masks. The mask of a density is `draws < density`; the
  draws of (seed, expert, tensor) are those `chunked.random_mask` draws, so the mask is exactly
  the same. Kept as float32: 4 bytes per entry and expert.

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

BUCKETS = 256  # rank buckets of a magnitude order: one uint8 per entry
MIN_NUMEL = 1 << 14  # smaller tensors are cheap to trim from scratch: not kept

_ACTIVE: contextvars.ContextVar[Prepared | None] = contextvars.ContextVar("evomerge_prepared", default=None)


class MagnitudeOrder:
    """The entries of |expert - base| (flattened) in descending order, as rank buckets."""

    def __init__(self, base: torch.Tensor, expert: torch.Tensor, magnitude: torch.Tensor):
        self.numel = magnitude.numel()
        self.step = -(-self.numel // BUCKETS)  # entries per bucket (the last may hold fewer)
        order = torch.argsort(magnitude, descending=True, stable=True)
        self.bucket = torch.empty(self.numel, dtype=torch.uint8, device=magnitude.device)
        self.bucket[order] = torch.div(torch.arange(self.numel, device=magnitude.device), self.step,
                                       rounding_mode="floor").to(torch.uint8)
        self._base, self._expert = base.reshape(-1), expert.reshape(-1)

    def top(self, k: int, work: torch.dtype) -> torch.Tensor:
        """The keep mask of the k largest magnitudes, ties at the k-th by lowest flat index."""
        j = (k - 1) // self.step
        take = k - j * self.step  # from bucket j, 1..step
        keep = self.bucket < j
        band = torch.nonzero(self.bucket == j).flatten()  # flat order
        magnitude = torch.sub(self._expert[band].to(work), self._base[band].to(work)).abs_()
        keep[band[torch.argsort(magnitude, descending=True, stable=True)[:take]]] = True
        return keep

    @property
    def nbytes(self) -> int:
        return self.bucket.numel()


class Prepared:
    """A per-worker store of gene-free merge inputs (see the module doc)."""

    def __init__(self) -> None:
        self._orders: dict[tuple[int, int], tuple[weakref.ref, weakref.ref, int, int, MagnitudeOrder]] = {}
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
        """Bytes the store holds (rank buckets and draws)."""
        return (sum(entry[-1].nbytes for entry in self._orders.values())
                + sum(d.numel() * d.element_size() for d in self._draws.values()))

    def magnitude_order(self, base: torch.Tensor, expert: torch.Tensor,
                        magnitude: Callable[[], torch.Tensor]) -> MagnitudeOrder:
        """The kept order of |expert - base|; `magnitude()` (that tensor, flat) builds it when missing."""
        key = (id(base), id(expert))
        entry = self._orders.get(key)
        if entry is not None:
            base_ref, expert_ref, base_version, expert_version, order = entry
            if (base_ref() is base and expert_ref() is expert
                    and _version(base) == base_version and _version(expert) == expert_version):
                return order
        order = MagnitudeOrder(base, expert, magnitude())
        self._orders[key] = (weakref.ref(base), weakref.ref(expert), _version(base), _version(expert), order)
        return order

    def draws(self, key: tuple[int, int, int]) -> torch.Tensor | None:
        return self._draws.get(key)

    def keep_draws(self, key: tuple[int, int, int], draws: torch.Tensor) -> None:
        self._draws[key] = draws


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
