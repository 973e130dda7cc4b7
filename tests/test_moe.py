"""Sparse upcycling (evomerge/moe.py): the upcycling identity on tiny models built here, the
router's math, FLOPs of the active experts, the `moe:` config and genes, and (slow) a real
search over the quick zoo whose exported mixture reloads with its recorded score."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM

from evomerge.config import load_config
from evomerge.errors import ConfigError, ModelMismatchError
from evomerge.flops import CostModel
from evomerge.genome import GenomeLayout
from evomerge.moe import Upcycler, router_gates, upcycle
from evomerge.zoo import make_tokenizer

from conftest import REPO, says, write_config

SEQ = 24
PROMPTS = [["12+34=", "5+6="], ["rev abc=", "rev hello="], ["sort cab=", "sort zyx="]]


def dense(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random dense causal LM (vocab of the zoo tokenizer)."""
    fields = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(make_tokenizer()), max_position_embeddings=64,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**fields, **overrides}))
    with torch.no_grad():  # norms start at one: perturb them so a missed copy shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(4, 40, (2, SEQ), generator=torch.Generator().manual_seed(0))


# --- the upcycling identity ----------------------------------------------------------------------

@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 1, "head_dim": 16}),
    ("mistral", {"sliding_window": 8}),
    ("qwen2", {}),  # q/k/v biases: upcycled into Qwen2-MoE with a zero-wide shared expert
    ("qwen3", {"head_dim": 16}),
], ids=["llama", "llama-tied-mqa-head-dim", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random"])
def test_copies_of_one_model_give_that_model_back(model_type, overrides, gate_mode):
    model, tokenizer = dense(model_type, **overrides), make_tokenizer()
    expected = logits(model, IDS)
    upcycler = Upcycler(model, [model, model, model])
    gates = router_gates(model, gate_mode, 3, PROMPTS, tokenizer, seed=3)
    for experts_per_token in (1, 2, 3):
        for temperature in (0.05, 1.0, 7.0):
            moe = upcycler.update(model, gates, experts_per_token, temperature)
            assert moe.config.model_type != model_type  # a real mixture, not the dense model
            difference = (logits(moe, IDS) - expected).abs().max().item()
            assert difference <= 1e-5, (experts_per_token, temperature, difference)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_saved_mixture_reloads_with_auto_model(model_type, tmp_path):
    base, tokenizer = dense(model_type), make_tokenizer()
    experts = [dict(dense(model_type, seed=s).named_parameters()) for s in (1, 2)]  # as the merger holds them
    moe = Upcycler(base, experts).update(base, router_gates(base, "hidden", 2, PROMPTS[:2], tokenizer), 2, 0.5)
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(moe) and reloaded.config.num_experts_per_tok == 2
    torch.testing.assert_close(logits(reloaded, IDS), logits(moe, IDS), atol=0, rtol=0)


def test_different_experts_are_routed_and_not_averaged():
    base, tokenizer = dense(seed=0), make_tokenizer()
    experts = [dense(seed=s) for s in (1, 2, 3)]
    moe = upcycle(base, experts, PROMPTS, "hidden", experts_per_token=1, temperature=1.0, tokenizer=tokenizer)
    assert type(moe) is MixtralForCausalLM and moe.config.num_local_experts == 3
    out = logits(moe, IDS)
    assert torch.isfinite(out).all()
    assert (out - logits(base, IDS)).abs().max() > 1e-3  # the experts' MLPs, not the base's
    # one expert per token, chosen by the router: the layer output equals that expert's MLP
    layer = moe.model.layers[0].mlp
    x = torch.randn(5, 32)
    chosen = (x @ layer.gate.weight.T).argmax(-1)
    with torch.no_grad():
        routed = layer(x[None])[0]
        for row, e in enumerate(chosen.tolist()):
            mlp = experts[e].model.layers[0].mlp
            torch.testing.assert_close(routed[row], mlp(x[row:row + 1])[0], atol=1e-5, rtol=1e-5)


def test_router_is_softmax_top_k_renormalised_with_temperature():
    base = dense()
    experts = [dense(seed=s) for s in (1, 2, 3)]
    upcycler = Upcycler(base, experts)
    gates = router_gates(base, "random", 3, seed=5)
    moe = upcycler.update(base, gates, experts_per_token=2, temperature=0.5)
    block, x = moe.model.layers[1].mlp, torch.randn(4, 32)
    scores = (x @ gates[1].T) / 0.5  # logits scaled by 1 / temperature
    top = torch.softmax(scores, -1).topk(2, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    mlps = [e.model.layers[1].mlp for e in experts]
    with torch.no_grad():
        expected = torch.stack([sum(w * mlps[i](x[r:r + 1])[0] for w, i in zip(weights[r], top.indices[r].tolist()))
                                for r in range(4)])
        torch.testing.assert_close(block(x[None])[0], expected, atol=1e-5, rtol=1e-5)


def test_gates_are_unit_vectors_and_follow_the_prompts():
    base, tokenizer = dense(), make_tokenizer()
    hidden = router_gates(base, "hidden", 3, PROMPTS, tokenizer)
    assert hidden.shape == (2, 3, 32)
    torch.testing.assert_close(hidden.norm(dim=-1), torch.ones(2, 3))
    swapped = router_gates(base, "hidden", 3, [PROMPTS[1], PROMPTS[0], PROMPTS[2]], tokenizer)
    torch.testing.assert_close(swapped[:, 0], hidden[:, 1])
    cheap = router_gates(base, "cheap_embed", 3, PROMPTS, tokenizer)
    torch.testing.assert_close(cheap[0], cheap[1])  # one vector for every layer
    assert not torch.allclose(cheap[0], hidden[0])
    torch.testing.assert_close(router_gates(base, "random", 3, seed=1), router_gates(base, "random", 3, seed=1))
    assert not torch.allclose(router_gates(base, "random", 3, seed=1), router_gates(base, "random", 3, seed=2))


@pytest.mark.parametrize("model_type, overrides, message", [
    ("gpt2", {}, "model_type 'gpt2' cannot be upcycled"),
    ("llama", {"mlp_bias": True}, "'model.layers.0.mlp.gate_proj.bias': MLP biases"),
    ("llama", {"attention_bias": True}, "'model.layers.0.self_attn.q_proj.bias' has no place in a mixtral"),
])
def test_sources_that_cannot_be_upcycled_are_refused_naming_the_tensor(model_type, overrides, message):
    if model_type == "gpt2":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=4,
                                                                      vocab_size=60, n_positions=32))
    else:
        model = dense(model_type, **overrides)
    with pytest.raises(ModelMismatchError, match=message) as error:
        Upcycler(model, [model])
    assert "\n" not in str(error.value)


