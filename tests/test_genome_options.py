"""merge.modules, merge.smooth and the new methods' genes: pure layout and decoding, config checks."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.config import validate
from evomerge.errors import ConfigError, MergeError
from evomerge.genome import (
    EMBED_HEAD,
    GenomeLayout,
    Recipe,
    group_names,
    interpolate,
    module_group,
    module_kind,
)

# The genes each method evolves per expert by default, as laid out before the registry held them
# (breadcrumbs' gamma and della's epsilon are fixed unless set to evolve).
EVOLVED = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
           "dare_ties": ("weight", "density"), "dare_linear": ("weight", "density"), "slerp": ("t",),
           "breadcrumbs": ("weight", "density"), "breadcrumbs_ties": ("weight", "density"),
           "della": ("weight", "density"), "della_linear": ("weight", "density"), "model_stock": (),
           "nuslerp": ("weight",), "multislerp": ("weight",), "passthrough": ("scale",)}

BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0), "gamma": (0.0, 0.1),
          "epsilon": (0.0, 0.3), "scale": (0.5, 1.5)}


def llama_names(layers: int, tied: bool = False) -> list[str]:
    per_layer = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.o_proj.weight",
                 "mlp.gate_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
                 "post_attention_layernorm.weight"]
    names = ["model.embed_tokens.weight", *[f"model.layers.{i}.{p}" for i in range(layers) for p in per_layer],
             "model.norm.weight"]
    return names if tied else [*names, "lm_head.weight"]


@pytest.mark.parametrize("name, kind", [
    ("model.layers.3.self_attn.q_proj.weight", "attention"),        # llama, mistral, qwen
    ("model.layers.3.self_attn.q_norm.weight", "norm"),             # qwen3: a norm inside attention
    ("model.layers.3.mlp.down_proj.weight", "mlp"),
    ("model.layers.3.post_attention_layernorm.weight", "norm"),
    ("model.embed_tokens.weight", "embed"), ("lm_head.weight", "embed"), ("model.norm.weight", "norm"),
    ("transformer.h.1.attn.c_attn.weight", "attention"),            # gpt2
    ("transformer.h.1.mlp.c_fc.bias", "mlp"), ("transformer.h.1.ln_2.weight", "norm"),
    ("transformer.wte.weight", "embed"), ("transformer.wpe.weight", "embed"), ("transformer.ln_f.bias", "norm"),
    ("gpt_neox.layers.0.attention.query_key_value.weight", "attention"),  # gpt-neox
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp"), ("embed_out.weight", "embed"),
    ("model.decoder.layers.2.fc1.weight", "mlp"),                   # opt
    ("model.decoder.layers.2.self_attn_layer_norm.weight", "norm"),
    ("model.decoder.embed_positions.weight", "embed"),
    ("transformer.h.0.self_attention.dense.weight", "attention"),   # bloom, falcon
    ("transformer.h.0.ln_attn.weight", "norm"), ("transformer.word_embeddings_layernorm.weight", "norm"),
    ("model.layers.0.block_sparse_moe.experts.0.w1.weight", "mlp"),  # mixtral
    ("model.layers.0.mlp.experts.gate_up_proj", "mlp"),              # fused experts
    ("model.layers.0.feed_forward.w1.weight", "mlp"),
    ("model.layers.0.linear_gate.weight", None), ("score.weight", None),
])
def test_module_kind(name: str, kind: str | None) -> None:
    assert module_kind(name) == kind


def test_module_group_keeps_listed_kinds_and_pools_the_rest() -> None:
    assert module_group("model.layers.0.mlp.up_proj.weight", ("attention", "mlp")) == "mlp"
    assert module_group("model.layers.0.input_layernorm.weight", ("attention", "mlp")) == "other"
    assert module_group("score.weight", ("attention", "mlp", "norm", "embed")) == "other"


# ---------------------------------------------------------------- existing layouts are unchanged

@pytest.mark.parametrize("method", sorted(set(EVOLVED) - {"model_stock"}))
@pytest.mark.parametrize("granularity", ["global", "layer", "block:3"])
def test_layouts_without_the_new_options_are_the_old_ones(method: str, granularity: str) -> None:
    experts = 1 if method == "slerp" else 3
    layout = GenomeLayout.build(method, granularity, 5, experts, BOUNDS)
    old = [{"index": i, "group": g, "expert": e, "gene": gene, "bounds": list(BOUNDS[gene])}
           for i, (g, e, gene) in enumerate((g, e, gene) for g in group_names(granularity, 5)
                                            for e in range(experts) for gene in EVOLVED[method])]
    assert layout.describe() == old
    recipe = layout.decode(np.linspace(0, 1, layout.size))
    assert set(recipe.to_json()) == {"method", "granularity", "num_layers", "params"}
    assert set(recipe.params) == set(group_names(granularity, 5))
    np.testing.assert_allclose(layout.encode(recipe), np.linspace(0, 1, layout.size), atol=1e-12)


# ---------------------------------------------------------------- modules

def test_module_groups_hold_only_the_kinds_the_model_has() -> None:
    names = llama_names(2)
    layout = GenomeLayout.build("ties", "layer", 2, 2, BOUNDS, modules=["attention", "mlp"], parameter_names=names)
    groups = list(dict.fromkeys(g.group for g in layout.genes))
    assert groups == ["layers.0/attention", "layers.0/mlp", "layers.0/other",
                      "layers.1/attention", "layers.1/mlp", "layers.1/other", f"{EMBED_HEAD}/other"]
    assert layout.size == len(groups) * 2 * 2
    every = GenomeLayout.build("linear", "global", 2, 1, BOUNDS, modules=["embed", "norm", "attention", "mlp"],
                               parameter_names=names)
    assert [g.group for g in every.genes] == ["all/embed", "all/norm", "all/attention", "all/mlp"]


def test_module_recipe_gives_each_tensor_its_group_values() -> None:
    names = llama_names(2, tied=True)
    layout = GenomeLayout.build("ties", "block:2", 2, 2, BOUNDS, modules=["mlp", "embed"], parameter_names=names)
    x = np.linspace(0, 1, layout.size)
    recipe = layout.decode(x)
    assert recipe.modules == ("mlp", "embed")
    assert recipe.group("model.layers.1.mlp.down_proj.weight") == "layers.0-1/mlp"
    assert recipe.group("model.layers.1.self_attn.o_proj.weight") == "layers.0-1/other"
    assert recipe.group("model.embed_tokens.weight") == f"{EMBED_HEAD}/embed"
    assert recipe.for_tensor("model.norm.weight") == recipe.params[f"{EMBED_HEAD}/other"]
    assert recipe.for_tensor("model.layers.0.mlp.gate_proj.weight")["weight"] == pytest.approx([0.0, 1.5 * x[2]])
    assert Recipe.from_json(recipe.to_json()) == recipe
    np.testing.assert_allclose(layout.encode(recipe), x, atol=1e-12)
    with pytest.raises(MergeError, match="no values for group 'layers.0-1/attention'"):
        Recipe("ties", "block:2", 2, {"layers.0-1/mlp": {}}, modules=("mlp", "attention")).for_tensor(
            "model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match="parameter names"):
        GenomeLayout.build("ties", "layer", 2, 2, BOUNDS, modules=["mlp"])


# ---------------------------------------------------------------- smooth

def test_smooth_control_points_interpolate_like_mergekit_gradients() -> None:
    import mergekit.config as mk_config  # a test dependency (the [test] extra): missing fails, never skips
    layout = GenomeLayout.build("task_arithmetic", "layer", 7, 2, BOUNDS, smooth=3)
    assert [g.group for g in layout.genes] == ["smooth.0"] * 2 + ["smooth.1"] * 2 + ["smooth.2"] * 2 + [EMBED_HEAD] * 2
    x = np.array([0.0, 1.0, 0.4, 0.2, 1.0, 0.6, 0.3, 0.9])
    recipe = layout.decode(x)
    assert list(recipe.params) == [f"layers.{j}" for j in range(7)] + [EMBED_HEAD]
    for expert in range(2):
        controls = [1.5 * x[2 * k + expert] for k in range(3)]
        for j in range(7):
            theirs = mk_config.evaluate_setting(f"model.layers.{j}.mlp.up_proj.weight", controls, j / 6,
                                                validate=float)
            assert recipe.params[f"layers.{j}"]["weight"][expert] == theirs
        assert recipe.params["layers.0"]["weight"][expert] == controls[0]
        assert recipe.params["layers.6"]["weight"][expert] == controls[2]
        assert recipe.params["layers.3"]["weight"][expert] == controls[1]
    assert recipe.params[EMBED_HEAD]["weight"] == pytest.approx([0.45, 1.35])
    with pytest.raises(ValueError, match="cannot be encoded"):
        layout.encode(recipe)


def test_smooth_over_blocks_and_modules() -> None:
    names = llama_names(6)
    layout = GenomeLayout.build("dare_ties", "block:2", 6, 1, BOUNDS, smooth=2, modules=["attention"],
                                parameter_names=names)
    assert list(dict.fromkeys(g.group for g in layout.genes)) == [
        "smooth.0/attention", "smooth.0/other", "smooth.1/attention", "smooth.1/other", f"{EMBED_HEAD}/other"]
    x = np.zeros(layout.size)
    x[[i for i, g in enumerate(layout.genes) if g.group == "smooth.1/attention" and g.name == "weight"]] = 1.0
    recipe = layout.decode(x)
    weights = [recipe.for_tensor(f"model.layers.{i}.self_attn.q_proj.weight")["weight"][0] for i in range(6)]
    assert weights == [0.0, 0.0, 0.75, 0.75, 1.5, 1.5]  # blocks at t = 0, 0.5, 1
    assert recipe.for_tensor("model.layers.5.mlp.down_proj.weight")["weight"] == [0.0]


def test_smooth_needs_enough_layer_groups() -> None:
    with pytest.raises(ConfigError, match=r"merge.smooth: 4 control points but 3 layer group\(s\) \(block:2\); "
                                          r"expected at most 3"):
        GenomeLayout.build("linear", "block:2", 6, 2, BOUNDS, smooth=4)


def test_interpolate() -> None:
    assert interpolate([0.0, 1.0, 4.0], 0.75) == 2.5
    assert interpolate([2.0, 4.0], 1.0) == 4.0


# ---------------------------------------------------------------- the new methods' genes

def test_breadcrumbs_gamma_fixed_or_evolved() -> None:
    fixed = GenomeLayout.build("breadcrumbs", "global", 2, 2, BOUNDS, fixed={"gamma": 0.01})
    assert [g.name for g in fixed.genes] == ["weight", "density"] * 2
    assert fixed.decode([0.5] * 4).params["all"]["gamma"] == [0.01, 0.01]
    evolved = GenomeLayout.build("breadcrumbs_ties", "global", 2, 2, BOUNDS, extra=("gamma",))
    assert [g.name for g in evolved.genes] == ["weight", "density", "gamma"] * 2
    assert evolved.decode([0.5, 0.5, 1.0, 0.5, 0.5, 0.0]).params["all"]["gamma"] == [0.1, 0.0]


def test_della_epsilon_is_capped_inside_the_density_room() -> None:
    layout = GenomeLayout.build("della", "global", 2, 3, BOUNDS, fixed={"epsilon": 0.15})
    # densities 0.1 + 0.9 * (0, 0.5, 1) = 0.1, 0.55, 1.0
    genes = layout.decode([0.5, 0.0, 0.5, 0.5, 0.5, 1.0]).params["all"]
    assert genes["density"] == pytest.approx([0.1, 0.55, 1.0])
    assert genes["epsilon"] == pytest.approx([0.099, 0.15, 0.15])
    high = GenomeLayout.build("della_linear", "global", 2, 1, BOUNDS, extra=("epsilon",))
    genes = high.decode([0.5, 0.9, 1.0]).params["all"]  # density 0.91, epsilon 0.3 -> 0.99 * 0.09
    assert genes["epsilon"] == pytest.approx([0.0891])


def test_model_stock_has_no_genes_and_passthrough_one_scale() -> None:
    from evomerge.config import PolicyConfig

    with pytest.raises(ConfigError, match="model_stock has no genes to evolve"):
        GenomeLayout.build("model_stock", "layer", 2, 2, BOUNDS)
    routed = GenomeLayout.build("model_stock", "layer", 2, 2, BOUNDS,
                                PolicyConfig(kind="blend", members=["merged", "expert:0"]))
    recipe = routed.decode([0.3, 0.7])
    assert routed.size == 2 and recipe.params == {} and recipe.for_tensor("model.layers.0.mlp.w") == {}
    passthrough = GenomeLayout.build("passthrough", "layer", 2, 1, BOUNDS)
    assert [(g.group, g.name) for g in passthrough.genes] == [
        ("layers.0", "scale"), ("layers.1", "scale"), (EMBED_HEAD, "scale")]
    assert passthrough.decode([0.0, 0.5, 1.0]).for_tensor("model.layers.1.x") == {"scale": [1.0]}


# ---------------------------------------------------------------- config

def raw(merge: dict, experts: int = 2) -> dict:
    return {"models": {"base": "b", "experts": [f"e{i}" for i in range(experts)]}, "merge": merge,
            "eval": {"tasks": [{"name": "x", "metric": "acc"}]}}


def test_config_accepts_the_new_fields() -> None:
    merge = validate(raw({"method": "della", "modules": ["attention", "mlp"], "smooth": 3,
                          "epsilon": "evolve", "bounds": {"epsilon": [0.05, 0.2]}})).merge
    assert merge.modules == ["attention", "mlp"] and merge.smooth == 3
    assert merge.fixed_genes() == {} and merge.evolved_extra_genes() == ("epsilon",)
    assert validate(raw({"method": "breadcrumbs"})).merge.fixed_genes() == {"gamma": 0.01}
    assert validate(raw({"method": "breadcrumbs", "gamma": 0.05})).merge.fixed_genes() == {"gamma": 0.05}
    assert validate(raw({"method": "ties"})).merge.fixed_genes() == {}
    assert validate(raw({"method": "model_stock"}, experts=3)).merge.method == "model_stock"


@pytest.mark.parametrize("merge, experts, message", [
    ({"method": "ties", "gamma": 0.1}, 2, "merge.gamma: only breadcrumbs and breadcrumbs_ties use gamma"),
    ({"method": "della", "epsilon": 0.6}, 2, r"merge.epsilon: expected a value in \[0, 0.5\) or 'evolve'"),
    ({"method": "breadcrumbs", "gamma": "sometimes"}, 2, "merge.gamma: expected a number or 'evolve'"),
    ({"method": "linear", "smooth": 2, "granularity": "global"}, 2, "merge.smooth: interpolates across layer groups"),
    ({"method": "linear", "smooth": 1}, 2, "merge.smooth"),
    ({"method": "linear", "modules": ["mlp", "mlp"]}, 2, "merge.modules: each module kind once"),
    ({"method": "linear", "modules": ["heads"]}, 2, "merge.modules.0"),
    ({"method": "linear", "modules": []}, 2, "merge.modules"),
    ({"method": "della", "bounds": {"epsilon": [0.1, 0.6]}}, 2, r"epsilon: expected bounds within \[0, 0.5\)"),
    ({"method": "nuslerp"}, 3, r"merge.method: nuslerp merges exactly 2 expert\(s\) \(got 3 experts\)"),
    ({"method": "model_stock"}, 1, r"merge.method: model_stock merges at least 2 expert\(s\)"),
    ({"method": "passthrough"}, 2, r"merge.method: passthrough merges exactly 1 expert\(s\)"),
    ({"method": "karcher"}, 2, "merge.method"),
])
def test_config_errors_name_the_field(merge: dict, experts: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(raw(merge, experts))


@pytest.fixture
def registered_method():
    """A method registered by a test alone (removed again): one decorated function, nothing else."""
    from evomerge.merge import METHODS, register

    @register("test_tempered_sum", genes=("weight", "gamma"), needs_base=True, fixed=("gamma",), max_experts=2,
              reference="https://example.org/tempered")
    def tempered_sum(base, experts, *, weight, gamma, lambda_: float = 1.0):
        return base + lambda_ * sum(w * (1 - g) * (e - base) for w, g, e in zip(weight, gamma, experts))

    yield "test_tempered_sum"
    del METHODS["test_tempered_sum"]


def test_a_registered_method_is_searchable_and_exported_without_other_changes(registered_method: str) -> None:
    from evomerge.merge.mergekit import mergekit_yaml

    config = validate(raw({"method": registered_method}))
    assert config.merge.fixed_genes() == {"gamma": 0.01}  # GENES["gamma"].default
    layout = GenomeLayout.build(config.merge.method, "global", 4, 2, BOUNDS, fixed=config.merge.fixed_genes())
    assert [(g.name, g.expert) for g in layout.genes] == [("weight", 0), ("weight", 1)]
    recipe = layout.decode(np.full(layout.size, 0.5))
    assert recipe.params["all"] == {"weight": [0.75, 0.75], "gamma": [0.01, 0.01]}
    evolved = validate(raw({"method": registered_method, "gamma": "evolve"})).merge
    assert evolved.evolved_extra_genes() == ("gamma",) and evolved.fixed_genes() == {}
    names = ["model.layers.0.mlp.weight", "lm_head.weight"]
    text = mergekit_yaml(recipe, config, names, trial=0)
    assert "merge_method: test_tempered_sum" in text and "gamma: 0.01" in text
    with pytest.raises(ConfigError, match="merge.method: test_tempered_sum merges at most 2 expert"):
        validate(raw({"method": registered_method}, experts=3))
    with pytest.raises(ConfigError, match="merge.epsilon: only della and della_linear use epsilon"):
        validate(raw({"method": registered_method, "epsilon": 0.1}))
