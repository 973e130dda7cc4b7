"""The prepared store (evomerge/merge/prepared.py) gives exactly the merges computed from scratch."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import get_method
from evomerge.merge.chunked import CHUNK, dare_mask, magnitude_mask, outlier_mask, random_mask
from evomerge.merge.prepared import MIN_NUMEL, DrawKeep, Prepared
from evomerge.merge.tensor_ops import expert_generator


def _sources(numel: int, experts: int, dtype: torch.dtype, seed: int = 0, zeros: float = 0.0, step: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g).to(dtype)
    out = []
    for _ in range(experts):
        delta = torch.randn(numel, generator=g) * 0.01
        if step:  # deltas on a grid: runs of thousands of tied magnitudes
            delta = (delta / step).round() * step
        delta[torch.rand(numel, generator=g) < zeros] = 0.0  # many ties at magnitude 0
        delta[:50] = 0.005  # ties at one nonzero magnitude too
        out.append((base.float() + delta).to(dtype).reshape(-1, 128))
    return base.reshape(-1, 128), out


def as_bool(keep, base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """A mask (a bool tensor or a prepared.Keep) as a bool tensor."""
    if isinstance(keep, torch.Tensor):
        return keep
    delta = (expert.float() - base.float()).reshape(-1)
    if isinstance(keep, DrawKeep):  # independent of the values: applied to ones, it is the mask
        delta = torch.ones_like(delta)
    kept = keep.apply(delta.clone(), slice(0, delta.numel()), torch.empty_like(delta)) != 0
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros, step", [(0.0, 0.0), (0.7, 0.0), (0.0, 1e-3)])
def test_magnitude_masks_equal_from_scratch(dtype: torch.dtype, zeros: float, step: float) -> None:
    base, experts = _sources(3 * MIN_NUMEL + 77 * 128, 2, dtype, zeros=zeros, step=step)
    store = Prepared()
    for density in (1e-6, 0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99, 0.999999):
        for expert in experts:
            want = magnitude_mask(base, expert, density, torch.float32)
            with store.active():
                got = magnitude_mask(base, expert, density, torch.float32)
            zero = (expert.float() - base.float()).reshape(-1) == 0  # kept or not, a zero stays the same zero
            assert torch.equal(as_bool(got, base, expert) | zero, want | zero), density
    assert store.nbytes == 2 * base.numel() * 4  # an int32 per entry and expert


def test_a_changed_source_is_ordered_again() -> None:
    base, [expert] = _sources(2 * MIN_NUMEL, 1, torch.float32)
    store = Prepared()
    with store.active():
        magnitude_mask(base, expert, 0.3, torch.float32)
    expert.mul_(-3.0).add_(base)
    with store.active():
        got = magnitude_mask(base, expert, 0.3, torch.float32)
    assert torch.equal(as_bool(got, base, expert), magnitude_mask(base, expert, 0.3, torch.float32))


def test_dare_masks_equal_from_scratch() -> None:
    store = Prepared()
    numel = 5 * MIN_NUMEL + 3
    for density in (0.1, 0.5, 0.9):
        for index in (0, 1):
            want = random_mask(numel, density, expert_generator(7, index))
            with store.active():
                got = dare_mask(numel, density, 7, index)
            assert torch.equal(as_bool(got, torch.zeros(numel), torch.zeros(numel)), want)
    assert store.nbytes == 2 * numel * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_masks_equal_from_scratch(dtype: torch.dtype) -> None:
    base, experts = _sources(3 * MIN_NUMEL + 77 * 128, 2, dtype, zeros=0.3)
    store = Prepared()
    for density, gamma in ((0.01, 0.01), (0.1, 0.0), (0.3, 0.05), (0.5, 0.6), (0.69, 0.3), (0.9, 0.05), (0.99, 0.01)):
        for expert in experts:
            want = outlier_mask(base, expert, density, gamma, torch.float32)
            with store.active():
                got = outlier_mask(base, expert, density, gamma, torch.float32)
            zero = (expert.float() - base.float()).reshape(-1) == 0
            assert torch.equal(as_bool(got, base, expert) | zero, want | zero), (density, gamma)


SEVERAL_SLICES = 2 * CHUNK + 100 * 128  # ties across slices


@pytest.mark.parametrize("method, numel", [
    *((method, numel) for method in ("ties", "dare_ties", "dare_linear") for numel in (4 * MIN_NUMEL, SEVERAL_SLICES)),
    *((method, SEVERAL_SLICES) for method in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear")),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merges_equal_from_scratch(method: str, dtype: torch.dtype, numel: int) -> None:
    base, experts = _sources(numel, 3, dtype, zeros=0.3)
    fn = get_method(method).fn
    store = Prepared()
    for genes in ({"weight": [0.5, 1.0, 0.3], "density": [0.2, 0.6, 1.0]},
                  {"weight": [1.2, 0.1, 0.7], "density": [0.9, 0.05, 0.5]}):
        if "gamma" in get_method(method).genes:
            genes["gamma"] = [0.01, 0.3, 0.05]
        if "epsilon" in get_method(method).genes:
            genes["epsilon"] = [0.05, 0.04, 0.0]
        kwargs = {"seed": 11} if get_method(method).random else {}
        want = fn(base, experts, **genes, **kwargs)
        with store.active():
            got = fn(base, experts, **genes, **kwargs)
            again = fn(base, experts, **genes, **kwargs)
        assert torch.equal(got, want) and torch.equal(again, want)


class _Recipe:
    """The merger's view of a recipe: one method, the same genes for every tensor."""

    def __init__(self, method: str, **genes):
        self.method, self.genes = method, genes

    def for_tensor(self, name: str) -> dict:
        return self.genes


