"""Reading a mergekit config: fields, refusals, and per-tensor parameter resolution (no models loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.errors import ConfigError
from evomerge.merge.mergekit import evaluate_setting, layer_position, plan_merge, read_config

TIES = {
    "merge_method": "ties", "base_model": "org/base",
    "models": [{"model": "org/base"},
               {"model": "org/a", "parameters": {"weight": [0.0, 1.0], "density": 0.5}},
               {"model": "org/b", "parameters": {"weight": [{"filter": "self_attn", "value": 0.7}]}}],
    "parameters": {"weight": 0.25, "normalize": False, "lambda": 0.5, "int8_mask": True},
    "dtype": "bfloat16", "tokenizer_source": "base",
}


def write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def with_(**changes) -> dict:
    return {**TIES, **changes}


def test_reads_a_ties_config_and_drops_the_base_from_the_inputs(tmp_path):
    config = read_config(write(tmp_path, TIES))
    assert config.method.name == "ties" and config.base_model == "org/base"
    assert [m.model for m in config.models] == ["org/a", "org/b"]
    assert (config.dtype, config.tokenizer_source, config.skeleton) == ("bfloat16", "org/base", "org/base")


def test_linear_keeps_every_model_and_adds_a_missing_base_as_mergekit_does(tmp_path):
    document = {"merge_method": "linear", "base_model": "org/c",
                "models": [{"model": "org/a", "parameters": {"weight": 1.0}}]}
    config = read_config(write(tmp_path, document))
    assert [m.model for m in config.models] == ["org/a", "org/c"]


@pytest.mark.parametrize("document, message", [
    (with_(merge_method="frankenstein"), "merge_method: 'frankenstein' is not supported; expected one of: linear"),
    (with_(seed=3), "unknown field(s) seed; supported: merge_method, base_model, models"),
    (with_(slices=[]), "expected exactly one of `models:` or `slices:`"),
    (with_(models=None, slices=[{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}] * 2),
     "slices: ties reads one slice whose sources span every layer"),
    (with_(models=None, slices=[{"sources": [{"model": "org/a", "layer_range": [0, 2]}], "base_model": "org/a"}]),
     "slices[0]: unknown field(s) base_model; supported: sources, parameters"),
    (with_(models=None, slices=[{"sources": [{"model": "org/a", "layer_range": [2, 1]}]}]),
     "slices[0].sources[0].layer_range: expected [start, stop] with 0 <= start <= stop"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "org/a", "layer_range": [1, 1]}]},
                                                {"sources": [{"model": "org/b", "layer_range": [0, 0]}]}]},
     "slices: every layer_range is empty; the stack needs at least one layer"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]},
                                                             {"model": "org/b", "layer_range": [0, 2]}]}]},
     "slices[0].sources: passthrough takes one source per slice (got 2)"),
    ({"merge_method": "passthrough", "parameters": {"scale": 0.5},
      "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 2]}]}]}, "scaling is not supported"),
    (with_(base_model=None), "base_model: merge_method ties needs a base model"),
    (with_(models=[]), "models: expected a list"),
    (with_(models=[{"model": "org/a", "weights": 1}]),
     "models[0]: unknown field(s) weights; supported: model, parameters"),
    (with_(parameters={"t": 0.5}), "parameters.t: not a parameter of ties; supported: weight, density, normalize"),
    (with_(models=[{"model": "org/a", "parameters": {"lambda": 2}}]), "parameters.lambda is shared by all models"),
    (with_(models=[{"model": "org/a", "parameters": {"gamma": 2}}]), "parameters.gamma: not a per-model parameter"),
    (with_(dtype="int8"), "dtype: 'int8' is not supported; expected one of: float32"),
    (with_(tokenizer_source="union"), "tokenizer_source: 'union' is not supported"),
    (with_(models=[{"model": "org/a+org/lora"}]), "LoRA references"),
    ({"merge_method": "slerp", "base_model": "org/base", "models": [{"model": "org/a"}, {"model": "org/b"}],
      "parameters": {"t": 0.5}}, "slerp merges base_model with at most 1 other model(s); got 2"),
    ({"merge_method": "linear", "models": [{"model": "org/a"}], "tokenizer_source": "base"},
     "tokenizer_source: 'base' needs base_model"),
    (with_(base_model="./no/such/folder"), "base_model: no such model folder"),
])
def test_refusals_name_the_field_and_what_is_supported(tmp_path, document, message):
    with pytest.raises(ConfigError) as error:
        read_config(write(tmp_path, document))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    assert main(["merge", str(write(tmp_path, with_(merge_method="frankenstein"))), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evomerge: error:") and "ties" in err[0]
    assert not (tmp_path / "o").exists()


def test_gradients_interpolate_across_layers_as_mergekit_does():
    assert evaluate_setting([0.0, 1.0], "x", 0.25, "w") == 0.25
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75, "w") == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4], "x", 1.0, "w") == 0.4
    assert evaluate_setting([True, False, False], "x", 0.4, "w") is True  # picked, not mixed
    assert evaluate_setting(["1e-1", 0.3], "x", 0.5, "w") == pytest.approx(0.2)  # numeric strings are numbers
    assert evaluate_setting(0.3, "x", 0.9, "w") == 0.3


def test_filters_take_the_first_match_and_may_match_nothing():
    setting = [{"filter": "self_attn", "value": 1.0}, {"filter": "attn", "value": 2.0}, {"filter": "*", "value": 3.0}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0, "w") == 1.0
    assert evaluate_setting(setting, "model.layers.0.cross_attn.q_proj.weight", 0, "w") == 2.0
    assert evaluate_setting(setting, "model.norm.weight", 0, "w") == 3.0
    assert evaluate_setting([{"filter": "mlp", "value": 1.0}], "lm_head.weight", 0, "w") is None
    assert evaluate_setting({"value": [0.0, 1.0]}, "any", 0.5, "w") == 0.5
    with pytest.raises(ConfigError, match="supported: filter, value"):
        evaluate_setting([{"filter": "mlp", "value": 1, "weight": 2}], "mlp", 0, "w")


def test_one_slice_over_every_layer_reads_like_models(tmp_path):
    document = with_(models=None, parameters={"weight": 0.25}, slices=[{
        "sources": [{"model": "org/base", "layer_range": [0, 3]},
                    {"model": "org/a", "layer_range": [0, 3], "parameters": {"weight": 0.5}},
                    {"model": "org/b", "layer_range": [0, 3]}],
        "parameters": {"weight": [{"filter": "mlp", "value": 0.75}], "lambda": 0.5}}])
    config = read_config(write(tmp_path, document))
    plan = plan_merge(config, ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"], num_layers=3)
    # source > slice > top level, for per-model genes and shared settings alike
    assert plan.for_tensor("model.layers.0.mlp.up_proj.weight") == {"weight": [0.5, 0.75], "density": [1.0, 1.0],
                                                                    "lambda_": 0.5}
    assert plan.for_tensor("model.norm.weight")["weight"] == [0.5, 0.25]
    with pytest.raises(ConfigError, match=r"layer_range \[0, 3\] of org/base; ties merges whole models: "
                                          r"expected \[0, 4\]"):
        plan_merge(config, ["model.norm.weight"], num_layers=4)


def test_passthrough_slices_are_a_layer_stack(tmp_path):
    document = {"merge_method": "passthrough", "dtype": "float32",
                "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 3]}]},
                           {"sources": [{"model": "org/b", "layer_range": [1, 2]}]}]}
    stack = read_config(write(tmp_path, document))
    assert [(s.model, s.start, s.stop) for s in stack.slices] == [("org/a", 0, 3), ("org/b", 1, 2)]
    assert (stack.num_layers, stack.skeleton) == (4, "org/a")


def test_layer_position_is_i_over_l_minus_1_and_0_outside_the_layers():
    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_position("model.embed_tokens.weight", 5) == 0
    assert layer_position("lm_head.weight", 5) == 0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1  # mergekit: t = 1 for one layer


def test_plan_resolves_model_then_top_level_then_mergekit_defaults(tmp_path):
    config = read_config(write(tmp_path, TIES))
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.2.mlp.up_proj.weight", "lm_head.weight"]
    plan = plan_merge(config, names, num_layers=3)
    assert plan.method == "ties"
    # org/a: its own gradient [0, 1] and density 0.5; org/b: its filter, else the top-level 0.25, density 1
    assert plan.for_tensor(names[0]) == {"weight": [0.0, 0.25], "density": [0.5, 1.0], "normalize": False,
                                         "lambda_": 0.5}
    assert plan.for_tensor(names[1])["weight"] == [0.0, 0.7]
    assert plan.for_tensor(names[2])["weight"] == [1.0, 0.25]
    assert plan.for_tensor(names[3])["weight"] == [0.0, 0.25]  # the head sits at t = 0 too


def test_a_missing_required_value_names_model_and_tensor(tmp_path):
    document = with_(parameters={})
    config = read_config(write(tmp_path, document))
    with pytest.raises(ConfigError, match="model org/b: no weight for tensor 'model.norm.weight'"):
        plan_merge(config, ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"], num_layers=1)
    slerp = read_config(write(tmp_path, {"merge_method": "slerp", "base_model": "org/base",
                                         "models": [{"model": "org/a"}],
                                         "parameters": {"t": [{"filter": "mlp", "value": 0.5}]}}))
    with pytest.raises(ConfigError, match="parameters.t: no value for tensor 'lm_head.weight'"):
        plan_merge(slerp, ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"], num_layers=1)
