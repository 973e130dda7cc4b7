"""breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, nuslerp, multislerp, passthrough:
tensor parity with mergekit 0.1.5's own method implementations (fp32, max abs diff <= 1e-5), random
methods with the randomness removed (density 1), and their drop statistics checked separately."""

from __future__ import annotations

import mergekit.merge_methods.base as mk_base  # a test dependency (the [test] extra): missing fails, never skips
import mergekit.merge_methods.registry as mk_registry
import mergekit.sparsify as mk_sparsify
import pytest
import torch

from evomerge.errors import MergeError
from evomerge.genome import module_kind
from evomerge.merge import get_method
from evomerge.merge.tensor_ops import expert_generator, magprune_probabilities, sparsify_magprune, sparsify_outliers

TOLERANCE = 1e-5
NEW_METHODS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp",
               "multislerp", "passthrough")
SHAPES = [(64,), (12, 20), (3, 5, 7)]


def tensors(shape: tuple[int, ...], experts: int, seed: int = 0, spread: float = 0.1) -> tuple[torch.Tensor, list]:
    """A base and experts = base + a random task vector each (like fine-tunes of one base)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + spread * torch.randn(shape, generator=g) for _ in range(experts)]


def mergekit(name: str, base: torch.Tensor | None, experts: list[torch.Tensor], **parameters) -> torch.Tensor:
    """mergekit's registered method on one tensor group (base first when given)."""
    inputs = [base, *experts] if base is not None else list(experts)
    group = mk_base.TensorGroup.from_tensors(inputs, base_index=0 if base is not None else None)
    (merged,) = mk_registry.get(name)([group], parameters=parameters)
    return merged


def ours(name: str, base: torch.Tensor, experts: list[torch.Tensor], **kwargs) -> torch.Tensor:
    return get_method(name).fn(base, experts, **kwargs)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    assert (a - b).abs().max().item() <= TOLERANCE, (a - b).abs().max().item()


# ---------------------------------------------------------------- registry

def test_new_methods_are_registered_with_reference_and_genes() -> None:
    expected = {
        "breadcrumbs": ("weight", "density", "gamma"), "breadcrumbs_ties": ("weight", "density", "gamma"),
        "della": ("weight", "density", "epsilon"), "della_linear": ("weight", "density", "epsilon"),
        "model_stock": (), "nuslerp": ("weight",), "multislerp": ("weight",), "passthrough": ("scale",),
    }
    for name, genes in expected.items():
        method = get_method(name)
        assert method.genes == genes
        assert method.reference.startswith("https://")
    assert get_method("breadcrumbs").reference == mk_registry.get("breadcrumbs").spec.reference_url
    assert get_method("della").reference == "https://arxiv.org/abs/2406.11617"
    assert get_method("model_stock").reference == "https://arxiv.org/abs/2403.19522"
    assert get_method("della").random and get_method("della_linear").random
    assert not get_method("breadcrumbs").random
    assert (get_method("nuslerp").min_experts, get_method("nuslerp").max_experts) == (2, 2)
    assert get_method("model_stock").min_experts == 2
    assert get_method("passthrough").max_experts == 1 and not get_method("passthrough").needs_base


def test_expert_counts_and_extra_genes_are_checked() -> None:
    base, experts = tensors((4,), 3)
    with pytest.raises(MergeError, match="nuslerp: got 3 experts; expected at most 2"):
        ours("nuslerp", base, experts, weight=[1, 1, 1])
    with pytest.raises(MergeError, match="model_stock: got 1 experts; expected at least 2"):
        ours("model_stock", base, experts[:1])
    with pytest.raises(MergeError, match="model_stock: does not take 'weight'; its genes are: none"):
        ours("model_stock", base, experts, weight=[1, 1, 1])
    with pytest.raises(MergeError, match="breadcrumbs: missing 'gamma'"):
        ours("breadcrumbs", base, experts, weight=[1] * 3, density=[0.5] * 3)
    with pytest.raises(MergeError, match=r"gamma 1.5 is outside \[0, 1\]"):
        ours("breadcrumbs", base, experts, weight=[1] * 3, density=[0.5] * 3, gamma=[0.1, 1.5, 0.1])
    with pytest.raises(MergeError, match=r"epsilon 0.5 is outside \[0, 0.5\)"):
        ours("della", base, experts, weight=[1] * 3, density=[0.5] * 3, epsilon=[0.5] * 3)