_GENES = {
    "linear": {"weight": [0.5, 1.0, 0.3]},
    "task_arithmetic": {"weight": [0.5, 1.0, 0.3]},
    "ties": {"weight": [0.5, 1.0, 0.3], "density": [0.2, 0.6, 1.0]},
    "dare_ties": {"weight": [0.5, 1.0, 0.3], "density": [0.2, 0.6, 1.0]},
    "dare_linear": {"weight": [1.2, 0.1, 0.7], "density": [0.9, 0.05, 0.5]},
    "breadcrumbs": {"weight": [0.5, 1.0, 0.3], "density": [0.2, 0.6, 1.0], "gamma": [0.01, 0.05, 0.0]},
    "breadcrumbs_ties": {"weight": [0.5, 1.0, 0.3], "density": [0.2, 0.6, 0.9], "gamma": [0.01, 0.05, 0.02]},
    "della": {"weight": [0.5, 1.0, 0.3], "density": [0.2, 0.6, 1.0], "epsilon": [0.1, 0.2, 0.0]},
    "della_linear": {"weight": [1.2, 0.1, 0.7], "density": [0.9, 0.5, 0.5], "epsilon": [0.05, 0.2, 0.1]},
}


@pytest.mark.parametrize("method", list(_GENES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_masks", [True, False])  # a worker's store; `evomerge merge`'s skip alone
def test_experts_equal_to_the_base_merge_as_before(method: str, dtype: torch.dtype, keep_masks: bool) -> None:
    """Tensors whose experts all (or some) equal the base bit for bit merge, through the merger
    with a store (which passes such experts as the base tensor itself), to the same values as
    the full computation without a store, for every task-vector method and linear."""
    from evomerge.merge.merger import Merger

    base, experts = _sources(2 * MIN_NUMEL, 3, dtype, zeros=0.3)
    small_base, small_experts = _sources(128 * 3, 3, dtype, seed=1)
    sources = [{"all": base, "some": base.clone(), "none": base.clone(), "small": small_base}]
    for i, expert in enumerate(experts):
        sources.append({"all": base.clone(), "some": expert if i == 1 else base.clone(), "none": expert,
                        "small": small_base.clone()})
    merger = Merger(sources[0], sources[1:], seed=3)
    recipe = _Recipe(method, **_GENES[method])
    want = {name: merged.clone() for name, merged in merger.merged(recipe)}
    merger.prepared = Prepared(keep_masks=keep_masks)
    for _ in range(2):
        got = dict(merger.merged(recipe))
        for name in want:
            assert torch.equal(got[name], want[name]), name
    if method != "linear":  # a task-vector method gives the base where every task vector is zero
        assert torch.equal(want["all"], base) and torch.equal(want["small"], small_base)


def test_same_as_base_is_bitwise() -> None:
    from evomerge.merge.prepared import bitwise_equal

    a = torch.tensor([0.0, 1.0, float("nan")])
    assert bitwise_equal(a, a.clone())
    assert not bitwise_equal(a, torch.tensor([-0.0, 1.0, float("nan")]))
    assert not bitwise_equal(a, a.to(torch.float64))
    store = Prepared()
    b = a.clone()
    assert store.same_as_base(a, b)
    b[1] = 2.0  # changed in place: checked again
    assert not store.same_as_base(a, b)
