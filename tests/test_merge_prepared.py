"""The prepared store (evomerge/merge/prepared.py) gives exactly the merges computed from scratch."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import get_method
from evomerge.merge.chunked import CHUNK, dare_mask, magnitude_mask, random_mask
from evomerge.merge.prepared import MIN_NUMEL, Prepared
from evomerge.merge.tensor_ops import expert_generator


def _sources(numel: int, experts: int, dtype: torch.dtype, seed: int = 0, zeros: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g).to(dtype)
    out = []
    for _ in range(experts):
        delta = torch.randn(numel, generator=g) * 0.01
        delta[torch.rand(numel, generator=g) < zeros] = 0.0  # many ties at magnitude 0
        delta[:50] = 0.005  # ties at one nonzero magnitude too
        out.append((base.float() + delta).to(dtype).reshape(-1, 128))
    return base.reshape(-1, 128), out


def as_bool(keep, base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """A mask (a bool tensor or a prepared.Keep) as a bool tensor."""
    if isinstance(keep, torch.Tensor):
        return keep
    delta = (expert.float() - base.float()).reshape(-1)
    return keep.factors(delta, slice(0, delta.numel()), torch.empty_like(delta)) == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros", [0.0, 0.7])
def test_magnitude_masks_equal_from_scratch(dtype: torch.dtype, zeros: float) -> None:
    base, experts = _sources(3 * MIN_NUMEL + 77 * 128, 2, dtype, zeros=zeros)
    store = Prepared()
    for density in (1e-6, 0.01, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99, 0.999999):
        for expert in experts:
            want = magnitude_mask(base, expert, density, torch.float32)
            with store.active():
                got = magnitude_mask(base, expert, density, torch.float32)
            zero = (expert.float() - base.float()).reshape(-1) == 0  # kept or not, a zero stays the same zero
            assert torch.equal(as_bool(got, base, expert) | zero, want | zero), density
    assert store.nbytes == 2 * base.numel() * 8  # a float32 and an int32 per entry and expert


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


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [4 * MIN_NUMEL, 2 * CHUNK + 100 * 128])  # one slice; several (ties across them)
def test_merges_equal_from_scratch(method: str, dtype: torch.dtype, numel: int) -> None:
    base, experts = _sources(numel, 3, dtype, zeros=0.3)
    fn = get_method(method).fn
    store = Prepared()
    for genes in ({"weight": [0.5, 1.0, 0.3], "density": [0.2, 0.6, 1.0]},
                  {"weight": [1.2, 0.1, 0.7], "density": [0.9, 0.05, 0.5]}):
        kwargs = {"seed": 11} if get_method(method).random else {}
        want = fn(base, experts, **genes, **kwargs)
        with store.active():
            got = fn(base, experts, **genes, **kwargs)
            again = fn(base, experts, **genes, **kwargs)
        assert torch.equal(got, want) and torch.equal(again, want)