# ---------------------------------------------------------------- parity: breadcrumbs (deterministic)

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("density, gamma", [(0.6, 0.05), (0.3, 0.2), (0.9, 0.3), (1.0, 0.1), (0.02, 0.0)])
@pytest.mark.parametrize("options", [{}, {"normalize": True, "rescale": True, "lambda": 0.8}])
def test_breadcrumbs_parity(shape, name, density, gamma, options) -> None:
    base, experts = tensors(shape, 3, seed=1)
    weight, densities, gammas = [0.7, 0.4, 1.1], [density, density * 0.9, density], [gamma, gamma, gamma / 2]
    expected = mergekit(name, base, experts, weight=weight, density=densities, gamma=gammas, **options)
    ours_options = {("lambda_" if k == "lambda" else k): v for k, v in options.items()}
    got = ours(name, base, experts, weight=weight, density=densities, gamma=gammas, **ours_options)
    assert_close(got, expected)


def test_breadcrumbs_mask_drops_the_largest_and_the_smallest() -> None:
    delta = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    kept = sparsify_outliers(delta[torch.randperm(100, generator=torch.Generator().manual_seed(0))], 0.5, 0.1)
    magnitudes = sorted(int(v) for v in kept.abs() if v != 0)
    assert magnitudes == list(range(41, 91))  # the top 10 and the bottom 40 are gone, 50 kept
    too_many = sparsify_outliers(delta, 0.95, 0.1)  # density + gamma > 1: only the top 5 go
    assert sorted(int(v) for v in too_many.abs() if v != 0) == list(range(1, 96))
    assert sparsify_outliers(delta, 1.0, 0.1) is delta


# ---------------------------------------------------------------- parity: della (randomness removed)

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("options", [{}, {"normalize": False, "rescale": False, "lambda": 1.3}])
def test_della_parity_at_density_one(shape, name, options) -> None:
    base, experts = tensors(shape, 3, seed=2)
    weight, density, epsilon = [0.5, 1.2, -0.3], [1.0] * 3, [0.15, 0.2, 0.0]
    expected = mergekit(name, base, experts, weight=weight, density=density, epsilon=epsilon, **options)
    ours_options = {("lambda_" if k == "lambda" else k): v for k, v in options.items()}
    got = ours(name, base, experts, weight=weight, density=density, epsilon=epsilon, seed=7, **ours_options)
    assert_close(got, expected)