def test_experts_per_token_and_temperature_are_checked():
    model = dense()
    upcycler = Upcycler(model, [model, model])
    gates = router_gates(model, "random", 2)
    with pytest.raises(ValueError, match="experts_per_token: expected 1..2"):
        upcycler.update(model, gates, 3, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        upcycler.update(model, gates, 1, 0.0)
    with pytest.raises(ValueError, match="moe.prompts"):
        router_gates(model, "hidden", 2, PROMPTS[:1], make_tokenizer())


# --- FLOPs: the active experts only -------------------------------------------------------------------

# Mixtral, h=64, 4 heads of 16, 2 kv heads, expert width 96, 4 experts, 2 per token, 1 layer, vocab 100:
#   attention  q 64*64 + k 64*32 + v 64*32 + o 64*64            = 12288
#   router     4 experts * 64                                    =   256
#   experts    2 active * (gate, up, down) 3 * 64*96             = 36864  (not 4 * 18432)
#   lm_head    64*100                                            =  6400  -> matmul_params 55808
MIXTRAL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100)


def test_flops_count_active_experts_by_hand():
    expected = CostModel(matmul_params=55_808, lm_head_params=6_400, num_layers=1, attn_dim=64)
    config = MixtralConfig(**MIXTRAL)
    assert CostModel.from_config(config) == expected
    assert CostModel.from_config(config, instantiate=False) == expected
    one = CostModel.from_config(MixtralConfig(**{**MIXTRAL, "num_experts_per_tok": 1}))
    assert expected.matmul_params - one.matmul_params == 18_432  # one expert's gate, up and down


