"""Merge methods on small hand-computed tensors (no models)."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.errors import MergeError
from evomerge.merge import METHODS, MergeMethod, get_method, register
from evomerge.merge.tensor_ops import expert_generator, sparsify_magnitude, sparsify_random

T = torch.tensor


def merge(name: str, base: torch.Tensor, experts: list[torch.Tensor], **kwargs) -> torch.Tensor:
    return get_method(name).fn(base, experts, **kwargs)


def genes_for(method: MergeMethod, n: int, weight: list[float] | None = None, density: float = 1.0) -> dict:
    values = {"weight": weight or [1.0 / n] * n, "density": [density] * n, "gamma": [0.05] * n,
              "epsilon": [0.1] * n, "scale": [1.0] * n, "t": 0.5}
    return {g: values[g] for g in method.genes}


# ---------------------------------------------------------------- registry

def test_registry_lists_the_methods_with_their_metadata():
    assert list(METHODS) == ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp",
                             "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock",
                             "nuslerp", "multislerp", "passthrough"]
    assert get_method("linear").genes == ("weight",) and not get_method("linear").needs_base
    assert get_method("ties").genes == ("weight", "density") and not get_method("ties").random
    assert get_method("dare_ties").random and get_method("dare_linear").random
    slerp = get_method("slerp")
    assert slerp.genes == ("t",) and slerp.max_experts == 1 and slerp.needs_base
    assert all(m.reference.startswith("https://") and m.name == n for n, m in METHODS.items())


def test_unknown_method_message_lists_the_valid_names():
    with pytest.raises(MergeError) as err:
        get_method("average")
    assert str(err.value) == (
        "unknown merge method 'average'; expected one of: "
        "linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, breadcrumbs, breadcrumbs_ties, "
        "della, della_linear, model_stock, nuslerp, multislerp, passthrough"
    )


def test_register_rejects_duplicates_and_unknown_genes():
    with pytest.raises(ValueError):
        register("linear", genes=("weight",), needs_base=False, reference="x")
    with pytest.raises(ValueError):
        register("other", genes=("alpha",), needs_base=False, reference="x")


# ---------------------------------------------------------------- linear

def test_linear_hand_computed():
    e1, e2 = T([1.0, 2.0, 3.0]), T([3.0, 6.0, 9.0])
    base = torch.zeros(3)
    assert torch.equal(merge("linear", base, [e1, e2], weight=[1, 3]), T([2.5, 5.0, 7.5]))
    assert torch.equal(merge("linear", base, [e1, e2], weight=[1, 3], normalize=False), T([10.0, 20.0, 30.0]))


def test_linear_one_hot_reproduces_expert_exactly():
    g = torch.Generator().manual_seed(0)
    base, e1, e2, e3 = (torch.randn(5, 7, generator=g) for _ in range(4))
    assert torch.equal(merge("linear", base, [e1, e2, e3], weight=[0, 1, 0]), e2)
    assert torch.equal(merge("linear", base, [e1, e2, e3], weight=[1, 0, 0]), e1)


def test_linear_zero_weight_sum_is_a_merge_error():
    e = torch.ones(3)
    with pytest.raises(MergeError, match="sum to"):
        merge("linear", e, [e, e], weight=[0.5, -0.5])
    assert torch.equal(merge("linear", e, [e, e], weight=[0.5, -0.5], normalize=False), torch.zeros(3))


# ---------------------------------------------------------------- task arithmetic

def test_task_arithmetic_hand_computed():
    base, e1, e2 = T([1.0, 1.0, 1.0]), T([2.0, 0.0, 1.0]), T([1.0, 3.0, -1.0])
    # deltas (1, -1, 0) and (0, 2, -2); 0.5 * d1 + 0.25 * d2 = (0.5, 0, -0.5)
    out = merge("task_arithmetic", base, [e1, e2], weight=[0.5, 0.25])
    assert torch.equal(out, T([1.5, 1.0, 0.5]))
    out = merge("task_arithmetic", base, [e1, e2], weight=[0.5, 0.25], lambda_=2.0)
    assert torch.equal(out, T([2.0, 1.0, 0.0]))
    # normalize: divided by 0.75 -> (2/3, 0, -2/3)
    out = merge("task_arithmetic", base, [e1, e2], weight=[0.5, 0.25], normalize=True)
    torch.testing.assert_close(out, T([1 + 2 / 3, 1.0, 1 / 3]))


def test_task_arithmetic_one_hot_and_zero_weights_are_exact():
    g = torch.Generator().manual_seed(1)
    base, e1, e2 = (torch.randn(4, 6, generator=g) for _ in range(3))
    assert torch.equal(merge("task_arithmetic", base, [e1, e2], weight=[1, 0]), e1)
    assert torch.equal(merge("task_arithmetic", base, [e1, e2], weight=[0, 1]), e2)
    assert torch.equal(merge("task_arithmetic", base, [e1, e2], weight=[0, 0]), base)
    assert torch.equal(merge("task_arithmetic", base, [e1, e2], weight=[3, 0], normalize=True), e1)
    assert torch.equal(merge("task_arithmetic", base, [e1, e2], weight=[0, 2], lambda_=0.5), e2)
    # bf16 in, bf16 out, still exact
    b16 = [x.bfloat16() for x in (base, e1, e2)]
    assert torch.equal(merge("task_arithmetic", b16[0], b16[1:], weight=[0, 1]), b16[2])
    assert torch.equal(merge("task_arithmetic", b16[0], b16[1:], weight=[0, 0]), b16[0])


# ---------------------------------------------------------------- ties

BASE4 = T([1.0, 1.0, 1.0, 1.0])
# task vectors d1 = (3, -1, 0.5, -2), d2 = (-4, 2, 0.25, 1)
E1 = BASE4 + T([3.0, -1.0, 0.5, -2.0])
E2 = BASE4 + T([-4.0, 2.0, 0.25, 1.0])


def test_ties_hand_computed_trim_elect_disjoint_mean():
    # density 0.5 -> k = 2: d1 -> (3, 0, 0, -2), d2 -> (-4, 2, 0, 0)
    # weights (1, 0.5): weighted (3, 0, 0, -2) and (-2, 1, 0, 0); sums (1, 1, 0, -2)
    # elected signs (+, +, + [sum 0 counts as +], -); agreeing: e1 at 0 and 3, e2 at 1
    # disjoint mean: (3/1, 1/0.5, 0 [divisor 0 -> 1], -2/1) = (3, 2, 0, -2)
    out = merge("ties", BASE4, [E1, E2], weight=[1.0, 0.5], density=[0.5, 0.5])
    assert torch.equal(out, BASE4 + T([3.0, 2.0, 0.0, -2.0]))
    out = merge("ties", BASE4, [E1, E2], weight=[1.0, 0.5], density=[0.5, 0.5], normalize=False)
    assert torch.equal(out, BASE4 + T([3.0, 1.0, 0.0, -2.0]))
    out = merge("ties", BASE4, [E1, E2], weight=[1.0, 0.5], density=[0.5, 0.5], lambda_=0.5)
    assert torch.equal(out, BASE4 + T([1.5, 1.0, 0.0, -1.0]))


def test_ties_sign_tie_elects_positive():
    base = torch.zeros(2)
    out = merge("ties", base, [T([1.0, -1.0]), T([-1.0, -3.0])], weight=[1, 1], density=[1, 1])
    # sums (0, -4): elected (+, -): index 0 keeps only +1; index 1 averages -1 and -3
    assert torch.equal(out, T([1.0, -2.0]))


def test_ties_density_per_expert_and_rescale_l1():
    # d1 at density 0.5 -> (3, 0, 0, -2); L1 6.5 -> 5 rescaled by 1.3
    out = merge("ties", BASE4, [E1], weight=[1.0], density=[0.5], rescale=True)
    torch.testing.assert_close(out, BASE4 + T([3.9, 0.0, 0.0, -2.6]))
    # d1 at density 0.75 -> k = 3, the three largest |d1|: (3, -1, 0, -2)
    out = merge("ties", BASE4, [E1], weight=[1.0], density=[0.75])
    assert torch.equal(out, BASE4 + T([3.0, -1.0, 0.0, -2.0]))


def test_magnitude_trim_k_rule_and_ties_at_the_threshold():
    assert torch.equal(sparsify_magnitude(T([1.0, 1.0, 1.0, 1.0]), 0.5), T([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(sparsify_magnitude(T([1.0, -3.0, 2.0]), 0.5), T([0.0, -3.0, 0.0]))  # int(1.5) = 1
    assert torch.equal(sparsify_magnitude(T([1.0, -3.0, 2.0]), 0.1), T([0.0, -3.0, 0.0]))  # k = 0 -> 1
    assert torch.equal(sparsify_magnitude(T([[2.0, -2.0], [5.0, 2.0]]), 0.75), T([[2.0, -2.0], [5.0, 0.0]]))


def test_ties_density_one_one_hot_gives_expert():
    g = torch.Generator().manual_seed(2)
    base, e1, e2 = (torch.randn(8, 8, generator=g) for _ in range(3))
    for name in ("ties", "dare_ties", "dare_linear"):
        out = merge(name, base, [e1, e2], weight=[1, 0], density=[1, 1])
        torch.testing.assert_close(out, e1, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- dare

def test_dare_density_one_hand_computed():
    # dare_linear = task arithmetic at density 1; dare_ties = ties at density 1 without normalize
    out = merge("dare_linear", BASE4, [E1, E2], weight=[1.0, 0.5], density=[1, 1])
    assert torch.equal(out, BASE4 + T([1.0, 0.0, 0.625, -1.5]))
    out = merge("dare_ties", BASE4, [E1, E2], weight=[1.0, 0.5], density=[1, 1])
    # weighted (3, -1, 0.5, -2), (-2, 1, 0.125, 0.5); sums (1, 0, 0.625, -1.5) -> (+, +, +, -)
    assert torch.equal(out, BASE4 + T([3.0, 1.0, 0.625, -2.0]))
    out = merge("dare_ties", BASE4, [E1, E2], weight=[1.0, 0.5], density=[1, 1], normalize=True)
    assert torch.equal(out, BASE4 + T([3.0, 2.0, 0.625 / 1.5, -2.0]))


def test_dare_kept_entries_are_rescaled_to_the_l1_norm_or_by_one_over_density():
    delta, zeros = torch.arange(1, 1001, dtype=torch.float32), torch.zeros(1000)
    kwargs = {"weight": [1.0], "density": [0.25], "seed": 3}
    out = merge("dare_linear", zeros, [delta], **kwargs)  # default: L1 norm kept, as mergekit 0.1.5
    kept = out != 0
    torch.testing.assert_close(out.abs().sum(), delta.sum())
    torch.testing.assert_close(out[kept], delta[kept] * (delta.sum() / delta[kept].sum()))
    out = merge("dare_linear", zeros, [delta], **kwargs, rescale=False)
    assert torch.equal(out[kept], delta[kept]) and torch.equal(out != 0, kept)
    out = merge("dare_linear", zeros, [delta], **kwargs, rescale="density")  # the paper's 1/density
    torch.testing.assert_close(out[kept], delta[kept] / 0.25)
    # the same uniforms decide every density: a lower density keeps a subset
    sparser = merge("dare_linear", zeros, [delta], weight=[1.0], density=[0.1], seed=3) != 0
    assert torch.equal(sparser & kept, sparser)


def test_dare_same_seed_same_output_different_seed_different():
    g = torch.Generator().manual_seed(4)
    base, e1, e2 = (torch.randn(64, 64, generator=g) for _ in range(3))
    for name in ("dare_ties", "dare_linear"):
        kwargs = {"weight": [0.7, 0.5], "density": [0.4, 0.6]}
        a = merge(name, base, [e1, e2], seed=11, **kwargs)
        b = merge(name, base, [e1, e2], seed=11, **kwargs)
        c = merge(name, base, [e1, e2], seed=12, **kwargs)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_dare_experts_get_independent_masks():
    delta = torch.ones(10_000)
    out1 = sparsify_random(delta, 0.5, expert_generator(7, 0))
    out2 = sparsify_random(delta, 0.5, expert_generator(7, 1))
    agreement = ((out1 != 0) == (out2 != 0)).float().mean().item()
    assert abs(agreement - 0.5) < 0.03


def test_dare_drop_statistics():
    n, density = 100_000, 0.3
    delta = torch.rand(n, generator=torch.Generator().manual_seed(5)) + 0.5  # U[0.5, 1.5), mean 1
    out = merge("dare_linear", torch.zeros(n), [delta], weight=[1.0], density=[density], seed=6)
    kept_fraction = (out != 0).float().mean().item()
    assert abs(kept_fraction - density) < 0.01  # ~7 standard deviations
    assert abs(out.mean().item() - delta.mean().item()) < 0.03  # ~6 standard deviations


# ---------------------------------------------------------------- slerp

def test_slerp_orthogonal_unit_vectors_midpoint():
    out = merge("slerp", T([1.0, 0.0]), [T([0.0, 1.0])], t=0.5)
    torch.testing.assert_close(out, T([math.sqrt(0.5), math.sqrt(0.5)]))
    # unnormalized inputs: the angle is from the directions, the weights apply to the originals
    out = merge("slerp", T([2.0, 0.0]), [T([0.0, 1.0])], t=0.5)
    torch.testing.assert_close(out, T([2 * math.sqrt(0.5), math.sqrt(0.5)]))
    out = merge("slerp", T([1.0, 0.0]), [T([0.0, 1.0])], t=1 / 3)  # 30 degrees
    torch.testing.assert_close(out, T([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_endpoints():
    g = torch.Generator().manual_seed(8)
    base, expert = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    torch.testing.assert_close(merge("slerp", base, [expert], t=0.0), base, atol=1e-6, rtol=0)
    torch.testing.assert_close(merge("slerp", base, [expert], t=1.0), expert, atol=1e-6, rtol=0)
    assert torch.equal(merge("slerp", base, [expert], t=0.0), base)
    assert torch.equal(merge("slerp", base, [expert], t=1.0), expert)


def test_slerp_colinear_falls_back_to_lerp():
    out = merge("slerp", T([1.0, 2.0]), [T([2.0, 4.0])], t=0.25)
    torch.testing.assert_close(out, T([1.25, 2.5]))
    out = merge("slerp", T([1.0, 0.0]), [T([-1.0, 0.0])], t=0.5)  # opposite: |cos| = 1
    torch.testing.assert_close(out, T([0.0, 0.0]))


def test_slerp_threshold_is_0_9995():
    base = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for cos, spherical in ((0.9996, False), (0.9994, True)):
        expert = torch.tensor([cos, math.sqrt(1 - cos**2)], dtype=torch.float64)
        out = merge("slerp", base, [expert], t=0.5)
        half = math.acos(cos) / 2
        if spherical:
            expected = torch.tensor([math.cos(half), math.sin(half)], dtype=torch.float64)
        else:
            expected = (base + expert) / 2
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_slerp_needs_exactly_one_expert_and_t_in_range():
    v = torch.ones(3)
    with pytest.raises(MergeError, match="at most 1"):
        merge("slerp", v, [v, v], t=0.5)
    with pytest.raises(MergeError, match="at least 1"):
        merge("slerp", v, [], t=0.5)
    with pytest.raises(MergeError, match="missing 't'"):
        merge("slerp", v, [v])
    with pytest.raises(MergeError, match=r"\[0, 1\]"):
        merge("slerp", v, [v], t=1.5)
    with pytest.raises(MergeError, match="does not take 'weight'"):
        merge("slerp", v, [v], t=0.5, weight=[1.0])


# ---------------------------------------------------------------- dtypes, purity, validation

@pytest.mark.parametrize("name", list(METHODS))
def test_bf16_in_bf16_out_close_to_float32(name):
    g = torch.Generator().manual_seed(9)
    base, e1 = torch.randn(32, 8, generator=g), torch.randn(32, 8, generator=g)
    experts = [e1] if get_method(name).max_experts == 1 else [e1, torch.randn(32, 8, generator=g)]
    kwargs = genes_for(get_method(name), len(experts), density=0.7)
    ref = merge(name, base.bfloat16().float(), [e.bfloat16().float() for e in experts], **kwargs)
    out = merge(name, base.bfloat16(), [e.bfloat16() for e in experts], **kwargs)
    assert out.dtype == torch.bfloat16 and out.shape == base.shape
    torch.testing.assert_close(out, ref.bfloat16())


@pytest.mark.parametrize("name", list(METHODS))
def test_inputs_are_not_modified_and_output_is_new(name):
    g = torch.Generator().manual_seed(10)
    base, e1, e2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3))
    experts = [e1] if get_method(name).max_experts == 1 else [e1, e2]
    copies = [base.clone(), *(e.clone() for e in experts)]
    kwargs = genes_for(get_method(name), len(experts), weight=[1.0, 0.0][: len(experts)])
    out = merge(name, base, experts, **kwargs)
    assert out.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip([base, *experts], copies))
    assert all(out.data_ptr() != x.data_ptr() for x in [base, *experts])


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(MergeError, match=r"expert 1 has shape \(3, 2\); expected base's shape \(2, 3\)"):
        merge("linear", torch.zeros(2, 3), [torch.zeros(2, 3), torch.zeros(3, 2)], weight=[1, 1])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density(density):
    v = torch.ones(4)
    with pytest.raises(MergeError, match="density"):
        merge("ties", v, [v], weight=[1.0], density=[density])


def test_missing_wrong_length_and_undeclared_genes():
    v = torch.ones(4)
    with pytest.raises(MergeError, match="missing 'weight'"):
        merge("linear", v, [v, v])
    with pytest.raises(MergeError, match="missing 'density'"):
        merge("dare_ties", v, [v], weight=[1.0])
    with pytest.raises(MergeError, match=r"got 1 weight value\(s\); expected one per expert \(2\)"):
        merge("task_arithmetic", v, [v, v], weight=[1.0])
    with pytest.raises(MergeError, match="does not take 'density'"):
        merge("linear", v, [v], weight=[1.0], density=[0.5])
    with pytest.raises(MergeError, match="not a finite number"):
        merge("linear", v, [v], weight=[float("inf")])


def test_unknown_option_and_bad_rescale():
    v = torch.ones(4)
    with pytest.raises(MergeError, match="unknown option"):
        merge("linear", v, [v], weight=[1.0], normalise=False)
    with pytest.raises(MergeError, match="rescale"):
        merge("dare_linear", v, [v], weight=[1.0], density=[0.5], rescale="l2")


def test_non_float_tensors_are_rejected():
    v = torch.ones(4, dtype=torch.int64)
    with pytest.raises(MergeError, match="floating-point"):
        merge("linear", v, [v], weight=[1.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dare_masks_identical_on_cpu_and_cuda():
    g = torch.Generator().manual_seed(12)
    base, e1, e2 = (torch.randn(128, 64, generator=g) for _ in range(3))
    kwargs = {"weight": [0.6, 0.4], "density": [0.3, 0.5], "seed": 13}
    for name in ("dare_ties", "dare_linear"):
        cpu = merge(name, base, [e1, e2], **kwargs)
        gpu = merge(name, base.cuda(), [e1.cuda(), e2.cuda()], **kwargs)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu() != base, cpu != base)
        torch.testing.assert_close(gpu.cpu(), cpu)