def per_rank_keep_rate(kept: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Share of rows keeping the entry of each within-row magnitude rank (rank 0 = smallest)."""
    order = delta.abs().argsort(dim=1)
    return (kept != 0).gather(1, order).float().mean(dim=0)


def test_della_drop_statistics_match_mergekit() -> None:
    # 4000 rows of 11 entries with distinct magnitudes: per-rank keep rates have std <= 0.008
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(4000, 11, generator=g)
    density, epsilon = 0.5, 0.3
    expected = torch.tensor([density - epsilon + 2 * epsilon * r / 10 for r in range(11)])
    assert torch.allclose(magprune_probabilities(delta, density, epsilon)[0].sort().values, expected)

    ours_kept = sparsify_magprune(delta, density, epsilon, expert_generator(0, 0), rescale=None)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs_kept = mk_sparsify.della_magprune(delta, density, epsilon, rescale_norm=None)
    ours_rate, theirs_rate = per_rank_keep_rate(ours_kept, delta), per_rank_keep_rate(theirs_kept, delta)
    assert (ours_rate - expected).abs().max() < 0.04
    assert (theirs_rate - expected).abs().max() < 0.04
    assert (ours_rate - theirs_rate).abs().max() < 0.05
    assert abs((ours_kept != 0).float().mean().item() - density) < 0.01
    # kept entries are untouched without rescale; the same (seed, expert) draws the same mask
    assert torch.equal(ours_kept[ours_kept != 0], delta[ours_kept != 0])
    assert torch.equal(ours_kept, sparsify_magprune(delta, density, epsilon, expert_generator(0, 0), rescale=None))
    assert not torch.equal(ours_kept, sparsify_magprune(delta, density, epsilon, expert_generator(0, 1), rescale=None))


def test_della_rescale_keeps_the_l1_norm_and_vectors_are_one_row() -> None:
    delta = torch.randn(200, generator=torch.Generator().manual_seed(4))
    rescaled = sparsify_magprune(delta, 0.4, 0.2, expert_generator(1, 0))
    assert 0 < int((rescaled != 0).sum()) < 200
    assert rescaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    probabilities = magprune_probabilities(delta, 0.4, 0.2)
    assert probabilities.shape == (1, 200)
    assert probabilities[0, delta.abs().argmax()] == pytest.approx(0.6)
    assert probabilities[0, delta.abs().argmin()] == pytest.approx(0.2)


def test_della_on_a_scalar_parameter() -> None:
    base, experts = torch.tensor(0.5), [torch.tensor(0.7), torch.tensor(0.2)]
    merged = ours("della_linear", base, experts, weight=[1.0, 1.0], density=[0.5, 0.5], epsilon=[0.1, 0.1], seed=3)
    assert merged.shape == () and torch.isfinite(merged)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_della_masks_identical_on_cpu_and_cuda() -> None:
    base, experts = tensors((96, 64), 2, seed=14)
    kwargs = {"weight": [0.6, 0.4], "density": [0.3, 0.5], "epsilon": [0.1, 0.2], "seed": 15}
    for name in ("della", "della_linear"):
        cpu = ours(name, base, experts, **kwargs)
        gpu = ours(name, base.cuda(), [e.cuda() for e in experts], **kwargs)
        assert torch.equal((cpu - base) != 0, (gpu.cpu() - base) != 0)
        torch.testing.assert_close(gpu.cpu(), cpu)


def test_della_refuses_epsilon_outside_the_density_range() -> None:
    base, experts = tensors((10,), 2)
    with pytest.raises(MergeError,
                       match=r"della: expert 1: density 0.1 and epsilon 0.15: expected density - epsilon > 0"):
        ours("della", base, experts, weight=[1, 1], density=[0.5, 0.1], epsilon=[0.15, 0.15])
    with pytest.raises(ValueError):  # mergekit refuses the same values
        mergekit("della", base, experts, weight=[1, 1], density=[0.5, 0.1], epsilon=[0.15, 0.15])


# ---------------------------------------------------------------- parity: model_stock

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_parity(shape, count, filter_wise) -> None:
    base, experts = tensors(shape, count, seed=5)
    expected = mergekit("model_stock", base, experts, filter_wise=filter_wise)
    assert_close(ours("model_stock", base, experts, filter_wise=filter_wise), expected)


def test_model_stock_singular_and_identical_cases() -> None:
    base, (expert,) = tensors((6, 4), 1, seed=6)
    opposite = 2 * base - expert  # task vectors e and -e: 1 + (N - 1) cos = 0, the base is kept
    assert_close(ours("model_stock", base, [expert, opposite]), mergekit("model_stock", base, [expert, opposite]))
    assert torch.allclose(ours("model_stock", base, [expert, opposite]), base)
    assert torch.equal(ours("model_stock", base, [base.clone(), base.clone()]), base)


# ---------------------------------------------------------------- parity: nuslerp, multislerp

@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("weight", [[0.3, 0.9], [1.0, 0.0], [0.5, -0.5]])
@pytest.mark.parametrize("flatten, row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_parity(shape, weight, flatten, row_wise, with_base) -> None:
    base, experts = tensors(shape, 2, seed=8, spread=0.5)
    expected = mergekit("nuslerp", base if with_base else None, experts, weight=weight,
                        nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    got = ours("nuslerp", base, experts, weight=weight, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise,
               relative_to_base=with_base)
    assert_close(got, expected)


def test_nuslerp_colinear_task_vectors_interpolate_linearly() -> None:
    base, (expert,) = tensors((5, 3), 1, seed=9)
    far = base + 3 * (expert - base)
    got = ours("nuslerp", base, [expert, far], weight=[1.0, 1.0])
    assert_close(got, mergekit("nuslerp", base, [expert, far], weight=[1.0, 1.0]))
    assert torch.allclose(got, base + 2 * (expert - base), atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight", [[0.2, 0.5, 0.3], [1.0, 2.0, 0.5]])
@pytest.mark.parametrize("normalize_weights", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_parity(shape, weight, normalize_weights, with_base) -> None:
    base, experts = tensors(shape, 3, seed=10, spread=0.5)
    expected = mergekit("multislerp", base if with_base else None, experts, weight=weight,
                        normalize_weights=normalize_weights)
    got = ours("multislerp", base, experts, weight=weight, normalize_weights=normalize_weights,
               relative_to_base=with_base)
    assert_close(got, expected)


def test_multislerp_edge_cases() -> None:
    base, experts = tensors((8,), 2, seed=11)
    assert torch.equal(ours("multislerp", base, experts[:1], weight=[0.4]), experts[0])
    opposite = [base + 1.0, base - 1.0]  # antipodal task vectors with equal weights: linear fallback
    assert_close(ours("multislerp", base, opposite, weight=[0.5, 0.5]),
                 mergekit("multislerp", base, opposite, weight=[0.5, 0.5]))
    zero, one = torch.zeros(8), torch.ones(8)
    with pytest.raises(MergeError, match="weighted mean of the experts' directions is ~0"):
        ours("multislerp", zero, [one, -one, one], weight=[0.25, 0.5, 0.25])
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        mergekit("multislerp", zero, [one, -one, one], weight=[0.25, 0.5, 0.25])
    with pytest.raises(MergeError, match="sum to 0"):
        ours("multislerp", base, experts, weight=[0.5, -0.5])


# ---------------------------------------------------------------- parity: passthrough

@pytest.mark.parametrize("scale", [1.0, 0.7, -2.0])
def test_passthrough_parity(scale) -> None:
    base, experts = tensors((6, 5), 1, seed=12)
    assert_close(ours("passthrough", base, experts, scale=[scale]),
                 mergekit("passthrough", None, experts, scale=[scale]))
    assert torch.equal(ours("passthrough", base, experts, scale=[1.0]), experts[0])


def test_half_precision_inputs_come_back_in_their_dtype() -> None:
    base, experts = tensors((16, 8), 3, seed=13)
    half = [t.to(torch.bfloat16) for t in (base, *experts)]
    for name, kwargs in [("breadcrumbs", {"weight": [1] * 3, "density": [0.5] * 3, "gamma": [0.1] * 3}),
                         ("della", {"weight": [1] * 3, "density": [0.5] * 3, "epsilon": [0.1] * 3}),
                         ("model_stock", {}), ("multislerp", {"weight": [1] * 3})]:
        merged = ours(name, half[0], half[1:], **kwargs)
        assert merged.dtype == torch.bfloat16 and torch.isfinite(merged.float()).all()


# ---------------------------------------------------------------- exported mergekit.yaml, run by both tools

@pytest.fixture(scope="module")
def tiny_llamas(tmp_path_factory) -> dict[str, str]:
    """A 4-layer Llama base (untied head, GQA) and three experts = base + small random updates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo import make_tokenizer

    folder = tmp_path_factory.mktemp("tiny_llamas")
    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    paths = {"base": folder / "base"}
    base.save_pretrained(paths["base"])
    tokenizer.save_pretrained(paths["base"])
    for i in range(3):
        expert = LlamaForCausalLM(config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn_like(p))
        paths[f"expert{i}"] = folder / f"expert{i}"
        expert.save_pretrained(paths[f"expert{i}"])
        tokenizer.save_pretrained(paths[f"expert{i}"])
    return {name: str(path) for name, path in paths.items()}


def test_prefix_filters_resolve_like_mergekit() -> None:
    from mergekit.config import ConditionalParameter, evaluate_setting

    from evomerge.merge.mergekit import prefix_filters

    names = ["model.embed_tokens.weight",
             *[f"model.layers.{i}.{p}" for i in range(3) for p in (
                 "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.q_norm.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")],
             "model.norm.weight", "lm_head.weight", "x.lm_head.weight"]
    value_cases = [
        lambda n: 1.0,
        lambda n: 2.0 if n.startswith("lm_head") else 1.0,
        lambda n: {"attention": 1.0, "mlp": 2.0}.get(module_kind(n), 3.0) + (0.5 if ".1." in n else 0.0),
        lambda n: float(len(n) % 5),
        lambda n: 9.0 if n == "lm_head.weight" else 1.0,  # a filter that is inside another name
    ]
    for value_of in value_cases:
        setting = prefix_filters(names, value_of)
        if isinstance(setting, float):
            assert {value_of(n) for n in names} == {setting}
            continue
        conditions = [ConditionalParameter(**entry) for entry in setting]
        assert "filter" not in setting[-1]
        for name in names:
            assert evaluate_setting(name, conditions, validate=float) == value_of(name), name
    layered = prefix_filters(names, value_cases[2])
    assert len(layered) <= len(names) // 2  # prefixes, not one entry per tensor


BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0), "gamma": (0.0, 0.1),
          "epsilon": (0.0, 0.3), "scale": (0.5, 1.5)}
