"""The compiled mix (evomerge/merge/fused.py) gives the eager path's values, and falls back to it."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

import pytest
import torch

from evomerge.merge import fused, get_method
from evomerge.merge.chunked import mix_task_vectors_into
from evomerge.merge.prepared import MIN_NUMEL, Prepared


def _sources(numel: int, experts: int, seed: int = 0):
    """Float32 base and experts whose deltas are multiples of 1e-4 (many ties at every magnitude,
    so the tie cut-offs matter), one expert equal to the base on its first 1000 entries."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    out = [base + (torch.randn(numel, generator=g) * 100).round() / 10_000 for _ in range(experts)]
    out[-1][:1000] = base[:1000]
    return base.reshape(-1, 7), [x.reshape(-1, 7) for x in out]


def _merged(method: str, base, experts, compiled: bool, monkeypatch, store: bool = True, **genes) -> torch.Tensor:
    monkeypatch.setattr(fused, "_ENABLED", compiled)
    out = torch.empty_like(base)
    with Prepared().active() if store else contextlib.nullcontext():
        get_method(method).fn(base, experts, out=out, **genes)
    return out


# The compiled loop needs a C compiler (any Linux or macOS development machine has one); without it
# the eager path runs, which the last test checks.
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                    reason="no C compiler (cc or $CC): the compiled loop cannot be built")

CASES = [
    ("ties", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.5, 1.0]}),
    ("ties", {"weight": [0.4, -0.3, 0.5], "density": [0.2, 0.5, 0.7], "normalize": False, "lambda_": 0.7}),
    ("ties", {"weight": [1e-3, 0.0, 2.0], "density": [0.9, 0.05, 0.5]}),
    ("breadcrumbs_ties", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.5, 0.7], "gamma": [0.01, 0.0, 0.2]}),
    ("breadcrumbs", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.99, 0.7], "gamma": [0.01] * 3,
                     "normalize": True}),
    ("task_arithmetic", {"weight": [0.4, 0.3, 0.5], "lambda_": 1.3}),
    ("dare_ties", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 1.0, 0.7], "seed": 5, "rescale": False}),
    ("dare_linear", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.6, 0.7], "seed": 5, "rescale": "density"}),
    ("della", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.6, 0.7], "epsilon": [0.1, 0.2, 0.05], "seed": 3,
               "rescale": False}),
]
# the rescales to an L1 norm: summed by the C loop in its own order, whatever the mask's form
RESCALED = [
    ("dare_ties", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 1.0, 0.7], "seed": 5}),
    ("dare_linear", {"weight": [0.4, -0.3, 0.5], "density": [0.3, 0.6, 0.7], "seed": 5, "normalize": True}),
    ("della", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.6, 0.7], "epsilon": [0.1, 0.2, 0.05], "seed": 3}),
    ("della_linear", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.6, 0.7], "epsilon": [0.1, 0.2, 0.05],
                      "seed": 3}),
    ("ties", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.5, 0.7], "rescale": True}),
    ("breadcrumbs_ties", {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.5, 0.7], "gamma": [0.01] * 3,
                          "rescale": True}),
]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, genes", CASES)
def test_compiled_mix_equals_eager(method: str, genes: dict, dtype: torch.dtype, monkeypatch) -> None:
    # 7 x odd rows: not a multiple of the vector width, so the loop's last entries are exercised;
    # bfloat16 sources and target: read widened, computed in float32, narrowed by torch
    base, experts = _sources(7 * (MIN_NUMEL + 1001), 3)
    base, experts = base.to(dtype), [x.to(dtype) for x in experts]
    assert fused.library() is not None
    eager = _merged(method, base, experts, False, monkeypatch, **genes)
    compiled = _merged(method, base, experts, True, monkeypatch, **genes)
    assert torch.equal(compiled, eager)  # up to the sign of a zero, as documented
    assert not torch.equal(eager, base)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method, genes", RESCALED)
