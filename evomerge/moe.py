"""Sparse upcycling: a mixture of experts built from dense experts that share a base.

Following mergekit-moe and Komatsuzaki et al., "Sparse Upcycling" (arXiv 2212.05055), every
decoder layer of the MoE takes its attention, norms (and the model its embeddings and head)
from one dense model, the *attention source* (the base, or a candidate's merged model), and
gets one MLP expert per dense expert, its gate/up/down projections copied. The router of
each layer is a matrix of one gate vector per expert:

* ``hidden``: the mean, over every token of the expert's positive prompts, of the hidden
  state the router sees (the input of the layer's MLP, after the post-attention norm) in
  the attention source; mergekit-moe's ``hidden`` reads the last token of the residual
  stream instead, its ``hidden_avg`` the mean over tokens;
* ``cheap_embed``: the mean input embedding of the prompts' tokens, the same for every layer;
* ``random``: a seeded standard normal vector.

Each gate vector is scaled to unit length; the router's logits are then divided by the
``temperature`` (folded into the router weights, so an exported model carries it). The MoE
architectures transformers ships route as Mixtral does: softmax over all experts, keep the
``experts_per_token`` largest, renormalise them to sum to one. Hence the *upcycling
identity*: experts that are copies of one dense MLP give back that dense model, whatever
the gates and ``experts_per_token``.

Sources: gated MLPs with ``gate_proj``, ``up_proj``, ``down_proj`` and no MLP biases, in an
architecture whose MoE sibling transformers ships with the same attention, norms and
embeddings (``ARCHITECTURES``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from evomerge.config import ModelsConfig, MoeConfig
from evomerge.errors import ModelMismatchError
from evomerge.models.sources import require_same_shapes

GATE_MODES = ("hidden", "cheap_embed", "random")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoeArchitecture:
    """The MoE sibling of a dense architecture: its model_type and config keys."""

    model_type: str
    num_experts_key: str
    expert_width_key: str  # config field holding one expert's intermediate size
    fixed: dict[str, Any] = field(default_factory=dict)  # config values the upcycled model needs


# Dense model_type -> MoE model_type with the same attention, norms, embeddings and rotary code.
ARCHITECTURES: dict[str, MoeArchitecture] = {
    "llama": MoeArchitecture("mixtral", "num_local_experts", "intermediate_size"),
    "mistral": MoeArchitecture("mixtral", "num_local_experts", "intermediate_size"),
    # Qwen2-MoE adds a shared expert; a zero-wide one contributes exactly nothing.
    "qwen2": MoeArchitecture("qwen2_moe", "num_experts", "moe_intermediate_size",
                             {"shared_expert_intermediate_size": 0, "norm_topk_prob": True, "qkv_bias": True,
                              "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "qwen3": MoeArchitecture("qwen3_moe", "num_experts", "moe_intermediate_size",
                             {"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}),
}


def architecture(config: Any, field_name: str = "models.base") -> MoeArchitecture:
    """The MoE architecture for a dense config; one-line error for any other model type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ModelMismatchError(f"{field_name}: model_type {model_type!r} cannot be upcycled into a mixture of "
                                 f"experts; expected one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (`model.layers` under the base model)."""
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelMismatchError(f"{type(model).__name__}: no decoder layers at base_model.layers")
    return layers


def mlp_weight_names(model: torch.nn.Module) -> list[dict[str, str]]:
    """Per decoder layer, the parameter names of its gate/up/down projections (`model.layers.3.mlp.up_proj.weight`)."""
    prefix = _layers_prefix(model)
    return [{p: f"{prefix}{index}.mlp.{p}.weight" for p in MLP_PROJECTIONS}
            for index in range(len(decoder_layers(model)))]


def check_dense_mlps(params: dict[str, torch.Tensor], names: list[dict[str, str]], field_name: str) -> None:
    """Refuse parameters without Llama-like gated MLPs (or with MLP biases), naming the tensor."""
    for layer in names:
        for name in layer.values():
            if name not in params or params[name].dim() != 2:
                raise ModelMismatchError(f"{field_name}: tensor {name!r} missing; upcycling needs Llama-like "
                                         f"gated MLPs ({', '.join(MLP_PROJECTIONS)}) without biases")
            bias = name.removesuffix(".weight") + ".bias"
            if bias in params:
                raise ModelMismatchError(f"{field_name}: tensor {bias!r}: MLP biases have no place in the experts "
                                         f"of a mixture")


def moe_config(dense: Any, num_experts: int, experts_per_token: int) -> Any:
    """The config of the MoE sibling of `dense`, with `num_experts` experts of the dense MLP's width."""
    from transformers import AutoConfig

    arch = architecture(dense)
    target = type(AutoConfig.for_model(arch.model_type))
    known = {f.name for f in dataclasses.fields(target)} if dataclasses.is_dataclass(target) else set()
    values = {key: value for key, value in dense.to_dict().items()
              if key in known and key not in ("architectures", "transformers_version", "model_type")}
    values.update(arch.fixed)
    values.update({arch.num_experts_key: num_experts, arch.expert_width_key: dense.intermediate_size,
                   "num_experts_per_tok": experts_per_token, "output_router_logits": False})
    config = target(**values)
    if getattr(dense, "head_dim", None) and "head_dim" not in known:
        config.head_dim = dense.head_dim  # attention modules read it with getattr
    config.architectures = [type(AutoConfig.for_model(arch.model_type)).__name__.replace("Config", "ForCausalLM")]
    return config


class Upcycler:
    """A preallocated MoE whose experts are copied once; `update` rewrites attention and router in place.

    `experts` are the dense experts, as models or as their parameters by name (what the
    merger holds); their MLPs become the MoE's experts, in order. `update(source, gates,
    experts_per_token, temperature)` copies every non-MLP tensor of `source` (the base or a
    merged candidate), sets the router weights to gates / temperature and the number of
    experts per token.
    """

    def __init__(self, base: torch.nn.Module, experts: Sequence[torch.nn.Module | Mapping[str, torch.Tensor]]):
        from transformers import AutoModelForCausalLM

        if not experts:
            raise ModelMismatchError("models.experts: upcycling needs at least one expert")
        architecture(base.config)
        names = mlp_weight_names(base)
        check_dense_mlps(dict(base.named_parameters()), names, "models.base")
        experts = [dict(e.named_parameters()) if isinstance(e, torch.nn.Module) else e for e in experts]
        for index, expert in enumerate(experts):
            check_dense_mlps(expert, names, f"models.experts.{index}")
        self.num_experts = len(experts)
        param = next(base.parameters())
        config = moe_config(base.config, self.num_experts, experts_per_token=min(2, self.num_experts))
        config._attn_implementation = base.config._attn_implementation
        with torch.device(param.device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=param.dtype).eval()
        check_same_tensors(base, self.model)
        with torch.no_grad():
            for index, layer in enumerate(decoder_layers(self.model)):
                stack = layer.mlp.experts
                width = stack.down_proj.shape[-1]
                for e, expert in enumerate(experts):
                    stack.gate_up_proj[e, :width].copy_(expert[names[index]["gate_proj"]])
                    stack.gate_up_proj[e, width:].copy_(expert[names[index]["up_proj"]])
                    stack.down_proj[e].copy_(expert[names[index]["down_proj"]])
                for name, tensor in layer.mlp.named_parameters():
                    if not name.startswith(("experts.", "gate.")):
                        tensor.zero_()  # a zero-wide shared expert and its gate (Qwen2-MoE)

    @torch.no_grad()
    def update(self, source: torch.nn.Module, gates: torch.Tensor, experts_per_token: int,
               temperature: float) -> torch.nn.Module:
        """Attention, norms, embeddings and head from `source`; router = gates / temperature."""
        if not 1 <= experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token: expected 1..{self.num_experts}, got {experts_per_token}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        layers = decoder_layers(self.model)
        if tuple(gates.shape) != (len(layers), self.num_experts, self.model.config.hidden_size):
            raise ValueError(f"gates: expected shape {[len(layers), self.num_experts, self.model.config.hidden_size]}, "
                             f"got {list(gates.shape)}")
        dense = dict(source.named_parameters())
        for name, tensor in self.model.named_parameters():
            if ".mlp." not in name:
                tensor.copy_(dense[name])
        for index, layer in enumerate(layers):
            layer.mlp.gate.weight.copy_(gates[index] / temperature)
        set_experts_per_token(self.model, experts_per_token)
        return self.model


def check_same_tensors(dense: torch.nn.Module, moe: torch.nn.Module) -> None:
    """Every non-MLP tensor of the dense model has a same-shaped place in the MoE, and vice versa."""
    ours = {n: p.shape for n, p in moe.named_parameters() if ".mlp." not in n}
    theirs = {n: p.shape for n, p in dense.named_parameters() if ".mlp." not in n}
    kind = moe.config.model_type
    require_same_shapes(theirs, ours, {
        "missing": f"models.base: tensor {{name!r}} has no place in a {kind} mixture of experts",
        "extra": f"models.base: tensor {{name!r}} of the {kind} mixture is not in the dense model",
        "shape": f"models.base: tensor {{name!r}} has shape {{ours}}, the {kind} mixture expects {{theirs}}",
    }, [*theirs, *(n for n in ours if n not in theirs)])  # in the dense model's order


def check_upcyclable(models: ModelsConfig) -> None:
    """Before a search: refuse sources that cannot become a mixture, naming the field or tensor
    (built on the meta device: no weights read). The experts share the base's tensors
    (`sources.check_sources`), so the base stands for them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(models.base, trust_remote_code=models.trust_remote_code)
    architecture(config)
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config, trust_remote_code=models.trust_remote_code)
        check_dense_mlps(dict(dense.named_parameters()), mlp_weight_names(dense), "models.base")
        moe = AutoModelForCausalLM.from_config(moe_config(config, len(models.experts), 1))
    check_same_tensors(dense, moe)


def upcycle_candidate(upcycler: Upcycler, source: torch.nn.Module, tokenizer: Any, moe: MoeConfig,
                      settings: dict[str, Any], seed: int) -> torch.nn.Module:
    """The mixture of one candidate: routers read from `source` (its attention source), then the
    recipe's `{"experts_per_token", "temperature"}`. Workers and export both build it here."""
    gates = router_gates(source, moe.gate_mode, upcycler.num_experts, moe.prompts, tokenizer, seed)
    return upcycler.update(source, gates, int(settings["experts_per_token"]), float(settings["temperature"]))


def set_experts_per_token(model: torch.nn.Module, experts_per_token: int) -> None:
    """Route every token to `experts_per_token` experts (config and every router)."""
    model.config.num_experts_per_tok = experts_per_token
    for module in model.modules():
        if hasattr(module, "top_k") and hasattr(module, "num_experts"):
            module.top_k = experts_per_token


@torch.no_grad()
def router_gates(model: torch.nn.Module, mode: str, num_experts: int, prompts: Sequence[Sequence[str]] = (),
                 tokenizer: Any = None, seed: int = 0) -> torch.Tensor:
    """Gate vectors (layers, experts, hidden), each of unit length, read from the dense `model`."""
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    if mode == "random":
        generator = torch.Generator().manual_seed(seed)
        gates = torch.randn(len(layers), num_experts, hidden, generator=generator, dtype=torch.float32)
    elif mode in ("hidden", "cheap_embed"):
        if len(prompts) != num_experts or any(len(p) == 0 for p in prompts):
            raise ValueError(f"moe.prompts: gate_mode {mode} needs a non-empty list of prompts for each of the "
                             f"{num_experts} experts (got {[len(p) for p in prompts]})")
        vectors = [_mean_hidden(model, tokenizer, list(p)) if mode == "hidden" else
                   _mean_embedding(model, tokenizer, list(p)).expand(len(layers), hidden)
                   for p in prompts]
        gates = torch.stack(vectors, dim=1)
    else:
        raise ValueError(f"gate_mode: unknown {mode!r}; expected one of: {', '.join(GATE_MODES)}")
    gates = gates / gates.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    param = next(model.parameters())
    return gates.to(device=param.device, dtype=param.dtype)


def _token_ids(tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("router_gates: a tokenizer is needed for prompt-based gates")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ValueError(f"moe.prompts: prompt {prompt!r} has no tokens")
    return ids.to(device)


def _mean_hidden(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """(layers, hidden): the input of each layer's MLP averaged over every token of the prompts."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), model.config.hidden_size, dtype=torch.float32)
    count = 0
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach()))
             for layer in layers]
    try:
        device = next(model.parameters()).device
        for prompt in prompts:  # one at a time: no padding to mask, whatever the tokenizer
            seen.clear()
            ids = _token_ids(tokenizer, prompt, device)
            model(input_ids=ids, use_cache=False)
            for index, states in enumerate(seen):
                sums[index] += states.float().reshape(-1, states.shape[-1]).sum(dim=0).cpu()
            count += ids.shape[-1]
    finally:
        for hook in hooks:
            hook.remove()
    return sums / count


def _mean_embedding(model: torch.nn.Module, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """(1, hidden): the mean input embedding of every token of the prompts."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    ids = torch.cat([_token_ids(tokenizer, prompt, device).reshape(-1) for prompt in prompts])
    return embed(ids).float().mean(dim=0, keepdim=True).cpu()


def upcycle(base: torch.nn.Module, experts: Sequence[torch.nn.Module], prompts_per_expert: Sequence[Sequence[str]],
            gate_mode: str = "hidden", experts_per_token: int = 2, temperature: float = 1.0, seed: int = 0,
            tokenizer: Any = None) -> torch.nn.Module:
    """A new MoE model in memory: attention etc. from `base`, one expert per dense expert's MLP,
    routers from `gate_mode` (see the module docstring)."""
    upcycler = Upcycler(base, experts)
    gates = router_gates(base, gate_mode, len(experts), prompts_per_expert, tokenizer, seed)
    return upcycler.update(base, gates, experts_per_token, temperature)


def _layers_prefix(model: torch.nn.Module) -> str:
    """`model.layers.` for a Llama-like causal LM: the name prefix of the decoder layers."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return f"{name}."
    raise ModelMismatchError(f"{type(model).__name__}: decoder layers not found among its modules")
