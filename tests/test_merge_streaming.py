"""The streamed kernels (evomerge/merge/chunked.py) against the whole-tensor formulas of tensor_ops,
on tensors of several slices, with ties at TIES's magnitude threshold and narrow dtypes."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import get_method
from evomerge.merge.chunked import CHUNK, random_mask
from evomerge.merge.tensor_ops import (
    BAND_MIN_NUMEL,
    _kth_largest_in_band,
    expert_generator,
    kth_largest,
    merge_task_vectors,
    resolve_rescale,
    sparsify_magnitude,
    sparsify_random,
    task_vectors,
    weighted_sum,
)

NUMEL = 5 * ((2 * CHUNK + 12_345) // 5)  # three slices, the last one short
SHAPE = (NUMEL // 5, 5)


def sources(count: int = 3, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and experts near it; task vectors rounded to a coarse grid so that many entries tie
    in magnitude (TIES's tie rule is then exercised across slices)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=generator)
    experts = [base + (torch.randn(SHAPE, generator=generator) * 8).round() / 64 for _ in range(count)]
    return base, experts


def reference(method: str, base, experts, seed: int = 0, **genes) -> torch.Tensor:
    """The whole-tensor formula (tensor_ops), as the methods computed before streaming."""
    weight, density = genes.get("weight"), genes.get("density")
    if method == "linear":
        return weighted_sum(experts, weight) / sum(weight)
    if method == "task_arithmetic":
        return merge_task_vectors(base, task_vectors(base, experts), weight, consensus=False, normalize=False,
                                  lambda_=1.0)
    if method == "ties":
        deltas = [sparsify_magnitude(d, density[i]) for i, d in enumerate(task_vectors(base, experts))]
        return merge_task_vectors(base, deltas, weight, consensus=True, normalize=True, lambda_=1.0)
    mode = resolve_rescale(True, natural="l1")
    deltas = [sparsify_random(d, density[i], expert_generator(seed, i), mode)
              for i, d in enumerate(task_vectors(base, experts))]
    return merge_task_vectors(base, deltas, weight, consensus=method == "dare_ties", normalize=False, lambda_=1.0)


@pytest.mark.parametrize("method, genes", [
    ("linear", {"weight": [0.3, 0.9, 0.5]}),
    ("task_arithmetic", {"weight": [0.3, 0.9, -0.5]}),
    ("ties", {"weight": [0.7, 0.4, 1.1], "density": [0.3, 0.55, 1.0]}),
    ("dare_ties", {"weight": [0.7, 0.4, 1.1], "density": [0.3, 0.55, 1.0]}),
    ("dare_linear", {"weight": [0.7, 0.4, 1.1], "density": [0.3, 0.55, 1.0]}),
])
def test_streamed_methods_equal_the_whole_tensor_formulas(method, genes) -> None:
    base, experts = sources()
    expected = reference(method, base, experts, seed=7, **genes)
    seed = {"seed": 7} if get_method(method).random else {}
    merged = get_method(method).fn(base, experts, **genes, **seed)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)
    out = torch.full_like(base, math.nan)  # in place: every entry written
    assert get_method(method).fn(base, experts, out=out, **genes, **seed) is out
    assert torch.equal(out, merged)


def test_ties_keeps_exactly_k_entries_across_slices_with_ties_broken_by_index() -> None:
    base, experts = sources(count=1)
    merged = get_method("ties").fn(base, experts, weight=[1.0], density=[0.37])
    kept = (merged - base) != 0
    assert int(kept.sum()) == int(0.37 * NUMEL)
    expected = sparsify_magnitude(experts[0] - base, 0.37) != 0
    assert torch.equal(kept, expected)  # the same entries, including which tied ones


def test_random_masks_are_the_whole_draw_slice_by_slice() -> None:
    whole = torch.rand(NUMEL, generator=expert_generator(3, 1)) < 0.4
    assert torch.equal(random_mask(NUMEL, 0.4, expert_generator(3, 1)), whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_narrow_dtypes_are_merged_in_float32_slice_by_slice(dtype) -> None:
    base, experts = sources()
    genes = {"weight": [0.7, 0.4, 1.1], "density": [0.3, 0.55, 1.0]}
    narrow = get_method("ties").fn(base.to(dtype), [e.to(dtype) for e in experts], **genes)
    wide = reference("ties", base.to(dtype).float(), [e.to(dtype).float() for e in experts], **genes)
    assert narrow.dtype == dtype
    torch.testing.assert_close(narrow, wide.to(dtype), rtol=0, atol=0)


def test_one_hot_weights_and_slerp_endpoints_stay_exact() -> None:
    base, experts = sources()
    assert torch.equal(get_method("linear").fn(base, experts, weight=[0.0, 1.0, 0.0]), experts[1])
    assert torch.equal(get_method("task_arithmetic").fn(base, experts, weight=[0.0, 0.0, 1.0]), experts[2])
    assert torch.equal(get_method("slerp").fn(base, experts[:1], t=0.0), base)
    assert torch.equal(get_method("slerp").fn(base, experts[:1], t=1.0), experts[0])


def _numpy_kth_largest(values: torch.Tensor, k: int) -> float:
    import numpy as np

    array = np.sort(values.numpy())  # NaN sorts last: larger than any number
    return float(array[array.size - k])


@pytest.mark.parametrize("case", ["normal", "columns", "ties", "constant", "nan", "inf", "float64"])
def test_kth_largest_equals_a_full_sort_for_large_tensors(case) -> None:
    """The banded selection (tensors of BAND_MIN_NUMEL entries or more) returns the order statistic a
    full sort gives, for every k tried, whether its sample finds the band or not."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = 1024, BAND_MIN_NUMEL // 1024 + 8
    values = torch.randn(rows, cols, generator=generator).abs_()
    if case == "columns":  # every column its own scale: a strided sample must cross them all
        values *= torch.logspace(-3, 3, cols)
    elif case == "ties":
        values = (values * 4).round_()
    elif case == "constant":
        values = torch.full((rows, cols), 0.25)
    elif case == "nan":
        values.view(-1)[::997] = math.nan
    elif case == "inf":
        values.view(-1)[::4099] = math.inf
    elif case == "float64":
        values = values.double()
    flat = values.flatten()
    assert flat.numel() >= BAND_MIN_NUMEL
    before = flat.clone()
    for k in (1, 2, 1000, flat.numel() // 3, flat.numel() // 2, flat.numel() - 1, flat.numel()):
        got = kth_largest(flat, k)
        expected = _numpy_kth_largest(flat, k)
        assert got.dtype == flat.dtype and (float(got) == expected or math.isnan(expected) and got.isnan()), (case, k)
    assert torch.equal(flat.nan_to_num(), before.nan_to_num())  # left as it was
    if case in ("normal", "columns", "ties", "float64"):  # the band was found, not the full partition's fallback
        assert _kth_largest_in_band(flat, flat.numel() // 2) is not None