def test_rescaled_merges_are_the_same_with_and_without_the_store(method: str, genes: dict, dtype: torch.dtype,
                                                                   monkeypatch) -> None:
    """A worker (store: compiled mix) and an export (no store: bool masks, eager mix) give the same
    tensor; torch's own sums (no compiled loop at all) give it up to float rounding."""
    base, experts = _sources(7 * (MIN_NUMEL + 1001), 3)
    base, experts = base.to(dtype), [x.to(dtype) for x in experts]
    worker = _merged(method, base, experts, True, monkeypatch, **genes)
    export = _merged(method, base, experts, True, monkeypatch, store=False, **genes)
    assert torch.equal(worker, export)
    eager = _merged(method, base, experts, False, monkeypatch, store=False, **genes)
    if dtype == torch.float32:
        torch.testing.assert_close(worker, eager, rtol=1e-6, atol=1e-6)
    else:  # a last-bit difference in float32 can round to the next bfloat16
        torch.testing.assert_close(worker.float(), eager.float(), rtol=1e-2, atol=1e-2)


@needs_compiler
def test_l1_norms_match_torch_and_agree_across_mask_forms() -> None:
    base, [expert] = _sources(7 * MIN_NUMEL + 7 * 5, 1)
    keep = torch.rand(base.numel(), generator=torch.Generator().manual_seed(1)) < 0.3
    before, after = fused.l1_norms(base, expert, keep)
    magnitude = (expert - base).abs().reshape(-1).double()
    assert before == pytest.approx(float(magnitude.sum()), rel=1e-12)
    assert after == pytest.approx(float(magnitude[keep].sum()), rel=1e-12)
    draws = torch.rand(base.numel(), generator=torch.Generator().manual_seed(2))
    from evomerge.merge.prepared import DrawKeep
    assert fused.l1_norms(base, expert, DrawKeep(draws, 0.4)) == fused.l1_norms(base, expert, draws < 0.4)


@needs_compiler
@pytest.mark.parametrize("count", [1, 2, 5, 8])
@pytest.mark.parametrize("consensus, normalize", [(True, True), (True, False), (False, True), (False, False)])
def test_every_expert_count_and_flag(count: int, consensus: bool, normalize: bool, monkeypatch) -> None:
    base, experts = _sources(7 * MIN_NUMEL + 7 * 13, count, seed=count)
    base, experts = base.reshape(-1), [x.reshape(-1) for x in experts]
    weight = [0.3 + 0.1 * i for i in range(count)]
    factors = [1.0 + 0.01 * i for i in range(count)]  # as a rescale gives them
    common = dict(consensus=consensus, normalize=normalize, lambda_=0.9)
    expected = torch.empty_like(base)
    monkeypatch.setattr(fused, "_ENABLED", False)
    mix_task_vectors_into(expected, base, experts, weight, torch.float32,
                          factors=factors, **common)
    monkeypatch.setattr(fused, "_ENABLED", True)
    got = torch.full_like(base, float("nan"))
    assert fused.mix_into(got, base, experts, [None] * count, [w * f for w, f in zip(weight, factors)], weight,
                          divisor=sum(weight), **common)
    assert torch.equal(got, expected)


def test_what_it_does_not_take_is_left_to_the_eager_path() -> None:
    base, experts = _sources(7 * MIN_NUMEL, 2)
    out = torch.empty_like(base)
    common = dict(consensus=True, normalize=True, lambda_=1.0, divisor=1.0)
    bool_masks = [torch.ones(base.numel(), dtype=torch.bool)] * 2
    assert not fused.mix_into(out, base, experts, bool_masks, [1.0, 1.0], [1.0, 1.0], **common)
    half = [x.to(torch.float16) for x in (base, *experts)]
    assert not fused.mix_into(out.to(torch.float16), half[0], half[1:], [None, None], [1.0, 1.0], [1.0, 1.0],
                              **common)
    small = [x.reshape(-1)[:100] for x in (base, *experts)]
    assert not fused.mix_into(out.reshape(-1)[:100], small[0], small[1:], [None, None], [1.0, 1.0], [1.0, 1.0],
                              **common)


def test_without_a_compiler_it_merges_eagerly_and_says_so(tmp_path, monkeypatch, caplog) -> None:
    base, experts = _sources(7 * MIN_NUMEL, 3)
    genes = {"weight": [0.4, 0.3, 0.5], "density": [0.3, 0.5, 0.7]}
    eager = _merged("ties", base, experts, False, monkeypatch, **genes)
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(fused, "_library", None)
    monkeypatch.setattr(fused, "_failed", False)
    with caplog.at_level(logging.WARNING, logger="evomerge.merge.fused"):
        got = _merged("ties", base, experts, True, monkeypatch, **genes)
    assert torch.equal(got, eager)
    assert fused._failed and "no compiled mix" in caplog.text and "no-such-compiler" in caplog.text