def test_flops_of_an_upcycled_model_follow_experts_per_token():
    model = dense()
    upcycler = Upcycler(model, [model, model, model])
    dense_cost = CostModel.from_model(model)
    gates = router_gates(model, "random", 3)
    costs = {k: CostModel.from_model(upcycler.update(model, gates, k, 1.0)) for k in (1, 2, 3)}
    router = 2 * 3 * 32  # two layers of hidden x experts
    expert = 2 * 3 * 32 * 48  # two layers of gate, up, down
    for k, cost in costs.items():
        assert cost.matmul_params == dense_cost.matmul_params + router + (k - 1) * expert


@pytest.mark.parametrize("experts_per_token", [1, 2, 4])
def test_flops_within_10_percent_of_flop_counter(experts_per_token):
    torch.manual_seed(0)
    config = MixtralConfig(**{**MIXTRAL, "num_experts_per_tok": experts_per_token, "num_hidden_layers": 2})
    config._attn_implementation = "eager"
    model = MixtralForCausalLM(config).eval()
    model.set_experts_implementation("eager")  # the grouped kernel's matmuls are invisible to the counter
    cost = CostModel.from_model(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 100, (1, SEQ)))
    total = counter.get_total_flops()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert abs(cost.forward_flops(SEQ) - total) / total < 0.10, (cost.forward_flops(SEQ), total)
    assert by_op["aten.mm"] == 2 * cost.matmul_params * SEQ  # router + active experts, exactly


# --- config and genes ----------------------------------------------------------------------------------

def test_shipped_demo_moe_config_is_valid(tmp_path):
    # the shipped file, unchanged, beside stand-ins for the zoo folders and the task folder it names
    (tmp_path / "search_spaces").mkdir()
    shipped = (REPO / "search_spaces" / "demo_moe.yaml").read_text()
    (tmp_path / "search_spaces" / "demo_moe.yaml").write_text(shipped)
    for name in ("base", "add", "rev", "sort"):
        (tmp_path / "runs" / "zoo" / name).mkdir(parents=True)
        (tmp_path / "runs" / "zoo" / name / "config.json").write_text("{}")
    (tmp_path / "evals" / "demo").mkdir(parents=True)
    config = load_config(tmp_path / "search_spaces" / "demo_moe.yaml")
    assert config.moe is not None and config.moe.gate_mode == "hidden"
    assert len(config.moe.prompts) == len(config.models.experts)
    layout = GenomeLayout.build(config.merge.method, config.merge.granularity, 4, len(config.models.experts),
                                {"weight": config.merge.bound("weight")}, config.policy, config.moe)
    assert [g.name for g in layout.genes[-2:]] == ["experts_per_token", "temperature"]
    assert layout.size == 5 * 3 + 2  # per-layer merge weights (the attention source) + the mixture's genes


def _moe_config(tmp_path: Path, zoo_paths: dict[str, str], **moe) -> Path:
    raw = {"models": {"base": zoo_paths["base"], "experts": [zoo_paths["a"], zoo_paths["b"]]},
           "eval": {"tasks": [{"name": "t", "metric": "acc"}]}, "moe": moe}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def model_folders(tmp_path) -> dict[str, str]:
    folders = {}
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        folders[name] = str(tmp_path / name)
    return folders


