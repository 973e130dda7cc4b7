"""Prefix router (SmallTalk LM, arXiv 2410.03529): each member (or a small router model per
member, ``scorers``) scores the first ``k`` tokens of the prompt; the lowest mean negative
log-likelihood wins, ties to the lowest member index.

Scoring: the first ``k_eff = min(k, prompt tokens)`` tokens of the prompt, encoded by the
scorer's tokenizer without special tokens and conditioned on its prefix token (BOS/EOS, as
lm-eval does for an empty context): one forward over ``k_eff`` tokens with logits
everywhere, ``scorer.cost.forward_flops(k_eff)``, for every scorer, once per unit (the
choices of one question are routed together).  One batched call per scorer.

Router models (``scorers``: hand-made, or with ``policy.scorers: learned`` the router LMs the run
trains, ``evomerge/router_lms.py``) never change during a run, so each keeps its NLL of every distinct
prefix it has scored (``Member.kept_nll``): a worker scores the same prompts for every candidate. Their
FLOPs are still charged to every request, as a server scoring it afresh would spend them. A member
scoring itself is scored afresh every call (the merged model changes with every candidate).

``k = 0`` routes nothing: the first member serves every request and no scoring is done or
counted (the cheap end of a search over ``k``).

Note the prompt is lm-eval's full context: with few-shot examples the first ``k`` tokens
are the shared preamble, and every request goes to the same member.
"""

from __future__ import annotations

from typing import Any, Sequence

from evomerge.policies.base import PolicyLM, Unit
from evomerge.policies.members import Member

__all__ = ["PrefixRouter"]

KEPT_MAX = 1 << 16  # distinct prefixes a router model keeps scores of; past that it starts again


class PrefixRouter(PolicyLM):
    kind = "prefix_router"
    aliases = ("router",)  # its name in journals and policy files before 2026-12
    params = ("k",)
    takes_scorers = True

    @classmethod
    def genes(cls, config: Any) -> list[tuple[str, float, float]]:
        """The prefix length k, unless the config fixes it."""
        return [] if config.k is not None else [("k", *config.bound("k"))]

    @classmethod
    def decode(cls, config: Any, values: list[float]) -> dict[str, Any]:
        low, high = config.bound("k")
        return {"k": config.k if config.k is not None else int(round(low + values[0] * (high - low)))}

    @classmethod
    def build(cls, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
              scorers: Sequence[Member] | None = None, router: Any = None) -> PrefixRouter:
        if "k" not in params:
            raise ValueError(f"policy {cls.kind}: parameter k is required")
        return cls(members, params["k"], scorers)

    def __init__(self, members: Sequence[Member], k: int, scorers: Sequence[Member] | None = None):
        super().__init__(members)
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise ValueError(f"{self.kind}: k must be a non-negative integer, got {k!r}")
        self.k = int(k)
        self.keeps = scorers is not None  # router models: fixed weights, their scores can be kept
        self.scorers = list(scorers) if scorers is not None else list(self.members)
        if len(self.scorers) != len(self.members):
            raise ValueError(f"{self.kind}: {len(self.scorers)} scorers for {len(self.members)} members")

    def scores(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        """Mean NLL of each text's first k tokens under each scorer (``[scorer][text]``), and the
        scoring FLOPs of each text (all scorers)."""
        nll = [[0.0] * len(texts) for _ in self.scorers]
        flops = [0] * len(texts)
        for s, scorer in enumerate(self.scorers):
            lm = scorer.lm
            prefixes = [tuple(lm.tok_encode(text, add_special_tokens=False)[:self.k]) for text in texts]
            kept = scorer.kept_nll if self.keeps else {}
            if len(kept) + len(prefixes) > KEPT_MAX:  # before the lookup: every prefix below is then kept
                kept.clear()
            todo = list(dict.fromkeys(ids for ids in prefixes if ids and ids not in kept))
            answers = lm._loglikelihood_tokens([(None, [lm.prefix_token_id], list(ids)) for ids in todo],
                                               disable_tqdm=True) if todo else []
            kept.update({ids: -float(logprob) / len(ids) for ids, (logprob, _) in zip(todo, answers)})
            for t, ids in enumerate(prefixes):
                if ids:
                    nll[s][t] = kept[ids]
                    flops[t] += scorer.cost.forward_flops(len(ids))
        return nll, flops

    def route(self, units: list[Unit], request_type: str) -> tuple[list[int], list[int]]:
        if self.k == 0:
            return [0] * len(units), [0] * len(units)
        nll, flops = self.scores([unit.text for unit in units])
        choice = [min(range(len(self.scorers)), key=lambda s: (nll[s][u], s)) for u in range(len(units))]
        return choice, flops
