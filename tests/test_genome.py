"""Genome <-> recipe decoding is pure; groups follow the layer structure of any architecture."""

import numpy as np
import pytest

from evomerge.genome import EMBED_HEAD, GenomeLayout, Recipe, group_names, group_of, layer_index, reference_recipes

BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0)}


@pytest.mark.parametrize("name, index", [
    ("model.layers.3.self_attn.q_proj.weight", 3),      # llama, mistral, qwen
    ("transformer.h.11.attn.c_attn.bias", 11),           # gpt2
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", 0),   # gpt-neox
    ("model.decoder.layers.2.fc1.weight", 2),            # opt
    ("model.embed_tokens.weight", None), ("lm_head.weight", None), ("model.norm.weight", None),
    ("transformer.wpe.weight", None),
])
def test_layer_index(name: str, index: int | None) -> None:
    assert layer_index(name) == index


def test_groups() -> None:
    assert group_names("global", 4) == ["all"]
    assert group_names("layer", 3) == ["layers.0", "layers.1", "layers.2", EMBED_HEAD]
    assert group_names("block:2", 5) == ["layers.0-1", "layers.2-3", "layers.4", EMBED_HEAD]
    assert group_of("model.layers.3.mlp.up_proj.weight", "block:2", 5) == "layers.2-3"
    assert group_of("model.layers.4.mlp.up_proj.weight", "block:2", 5) == "layers.4"
    assert group_of("model.embed_tokens.weight", "layer", 5) == EMBED_HEAD
    assert group_of("lm_head.weight", "global", 5) == "all"


def test_layout_order_and_decode() -> None:
    layout = GenomeLayout.build("ties", "layer", 2, 2, BOUNDS)
    assert layout.size == 3 * 2 * 2
    assert [(g.group, g.expert, g.name) for g in layout.genes[:4]] == [
        ("layers.0", 0, "weight"), ("layers.0", 0, "density"), ("layers.0", 1, "weight"), ("layers.0", 1, "density")]
    x = np.linspace(0, 1, layout.size)
    recipe = layout.decode(x)
    assert recipe.params["layers.0"]["weight"] == pytest.approx([0.0, 1.5 * x[2]])
    assert recipe.params[EMBED_HEAD]["density"][1] == pytest.approx(1.0)
    assert recipe.for_tensor("model.layers.1.mlp.w") == {"weight": recipe.params["layers.1"]["weight"],
                                                         "density": recipe.params["layers.1"]["density"]}
    np.testing.assert_allclose(layout.encode(recipe), x, atol=1e-12)
    assert Recipe.from_json(recipe.to_json()) == recipe


def test_slerp_has_one_t_per_group() -> None:
    layout = GenomeLayout.build("slerp", "block:2", 4, 1, BOUNDS)
    recipe = layout.decode(np.full(layout.size, 0.25))
    assert layout.size == 3 and recipe.for_tensor("model.layers.2.x") == {"t": 0.25}


def test_decode_errors_name_index_and_value() -> None:
    layout = GenomeLayout.build("task_arithmetic", "global", 2, 2, BOUNDS)
    with pytest.raises(ValueError, match="expected 2 values"):
        layout.decode([0.5])
    with pytest.raises(ValueError, match=r"genome\[1\] \(all/weight/expert 1\): expected a value in \[0, 1\], got 1.5"):
        layout.decode([0.5, 1.5])
    with pytest.raises(ValueError, match=r"genome\[0\].*nan"):
        layout.decode([float("nan"), 0.5])


def test_references() -> None:
    labels = [r.label for r in reference_recipes(2, 4)]
    assert labels == ["base", "expert:0", "expert:1", "uniform"]
    assert reference_recipes(2, 4)[2].params == {"all": {"weight": [0.0, 1.0]}}


def test_policy_genes_follow_the_merge_genes() -> None:
    from evomerge.config import PolicyConfig

    blend = PolicyConfig(kind="blend", members=["merged", "expert:0", "base"])
    layout = GenomeLayout.build("task_arithmetic", "global", 2, 2, BOUNDS, blend)
    assert layout.size == 2 + 3 and [g.name for g in layout.genes[2:]] == ["share"] * 3
    recipe = layout.decode([0.5, 0.5, 0.2, 0.6, 0.2])
    assert recipe.policy == {"kind": "blend", "members": ["merged", "expert:0", "base"],
                             "params": {"probs": pytest.approx([0.2, 0.6, 0.2])}}
    assert layout.decode([0.5, 0.5, 0.0, 0.0, 0.0]).policy["params"]["probs"] == pytest.approx([1 / 3] * 3)

    router = GenomeLayout.build("linear", "global", 2, 2, BOUNDS, PolicyConfig(kind="prefix_router",
                                                                                members=["merged", "base"]))
    assert router.decode([0.5, 0.5, 1.0]).policy["params"] == {"k": 16}
    fixed = GenomeLayout.build("linear", "global", 2, 2, BOUNDS,
                               PolicyConfig(kind="prefix_router", members=["merged", "base"], k=4))
    assert fixed.size == 2 and fixed.decode([0.5, 0.5]).policy["params"] == {"k": 4}

    cascade = GenomeLayout.build("linear", "global", 2, 2, BOUNDS,
                                 PolicyConfig(kind="cascade", members=["expert:1", "merged", "base"]))
    thresholds = cascade.decode([0.5, 0.5, 0.0, 1.0]).policy["params"]["thresholds"]
    assert thresholds == {"generate_until": [-3.0, 0.0], "loglikelihood": [0.0, 5.0]}
    assert Recipe.from_json(recipe.to_json()) == recipe
