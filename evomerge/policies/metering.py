"""Serving and metering: one member's batched answers to requests, with the FLOPs each cost and
the member's confidence in it (`serve`), and what a policy served and spent (`PolicyStats`).

FLOPs (`evomerge.flops.CostModel`, token counts from the member's own tokenizer, exactly as HFLM
encodes and truncates):

* `generate_until`: prefill of the prompt + the generated tokens, the stop token that ended the
  answer included (`CostModel.generate_flops`). The generated tokens are counted during
  generation (`GenerationWatch` watches each row) rather than guessed from the returned text,
  whose stop string HFLM strips. Tokens a finished row keeps producing while the rest of its
  batch runs on are batching waste, not counted (as padding is not).
* `loglikelihood`: one forward over `(context + continuation)[:-1]` (left-truncated to the
  model's length) with logits everywhere; requests of one unit that feed the model the same
  tokens (single-token choices of one question) share one forward, as HFLM computes them (and
  as any server would).
* `loglikelihood_rolling`: one forward per rolling window, as HFLM builds them.

The same generation watch yields the mean log-probability of the generated tokens (stop token
included) under the serving model: the confidence `Cascade` compares with its thresholds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from evomerge.policies.members import Member
from evomerge.policies.watch import GenerationWatch

logger = logging.getLogger(__name__)

__all__ = ["PolicyStats", "Served", "serve"]


@dataclass
class PolicyStats:
    """What a policy served and what it cost, accumulated over calls until ``reset``.

    requests: requests received (lm-eval instances).
    served: per member, requests whose result came from it.
    consulted: per member, requests it computed (a cascade consults several members).
    member_flops: per member, FLOPs it spent serving or being consulted.
    routing_flops: FLOPs of routing decisions (prefix scoring), outside ``member_flops``.
    flops: everything: ``sum(member_flops) + routing_flops``.
    request_flops / request_member: per request, in the order received: its FLOPs (a
        unit's routing FLOPs and FLOPs shared by its requests are charged to its first
        request) and the member that served it.
    """

    num_members: int
    requests: int = 0
    served: list[int] = field(default_factory=list)
    consulted: list[int] = field(default_factory=list)
    member_flops: list[int] = field(default_factory=list)
    routing_flops: int = 0
    flops: int = 0
    request_flops: list[int] = field(default_factory=list)
    request_member: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("served", "consulted", "member_flops"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.num_members)

    def reset(self) -> None:
        self.__init__(self.num_members)

    @property
    def flops_per_request(self) -> float:
        return self.flops / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "served": list(self.served), "consulted": list(self.consulted),
                "member_flops": list(self.member_flops), "routing_flops": self.routing_flops,
                "flops": self.flops, "flops_per_request": self.flops_per_request}



@dataclass
class Served:
    """One member's answers to a list of requests, with per-request FLOPs and confidence."""

    results: list[Any]
    flops: list[int]
    confidence: list[float]  # generation: mean token log-prob; log-likelihood: the log-prob


def serve(member: Member, instances: list[Any], request_type: str, groups: list[int] | None = None) -> Served:
    """Answers of one member to ``instances`` (one batched HFLM call), with FLOPs and confidence.

    ``groups``: sizes of consecutive runs of instances that form one unit; log-likelihood
    requests of a unit that feed the model the same tokens share one forward, charged to the
    first of them (default: every instance alone)."""
    if request_type == "generate_until":
        return _serve_generate(member, instances)
    if request_type == "loglikelihood":
        return _serve_loglikelihood(member, instances, groups or [1] * len(instances))
    if request_type == "loglikelihood_rolling":
        return _serve_rolling(member, instances)
    raise ValueError(f"unknown request type {request_type!r}")


def _ll_encode(lm: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The token ids HFLM scores (lm_eval.api.model.TemplateLM.loglikelihood)."""
    if context == "":
        cont = lm.tok_encode(continuation, add_special_tokens=False)
        if cont and lm.prefix_token_id == cont[0]:
            return cont[:1], cont[1:]
        return [lm.prefix_token_id], cont
    return lm._encode_pair(context, continuation)


def _ll_input(lm: Any, instance: Any) -> tuple[int, ...]:
    """The tokens a log-likelihood request feeds the model: (context + continuation)[:-1],
    left-truncated to the model's length (what HFLM runs)."""
    ctx, cont = _ll_encode(lm, *instance.args)
    return tuple((ctx + cont)[-(lm.max_length + 1):][:-1])


def _serve_loglikelihood(member: Member, instances: list[Any], groups: list[int]) -> Served:
    if sum(groups) != len(instances):
        raise ValueError(f"groups cover {sum(groups)} requests, not {len(instances)}")
    results = member.lm.loglikelihood(instances, disable_tqdm=True)
    flops, start = [], 0
    for size in groups:
        seen: set[tuple[int, ...]] = set()
        for inst in instances[start:start + size]:
            tokens = _ll_input(member.lm, inst)
            flops.append(0 if tokens in seen else member.cost.forward_flops(len(tokens)))
            seen.add(tokens)
        start += size
    return Served(list(results), flops, [float(r[0]) for r in results])


def _serve_rolling(member: Member, instances: list[Any]) -> Served:
    from lm_eval import utils

    lm = member.lm
    results = lm.loglikelihood_rolling(instances, disable_tqdm=True)
    flops, confidence = [], []
    for inst, logprob in zip(instances, results):
        tokens = lm.tok_encode(inst.args[0])
        windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(
            token_list=tokens, prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1))
        flops.append(sum(member.cost.forward_flops(min(len(c) + len(t) - 1, lm.max_length)) for c, t in windows))
        confidence.append(float(logprob) / len(tokens) if tokens else 0.0)
    return Served(list(results), flops, confidence)


def _serve_generate(member: Member, instances: list[Any]) -> Served:
    from lm_eval.models.utils import normalize_gen_kwargs

    lm = member.lm
    with GenerationWatch(lm.model) as watch:
        texts = lm.generate_until(instances, disable_tqdm=True)
    flops, confidence = [], []
    for inst, text in zip(instances, texts):
        context, gen_kwargs = inst.args
        max_gen = normalize_gen_kwargs(gen_kwargs, lm.max_gen_toks)["max_gen_toks"]
        prompt = member.prompt_ids(context, max_gen)
        row = watch.take(prompt, text, lm)
        if row is None:  # not seen in generation (should not happen): count from the text
            logger.warning("policy: no generation record for a prompt of %d tokens; FLOPs counted "
                           "from the returned text, confidence -inf", len(prompt))
            n_new = min(max_gen, len(lm.tok_encode(text, add_special_tokens=False)) + 1)
            flops.append(member.cost.generate_flops(len(prompt), n_new))
            confidence.append(-math.inf)
            continue
        flops.append(member.cost.generate_flops(len(prompt), row.new_tokens))
        confidence.append(row.mean_logprob)
    return Served(list(texts), flops, confidence)