@pytest.mark.parametrize("moe, message", [
    ({"gate_mode": "hidden"}, "moe.prompts: gate_mode hidden needs a non-empty list"),
    ({"gate_mode": "cheap_embed", "prompts": [["a"]]}, "moe.prompts: one list of prompts per expert, 2"),
    ({"gate_mode": "random", "experts_per_token": 3}, "moe.experts_per_token: at most the 2 experts"),
    ({"gate_mode": "random", "experts_per_token": None, "bounds": {"experts_per_token": [1, 5]}},
     "moe.bounds.experts_per_token: at most the 2 experts"),
    ({"gate_mode": "random", "bounds": {"temperature": [0, 1]}}, "temperature: expected low > 0"),
    ({"gate_mode": "nope"}, says("moe.gate_mode", "hidden", "cheap_embed", "random")),
    ({"gate_mode": "random", "router": 1}, "moe.router: unknown key; expected one of: attention, gate_mode"),
])
def test_bad_moe_blocks_are_one_line_errors(tmp_path, model_folders, moe, message):
    with pytest.raises(ConfigError) as error:
        load_config(_moe_config(tmp_path, model_folders, **moe))
    assert re.search(message, str(error.value)) and "\n" not in str(error.value)


def test_moe_genes_decode(tmp_path, model_folders):
    config = load_config(_moe_config(tmp_path, model_folders, gate_mode="random", experts_per_token=None,
                                     bounds={"experts_per_token": [1, 2], "temperature": [0.25, 4.0]}))
    layout = GenomeLayout.build("task_arithmetic", "layer", 2, 2, {"weight": (0.0, 1.5)}, moe=config.moe)
    assert [g.group for g in layout.genes] == ["moe", "moe"]  # attention from the base: no merge genes
    low = layout.decode([0.0, 0.0])
    assert low.moe == {"experts_per_token": 1, "temperature": 0.25}
    assert low.params == {"all": {"weight": [0.0, 0.0]}}  # the base, exactly
    high = layout.decode([1.0, 0.5])
    assert high.moe["experts_per_token"] == 2 and high.moe["temperature"] == pytest.approx(1.0)
    assert layout.decode([0.49, 1.0]).moe["experts_per_token"] == 1
    assert layout.decode([0.51, 1.0]).moe == {"experts_per_token": 2, "temperature": 4.0}


# --- the real path: search, export, reload ------------------------------------------------------------

@pytest.mark.slow
def test_moe_search_exports_a_mixture_that_reloads_with_its_score(zoo, ray_cluster, tmp_path):
    from evomerge.export import evaluate_folder, export
    from evomerge.run_dir import RunDir
    from evomerge.search import search

    prompts = [["12+34=", "5+61="], ["rev abc=", "rev kqmf="], ["sort cab=", "sort zyx="]]
    config = load_config(write_config(tmp_path, zoo, moe={"attention": "merged", "prompts": prompts,
                                                          "experts_per_token": None,
                                                          "bounds": {"experts_per_token": [1, 3]}}))
    search(config, tmp_path / "run")
    records = RunDir.open(tmp_path / "run").records()
    assert all(r["state"] == "complete" for r in records), [r["error"] for r in records]
    mixtures = [r for r in records if r["recipe"].get("moe")]
    references = [r for r in records if r["label"]]
    assert mixtures and len(mixtures) + len(references) == len(records)
    assert all(r["flops"] > 0 for r in records)
    best = max(mixtures, key=lambda r: r["quality"])
    export(tmp_path / "run", tmp_path / "out", trial_id=best["trial"])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded) is MixtralForCausalLM
    k = best["recipe"]["moe"]["experts_per_token"]
    assert reloaded.config.num_experts_per_tok == k and reloaded.config.num_local_experts == 3
    # its cost: the base's plus the routers plus k - 1 more MLPs per layer (not 3 experts' worth)
    base = AutoConfig.from_pretrained(zoo["base"])
    layers, hidden, width = base.num_hidden_layers, base.hidden_size, base.intermediate_size
    expected = CostModel.from_config(base).matmul_params + layers * (3 * hidden + (k - 1) * 3 * hidden * width)
    assert CostModel.from_model(reloaded).matmul_params == expected
    assert json.loads((tmp_path / "out" / "recipe.json").read_text())["recipe"]["moe"] == best["recipe"]["moe"]
    assert evaluate_folder(config, tmp_path / "out") == best["quality"]
