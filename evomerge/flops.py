"""Forward FLOPs of a decoder-only causal LM, from its config or its modules.

Convention (the one of Kaplan et al. 2020, "Scaling Laws for Neural Language
Models", Table 1: ``C_forward ≈ 2 N + 2 n_layer n_ctx d_attn`` per token):

* a multiply-add is 2 FLOPs; forward pass only (no backward);
* **matmuls with weights**: every token that goes through a weight matrix of
  ``m x n`` costs ``2 m n``.  ``matmul_params`` is the sum of ``m n`` over all
  such matrices: attention projections (q, k, v, o; k and v are narrower under
  GQA/MQA), MLP matrices (3 for gated SwiGLU MLPs as in Llama/Mistral/Qwen, 2 for
  GPT-2/GPT-NeoX/OPT), and the ``lm_head``.  The input embedding is a lookup
  (0 FLOPs); the ``lm_head`` is a real ``hidden x vocab`` matmul, counted whether
  or not its weight is tied to the input embedding (tying shares memory, not work);
* **attention scores**: a query at (0-based) position ``p`` attends to ``p + 1``
  positions under causal masking; ``Q K^T`` and ``A V`` each cost
  ``2 * d_attn`` per attended position, where ``d_attn`` = query heads x head_dim
  (GQA shares k/v heads but every query head still does its own dot products).
  Only the causal positions are counted (an eager implementation that computes the
  full masked square does about twice this work on the attention part);
* ignored as sub-leading: biases, norms, activations, softmax, rotary/positional
  terms, residual adds, sampling.  Sliding-window attention is counted as full
  causal attention (exact while the context fits in the window, an upper bound
  beyond);
* **mixtures of experts** (Mixtral, Qwen-MoE, ...): a token goes through the router
  (``hidden x num_experts``) and through ``experts_per_token`` of the ``num_experts``
  expert MLPs, so only that many experts are counted (per layer
  ``experts_per_token / num_experts`` of the stacked expert weights), plus any shared
  expert.

The lm_head matters for *which positions need logits*: transformers' ``generate``
asks for the logits of the last position only (``logits_to_keep=1``), while a
log-likelihood forward (lm-eval) needs them for every position.  ``forward_flops``
therefore takes the number of positions that go through the lm_head.

FLOPs are returned as exact Python integers (no overflow, no rounding).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["CostModel", "causal_attended_positions"]

# model_type of common architectures whose MLP is up -> activation -> down (2 matrices);
# any other model_type is assumed gated (gate, up, down: 3 matrices), as in Llama/Mistral/Qwen/Gemma.
_UNGATED_MLP = frozenset({
    "gpt2", "gpt_neox", "gpt_neo", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi",
    "codegen", "starcoder2", "mpt", "biogpt", "xglm",
})
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k")


def causal_attended_positions(new_tokens: int, context: int = 0) -> int:
    """Sum over ``new_tokens`` queries at positions ``context .. context+new_tokens-1`` of the
    positions each attends to causally (itself and all before): ``n*c + n(n+1)/2``."""
    _check_count("new_tokens", new_tokens)
    _check_count("context", context)
    return new_tokens * context + new_tokens * (new_tokens + 1) // 2


@dataclass(frozen=True)
class CostModel:
    """Forward cost of one causal LM.

    matmul_params: weight elements of every matmul a token goes through, lm_head included
        (FLOPs per token = 2 * matmul_params when logits are computed for it).
    lm_head_params: the lm_head's share of ``matmul_params`` (hidden x vocab).
    num_layers: decoder layers.
    attn_dim: query heads x head_dim, summed over layers (``n_layer * d_attn`` in Kaplan's
        notation); attention costs ``4 * attn_dim`` FLOPs per (query, attended position) pair.
    """

    matmul_params: int
    lm_head_params: int
    num_layers: int
    attn_dim: int

    def __post_init__(self) -> None:
        for name in ("matmul_params", "lm_head_params", "num_layers", "attn_dim"):
            _check_count(name, getattr(self, name))
        if self.lm_head_params > self.matmul_params:
            raise ValueError("lm_head_params is part of matmul_params and cannot exceed it")

    # --- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Any, *, instantiate: bool = True) -> CostModel:
        """Cost model of ``config`` (a ``transformers.PretrainedConfig``).

        With ``instantiate`` (default) the model is built on the meta device (no memory, no
        weights) and its matmuls are counted from the real module structure (``from_model``);
        if that fails (e.g. an architecture transformers cannot build) or ``instantiate`` is
        False, the formula of ``_formula_matmul_params`` is used.
        """
        config = _text_config(config)
        if instantiate:
            try:
                from transformers import AutoModelForCausalLM

                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(config)
            except Exception as exc:  # noqa: BLE001 - any build failure means: fall back to the formula
                logger.warning("cannot build %s on the meta device (%s); FLOPs from the config formula",
                               getattr(config, "model_type", type(config).__name__), exc)
                model = None
            if model is not None:
                return cls.from_model(model)
        matmul, lm_head = _formula_matmul_params(config)
        layers, attn = _attention_dims(config)
        return cls(matmul_params=matmul, lm_head_params=lm_head, num_layers=layers, attn_dim=attn)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> CostModel:
        """Cost model of an instantiated model (any device, meta included).

        ``matmul_params`` = sum of in x out over every ``nn.Linear`` (in_features x out_features,
        so quantised/packed weights count at their logical size) and every transformers
        ``Conv1D`` (GPT-2's linear layers), once per place it occurs in the module tree (a layer
        that a data-flow path runs twice counts twice); embeddings are lookups and count nothing.  The
        lm_head is ``model.get_output_embeddings()``.  Attention dimensions come from
        ``model.config``.  In a mixture of experts, a module holding the experts' weights
        as stacked 3-D tensors counts ``experts_per_token`` of its ``num_experts`` experts,
        and a router (a module with ``top_k`` and a ``weight``) counts its weight.
        """
        config = _text_config(model.config)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        lm_head = _linear_params(head) if head is not None else 0
        # every occurrence counts: a module reached twice (a layer repeated on a data-flow path) runs twice
        matmul = sum(_linear_params(module) for _, module in model.named_modules(remove_duplicate=False))
        if _num_experts(config) > 1:
            matmul += _active_expert_params(model, _experts_per_token(config))
        layers, attn = _attention_dims(config)
        return cls(matmul_params=matmul, lm_head_params=lm_head, num_layers=layers, attn_dim=attn)

    # --- costs ----------------------------------------------------------------------------

    def forward_flops(self, new_tokens: int, context: int = 0, logit_positions: int | None = None) -> int:
        """FLOPs of one forward over ``new_tokens`` tokens that attend, causally, to ``context``
        earlier tokens already in the KV cache and to each other:

            2 * (matmul_params - lm_head_params) * new_tokens
          + 2 * lm_head_params * logit_positions               (default: every new token)
          + 4 * attn_dim * (new_tokens * context + new_tokens * (new_tokens + 1) / 2)
        """
        positions = new_tokens if logit_positions is None else logit_positions
        _check_count("logit_positions", positions)
        if positions > new_tokens:
            raise ValueError(f"logit_positions={positions} exceeds new_tokens={new_tokens}")
        body = self.matmul_params - self.lm_head_params
        return (2 * body * new_tokens + 2 * self.lm_head_params * positions
                + 4 * self.attn_dim * causal_attended_positions(new_tokens, context))

    def prompt_flops(self, prompt_len: int) -> int:
        """Prefill of ``prompt_len`` tokens into an empty cache, logits for the last position only
        (what ``generate`` does; also the cost of reading a router prefix's next-token logits)."""
        return self.forward_flops(prompt_len, 0, logit_positions=min(1, prompt_len))

    def generate_flops(self, prompt_len: int, new_tokens: int) -> int:
        """Greedy/sampled generation of ``new_tokens`` tokens after a ``prompt_len`` prompt, with a
        KV cache: the prefill yields the first new token, then each of the ``new_tokens - 1``
        following tokens is one single-token forward over the cache (the last generated token
        is never fed back).  Logits for one position per forward.  Those single-token forwards
        together cost what one forward of ``new_tokens - 1`` tokens after the prompt costs
        (the same matmuls, each query attending to the same positions), computed so."""
        _check_count("new_tokens", new_tokens)
        if new_tokens == 0:
            return 0
        steps = new_tokens - 1
        return self.prompt_flops(prompt_len) + self.forward_flops(steps, prompt_len, logit_positions=steps)

    def loglikelihood_flops(self, context_len: int, continuation_len: int) -> int:
        """lm-eval's log-likelihood request: one forward over ``(context + continuation)[:-1]``
        (the last continuation token is only a target, never an input), logits for every
        position.  Padding added by batching is not counted."""
        _check_count("context_len", context_len)
        _check_count("continuation_len", continuation_len)
        tokens = max(context_len + continuation_len - 1, 0)
        return self.forward_flops(tokens)


# --- helpers --------------------------------------------------------------------------------

def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _num_experts(config: Any) -> int:
    """Routed experts per MoE layer (0 for a dense config)."""
    for key in _MOE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _experts_per_token(config: Any) -> int:
    for key in _EXPERTS_PER_TOKEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise NotImplementedError(f"mixture-of-experts config without experts per token "
                              f"(none of {', '.join(_EXPERTS_PER_TOKEN_KEYS)})")


def _active_expert_params(model: torch.nn.Module, experts_per_token: int) -> int:
    """Matmul weights a token meets in the MoE layers: the router, and experts_per_token experts of
    each stack of experts (transformers keeps them as 3-D tensors, one slice per expert)."""
    total, stacks = 0, 0
    for module in model.modules():
        num_experts = getattr(module, "num_experts", None)
        if not isinstance(num_experts, int) or num_experts < 1:
            continue
        stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3 and p.shape[0] == num_experts]
        if stacked:
            stacks += 1
            total += experts_per_token * sum(p[0].numel() for p in stacked)
        elif hasattr(module, "top_k") and isinstance(getattr(module, "weight", None), torch.Tensor):
            total += module.weight.numel()  # the router: hidden x num_experts
    if stacks == 0:
        raise NotImplementedError(f"{type(model).__name__}: mixture-of-experts config but no stacked expert "
                                  "weights found; its experts are not modelled by CostModel")
    return total


