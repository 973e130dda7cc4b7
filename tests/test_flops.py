"""CostModel: hand-computed FLOPs for tiny configs, the formula against the real module
structure, and the counts of torch's FlopCounterMode on tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
)

from evomerge.flops import CostModel, causal_attended_positions

SEQ = 32


def llama_config(**overrides) -> LlamaConfig:
    fields = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaConfig(**{**fields, **overrides})


def gpt2_config(**overrides) -> GPT2Config:
    fields = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2Config(**{**fields, **overrides})


# --- hand-computed ------------------------------------------------------------------------

# Llama, h=64, 4 heads of 16, f=160, 2 layers, vocab 128, untied:
#   attention  q 64*64 + k 64*64 + v 64*64 + o 64*64          = 16384
#   MLP        gate, up, down 3 * 64*160                       = 30720
#   per layer  47104, x 2 layers                               = 94208
#   lm_head    64*128                                          =  8192  -> matmul_params 102400
#   attn_dim   2 layers * 4 heads * 16                         =   128
LLAMA_MHA = CostModel(matmul_params=102_400, lm_head_params=8_192, num_layers=2, attn_dim=128)
# GQA with 2 kv heads: k and v shrink to 64*32 = 2048 each:
#   attention 4096 + 2048 + 2048 + 4096 = 12288; layer 43008; x 2 = 86016; + 8192 = 94208
LLAMA_GQA = CostModel(matmul_params=94_208, lm_head_params=8_192, num_layers=2, attn_dim=128)
# head_dim=32 set explicitly (q width 4*32 = 128 != hidden), 2 kv heads (k/v width 64):
#   q 64*128 + k 64*64 + v 64*64 + o 128*64 = 8192 + 4096 + 4096 + 8192 = 24576
#   layer 24576 + 30720 = 55296; x 2 = 110592; + 8192 = 118784; attn_dim 2*4*32 = 256
LLAMA_HEAD_DIM = CostModel(matmul_params=118_784, lm_head_params=8_192, num_layers=2, attn_dim=256)
# GPT-2, h=64, n_inner=None -> f=256, 2 layers, vocab 128, tied (tying does not remove the matmul):
#   c_attn 64*192 + c_proj 64*64 + c_fc 64*256 + c_proj 256*64 = 12288 + 4096 + 16384 + 16384 = 49152
#   x 2 = 98304; + lm_head 64*128 = 8192 -> 106496; attn_dim 2*4*16 = 128 (biases not counted)
GPT2 = CostModel(matmul_params=106_496, lm_head_params=8_192, num_layers=2, attn_dim=128)


@pytest.mark.parametrize("config, expected", [
    (llama_config(), LLAMA_MHA),
    (llama_config(num_key_value_heads=2), LLAMA_GQA),
    (llama_config(num_key_value_heads=2, head_dim=32), LLAMA_HEAD_DIM),
    (gpt2_config(), GPT2),
], ids=["llama", "llama-gqa", "llama-head-dim", "gpt2"])
def test_cost_model_matches_hand_count_by_modules_and_by_formula(config, expected, caplog):
    assert CostModel.from_config(config) == expected
    assert "config formula" not in caplog.text  # built on the meta device, counted from modules
    assert CostModel.from_config(config, instantiate=False) == expected


def test_forward_flops_by_hand():
    # 32 tokens, empty cache: matmuls 2 * 102400 * 32 = 6553600;
    # attended positions 1 + 2 + ... + 32 = 528, attention 4 * 128 * 528 = 270336.
    assert LLAMA_MHA.forward_flops(32) == 6_553_600 + 270_336
    # 4 tokens after 10 cached: matmuls 2 * 102400 * 4 = 819200; attended 11+12+13+14 = 50,
    # attention 4 * 128 * 50 = 25600.
    assert causal_attended_positions(4, context=10) == 50
    assert LLAMA_MHA.forward_flops(4, context=10) == 819_200 + 25_600
    # logits for 1 of the 4 positions: 3 lm_head passes fewer, 3 * 2 * 8192 = 49152 less.
    assert LLAMA_MHA.forward_flops(4, context=10, logit_positions=1) == 819_200 + 25_600 - 49_152
    assert LLAMA_MHA.forward_flops(0, context=10) == 0


def test_tied_embeddings_do_not_change_the_cost():
    assert CostModel.from_config(gpt2_config(tie_word_embeddings=False)) == GPT2
    assert CostModel.from_config(llama_config(tie_word_embeddings=True)) == LLAMA_MHA


@pytest.mark.parametrize("model_type, fields", [
    ("mistral", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                     num_key_value_heads=2)),
    ("qwen2", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1)),
    ("gpt_neox", dict(hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4)),
    ("opt", dict(hidden_size=64, ffn_dim=200, num_hidden_layers=2, num_attention_heads=4,
                 word_embed_proj_dim=64)),
    ("phi", dict(hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4)),
])
def test_formula_agrees_with_module_count(model_type, fields):
    config = AutoConfig.for_model(model_type, vocab_size=100, max_position_embeddings=64, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    by_modules = CostModel.from_model(model)
    assert CostModel.from_config(config) == by_modules
    assert CostModel.from_config(config, instantiate=False) == by_modules


def test_module_count_sees_what_the_formula_cannot():
    # OPT-350m style: hidden 64 but embeddings of 32 with project_in (32x64) and project_out (64x32);
    # the lm_head is then 32 x vocab.
    config = AutoConfig.for_model("opt", vocab_size=100, hidden_size=64, ffn_dim=200, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64)
    built = CostModel.from_config(config)
    assert built.lm_head_params == 32 * 100
    layers = 2 * (4 * 64 * 64 + 2 * 64 * 200)
    assert built.matmul_params == layers + 2 * 32 * 64 + 32 * 100


def test_mixture_of_experts_counts_its_active_experts():  # more in tests/test_moe.py
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, vocab_size=100)
    one, two = (CostModel.from_config(MixtralConfig(**fields, num_experts_per_tok=k)) for k in (1, 2))
    assert two.matmul_params - one.matmul_params == 3 * 64 * 96  # one more expert's gate, up and down


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_counts_are_refused(bad):
    with pytest.raises(ValueError):
        LLAMA_MHA.forward_flops(bad)
    with pytest.raises(ValueError):
        LLAMA_MHA.forward_flops(2, context=bad)
    with pytest.raises(ValueError):
        LLAMA_MHA.forward_flops(2, logit_positions=3)


# --- identities --------------------------------------------------------------------------------

def test_incremental_decoding_sums_to_one_forward():
    # token by token with a KV cache costs exactly one forward over the sequence: the same matmuls
    # per token and the same causal (query, key) pairs.
    for cost in (LLAMA_MHA, GPT2):
        steps = [cost.forward_flops(1, context=k) for k in range(SEQ)]
        assert sum(steps) == cost.forward_flops(SEQ)
        assert cost.forward_flops(10) + cost.forward_flops(SEQ - 10, context=10) == cost.forward_flops(SEQ)


def test_attention_term_grows_with_context():
    costs = [LLAMA_MHA.forward_flops(1, context=c) for c in range(0, 200, 10)]
    assert all(b > a for a, b in zip(costs, costs[1:]))
    # each extra cached token adds one attended position per query: 4 * attn_dim FLOPs
    assert LLAMA_MHA.forward_flops(1, context=11) - LLAMA_MHA.forward_flops(1, context=10) == 4 * 128
    assert LLAMA_MHA.forward_flops(1, context=0) == 2 * 102_400 + 4 * 128


def test_generate_and_loglikelihood_compositions():
    # prefill of 8 (logits at the last position) + 4 single-token steps = 12 positions processed,
    # logits for 5 of them.
    assert LLAMA_GQA.generate_flops(8, 5) == LLAMA_GQA.forward_flops(12, logit_positions=5)
    assert LLAMA_GQA.generate_flops(8, 0) == 0
    assert LLAMA_GQA.generate_flops(8, 1) == LLAMA_GQA.prompt_flops(8)
    assert LLAMA_GQA.prompt_flops(8) == LLAMA_GQA.forward_flops(8, logit_positions=1)
    # lm-eval feeds (context + continuation)[:-1]
    assert LLAMA_GQA.loglikelihood_flops(10, 3) == LLAMA_GQA.forward_flops(12)
    assert LLAMA_GQA.loglikelihood_flops(0, 1) == 0


# --- against torch's FlopCounterMode on real tiny models ---------------------------------------

def _counted(model, **inputs) -> tuple[object, int, dict[str, int]]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model(**inputs)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return output, counter.get_total_flops(), by_op


@pytest.mark.parametrize("build, config", [
    (LlamaForCausalLM, llama_config(num_key_value_heads=2)),
    (GPT2LMHeadModel, gpt2_config()),
], ids=["llama-gqa", "gpt2"])
def test_forward_within_10_percent_of_flop_counter(build, config):
    torch.manual_seed(0)
    config._attn_implementation = "eager"  # explicit matmuls the counter can see
    model = build(config).eval()
    cost = CostModel.from_model(model)
    _, total, by_op = _counted(model, input_ids=torch.randint(0, config.vocab_size, (1, SEQ)))
    ours = cost.forward_flops(SEQ)
    assert abs(ours - total) / total < 0.10, (ours, total, by_op)
    # the weight matmuls agree exactly; eager attention computes the full masked SEQ x SEQ square
    # (ours counts only the SEQ(SEQ+1)/2 causal pairs)
    assert by_op.get("aten.mm", 0) + by_op.get("aten.addmm", 0) == 2 * cost.matmul_params * SEQ
    assert by_op["aten.bmm"] == 4 * cost.attn_dim * SEQ * SEQ


def test_cached_decode_step_equals_flop_counter():
    torch.manual_seed(0)
    config = llama_config(num_key_value_heads=2)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    cost = CostModel.from_model(model)
    ids = torch.randint(0, config.vocab_size, (1, SEQ + 1))
    with torch.no_grad():
        past = model(input_ids=ids[:, :SEQ], use_cache=True).past_key_values
    _, total, _ = _counted(model, input_ids=ids[:, SEQ:], past_key_values=past, use_cache=True)
    assert total == cost.forward_flops(1, context=SEQ)


def test_generate_within_10_percent_of_flop_counter():
    torch.manual_seed(0)
    config = llama_config(num_key_value_heads=2)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    cost = CostModel.from_model(model)
    prompt = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                             min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 16 + 8
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    ours = cost.generate_flops(16, 8)
    assert abs(ours - counter.get_total_flops()) / counter.get_total_flops() < 0.10
    # weight matmuls exactly: 23 positions through the layers, logits for 8 of them
    body = cost.matmul_params - cost.lm_head_params
    assert by_op["aten.mm"] == 2 * body * 23 + 2 * cost.lm_head_params * 8