EXPORT_CASES = [  # method, experts, merge options, genes pinned to 1.0 (randomness removed)
    ("breadcrumbs_ties", 3, {"modules": ["attention", "mlp", "norm", "embed"], "gamma": 0.02}, ()),
    ("breadcrumbs", 2, {"modules": ["attention", "mlp"], "smooth": 3, "gamma": "evolve"}, ()),
    ("della_linear", 2, {"modules": ["mlp"], "granularity": "block:2"}, ("density",)),
    ("della", 3, {"smooth": 2}, ("density",)),
    ("dare_linear", 2, {"modules": ["attention", "mlp"], "smooth": 2}, ("density",)),
    ("task_arithmetic", 3, {"modules": ["attention", "norm"], "smooth": 4}, ()),
    ("ties", 2, {"granularity": "global", "modules": ["embed", "mlp"]}, ()),
    ("model_stock", 3, {"modules": ["attention"]}, ()),
    ("nuslerp", 2, {"smooth": 2, "granularity": "block:2"}, ()),
    ("multislerp", 3, {"modules": ["mlp", "norm"]}, ()),
    ("passthrough", 1, {"modules": ["attention", "mlp"]}, ()),
]


@pytest.mark.parametrize("method, experts, options, pinned", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_exported_yaml_merged_by_mergekit_and_evomerge_merge_equals_our_merge(tiny_llamas, tmp_path, method, experts,
                                                                             options, pinned) -> None:
    import numpy as np
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    from evomerge.config import validate
    from evomerge.genome import GenomeLayout, Recipe
    from evomerge.merge.mergekit import mergekit_yaml
    from evomerge.merge.mergekit import run_merge as evomerge_merge
    from evomerge.merge.merger import load_merge_target

    merge = {"method": method, **options}
    config = validate({"models": {"base": tiny_llamas["base"], "device": "cpu",
                                  "experts": [tiny_llamas[f"expert{i}"] for i in range(experts)]},
                       "merge": merge, "eval": {"tasks": [{"name": "t", "metric": "acc"}]}})
    model, merger = load_merge_target(config.models, config.seed, torch.device("cpu"))
    names = [name for name, _ in model.named_parameters()]
    m = config.merge
    if method == "model_stock":  # no genes: the recipe is the method alone
        recipe = Recipe(method, m.granularity, 4, {}, modules=tuple(m.modules))
    else:
        layout = GenomeLayout.build(method, m.granularity, 4, experts, BOUNDS, modules=m.modules, smooth=m.smooth,
                                    fixed=m.fixed_genes(), extra=m.evolved_extra_genes(), parameter_names=names)
        x = np.random.default_rng(len(names)).uniform(0.05, 0.95, layout.size)
        x[[i for i, gene in enumerate(layout.genes) if gene.name in pinned]] = 1.0
        recipe = layout.decode(x)
        if pinned:  # random drops: no randomness left in either tool
            assert all(d == 1.0 for genes in recipe.params.values() for d in genes["density"])
    merger.merge_into(model, recipe)

    text = mergekit_yaml(recipe, config, names, trial=0)
    document = yaml.safe_load(text)
    if method != "model_stock":  # per-layer or per-module values, as filters
        assert any(isinstance(v, list) for model_in in document["models"]
                   for v in model_in.get("parameters", {}).values())
    run_merge(MergeConfiguration.model_validate(document), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    (tmp_path / "mergekit.yaml").write_text(text)
    evomerge_merge(tmp_path / "mergekit.yaml", tmp_path / "ev")
    for tool, folder in (("mergekit", "mk"), ("evomerge merge", "ev")):
        merged = load_file(tmp_path / folder / "model.safetensors")
        for name, param in model.named_parameters():
            difference = (param.detach() - merged[name]).abs().max().item()
            assert difference <= TOLERANCE, f"{tool}: {name}: {difference}"