def _linear_params(module: torch.nn.Module) -> int:
    """in x out of a linear layer (nn.Linear or transformers' Conv1D), 0 for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features * module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.numel()  # transformers.pytorch_utils.Conv1D: weight (in, out)
    return 0


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim if head_dim else config.hidden_size // config.num_attention_heads


def _attention_dims(config: Any) -> tuple[int, int]:
    """(num_layers, attn_dim): attn_dim = num_layers * query heads * head_dim."""
    layers = config.num_hidden_layers
    return layers, layers * config.num_attention_heads * _head_dim(config)


def _intermediate_size(config: Any) -> int:
    for key in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        value = getattr(config, key, None)
        if value:
            return value
    return 4 * config.hidden_size  # GPT-2 (n_inner=None), GPT-Neo, Falcon default


def _formula_matmul_params(config: Any) -> tuple[int, int]:
    """(matmul_params, lm_head_params) from config fields alone.

    Per layer, with h = hidden, q = heads * head_dim, kv = kv_heads * head_dim, f = intermediate:
        attention  h*q + 2*h*kv + q*h        (q, k, v, o projections)
        MLP        3*h*f gated, 2*h*f otherwise
    plus the lm_head h * vocab.  Extra projections some architectures add (e.g. OPT-350m's
    project_in/out) are only seen by ``from_model``.
    """
    hidden = config.hidden_size
    head_dim = _head_dim(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q, kv = heads * head_dim, kv_heads * head_dim
    mlp_matrices = 2 if getattr(config, "model_type", "") in _UNGATED_MLP else 3
    mlp = mlp_matrices * hidden * _intermediate_size(config)
    experts = _num_experts(config)
    if experts:  # router + experts_per_token experts of moe_intermediate_size (or intermediate_size) + shared
        if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
            raise NotImplementedError("mixture-of-experts config with dense layers: count it from its modules")
        width = getattr(config, "moe_intermediate_size", None) or _intermediate_size(config)
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        mlp = (hidden * experts + _experts_per_token(config) * 3 * hidden * width
               + (3 * hidden * shared + hidden if getattr(config, "model_type", "") == "qwen2_moe" else 0))
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + mlp
    lm_head = hidden * config.vocab_size
    return config.num_hidden_layers * per_layer + lm_head, lm_head
