"""Policies: inference-time combinations of member models, each an lm-eval ``LM``.

A *member* is a model that can serve a request (a source model or the candidate's merged
model): an lm-eval ``HFLM`` plus its ``CostModel``.  A ``PolicyLM`` receives lm-eval's
requests, decides which member(s) serve each one, and records who served it and what it
cost (``PolicyStats``).

Dispatch stays batched: the policy decides the member of every request first, then calls
each member's HFLM once with its share and puts the results back in the original order.

Units.  Requests that must be decided together form a *unit*: the log-likelihood requests
of one document (same ``task_name`` and ``doc_id``: the choices of a multiple-choice
question) always go to the same member, since comparing log-probabilities of choices from
different models is meaningless.  Every ``generate_until`` and ``loglikelihood_rolling``
request is a unit of its own.

FLOPs (``evomerge.flops.CostModel``, token counts from the member's own tokenizer, exactly
as HFLM encodes and truncates):

* ``generate_until``: prefill of the prompt + the generated tokens, the stop token that
  ended the answer included (``CostModel.generate_flops``).  The generated tokens are
  counted during generation (a stopping criterion watches each row) rather than guessed
  from the returned text, whose stop string HFLM strips.  Tokens a finished row keeps
  producing while the rest of its batch runs on are batching waste, not counted (as
  padding is not).
* ``loglikelihood``: one forward over ``(context + continuation)[:-1]`` (left-truncated to
  the model's length) with logits everywhere; requests of one unit that feed the model the
  same tokens (single-token choices of one question) share one forward, as HFLM computes
  them (and as any server would).
* ``loglikelihood_rolling``: one forward per rolling window, as HFLM builds them.

The same generation watch yields the mean log-probability of the generated tokens (stop
token included) under the serving model: the confidence ``Cascade`` compares with its
thresholds, at no extra forward pass.
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from lm_eval.api.model import LM
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from evomerge.flops import CostModel

logger = logging.getLogger(__name__)

__all__ = ["Member", "PolicyStats", "PolicyLM", "Unit", "Served", "GenerationWatch", "make_units", "serve",
           "serve_units", "unit_key"]

REQUEST_TYPES = ("loglikelihood", "generate_until", "loglikelihood_rolling")


@dataclass
class Member:
    """One model a policy can send requests to."""

    name: str
    lm: Any  # lm_eval.models.huggingface.HFLM (any TemplateLM over a causal HF model)
    cost: CostModel
    # (context, max new tokens) -> the prompt's token ids as HFLM encodes and truncates them, kept
    # as tuples: HFLM's own kept encodings (`worker_hflm`) are handed out as tensor copies,
    # which cost a candidate 1% more when read through them (300 prompts on the demo)
    prompts: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict, repr=False)

    def prompt_ids(self, context: str, max_gen: int) -> tuple[int, ...]:
        key = (context, max_gen)
        ids = self.prompts.get(key)
        if ids is None:
            lm = self.lm
            encoded, _ = lm.tok_batch_encode([context], left_truncate_len=lm.max_length - max_gen,
                                             truncation=getattr(lm, "truncation", False))
            ids = self.prompts[key] = tuple(encoded[0].tolist())
        return ids

    @classmethod
    def from_model(cls, name: str, model: Any, tokenizer: Any, batch_size: int | str = 16) -> Member:
        """Wrap an instantiated causal LM (any device) in HFLM; the cost model comes from its modules.

        The HFLM holds the model object itself, so a model whose weights are overwritten in
        place (the worker's merged model) serves every candidate through the same member."""
        return cls(name, worker_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                   CostModel.from_model(model))

    @classmethod
    def from_folder(cls, folder: Any, name: str | None = None, device: str = "cpu",
                    batch_size: int | str = 16) -> Member:
        """Load a Hugging Face model folder (weights + tokenizer) as a member."""
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        return cls.from_model(name or folder.name, model, tokenizer, batch_size)


ENCODED_MAX = 1 << 16  # distinct strings an HFLM keeps encoded; past that it starts again


@functools.cache  # one class, made on first use (lm-eval is imported then)
def worker_hflm() -> type:
    """lm-eval's HFLM for a worker that asks the same prompts of candidate after candidate.

    Answers are HFLM's own; what repeats is done once per worker:
    - each distinct string is encoded once: HFLM encodes every prompt again per call (to sort
      requests, then to build each batch), on the demo a twentieth of a candidate's time. The
      tokenizer and HFLM's settings never change for the life of a member, so the encodings
      are kept, by the call's arguments, and copies handed out (a caller may change them);
    - generation stops by lm-eval's stop-string rule through `policies.stopping.StopStrings`,
      which decides what lm-eval's criteria decide at every step but decodes each distinct
      window of tokens once, and only for rows still running (lm-eval decodes every row at
      every step: a tenth of a candidate's time on the demo)."""
    from lm_eval.models.huggingface import HFLM

    from evomerge.policies.stopping import StopStrings

    class WorkerHFLM(HFLM):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._encoded: dict[tuple, tuple[int, ...]] = {}
            self._batches: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
            self._decoded: dict[tuple[int, ...], str] = {}

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs: Any) -> list[int]:
            key = (string, add_special_tokens, left_truncate_len, *sorted(kwargs.items()))
            ids = self._encoded.get(key)
            if ids is None:
                if len(self._encoded) >= ENCODED_MAX:
                    self._encoded.clear()
                ids = self._encoded[key] = tuple(super().tok_encode(string, add_special_tokens, left_truncate_len,
                                                                    **kwargs))
            return list(ids)

        def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                             truncation: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
            key = (tuple(strings), padding_side, left_truncate_len, truncation)
            batch = self._batches.get(key)
            if batch is None:
                if len(self._batches) >= ENCODED_MAX:
                    self._batches.clear()
                batch = self._batches[key] = super().tok_batch_encode(strings, padding_side, left_truncate_len,
                                                                      truncation)
            return batch[0].clone(), batch[1].clone()

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                            **generation_kwargs: Any) -> torch.Tensor:
            """HFLM's generation call (greedy unless sampling is asked for, a temperature of 0
            meaning greedy; the model's mixed-precision setting), with `StopStrings`."""
            kwargs = dict(generation_kwargs)
            temperature = kwargs.setdefault("temperature", 0.0)
            if temperature == 0.0 and kwargs.get("do_sample") is None:
                kwargs["do_sample"] = False
            if temperature == 0.0 and kwargs.get("do_sample") is False:
                del kwargs["temperature"]  # greedy needs none (and transformers warns about one)
            stopping = StopStrings(self.tokenizer, list(stop), context.shape[1], context.shape[0], self._decoded)
            precision = getattr(self, "mixed_precision_dtype", None)
            with torch.autocast(device_type=self.device.type, dtype=precision, enabled=precision is not None):
                return self.model.generate(input_ids=context, max_length=max_length,
                                           stopping_criteria=StoppingCriteriaList([stopping]),
                                           pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **kwargs)

    return WorkerHFLM


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
class Unit:
    """Requests decided together: indices into the request list, in order."""

    indices: list[int]
    text: str  # the first request's context (the string for loglikelihood_rolling)
    task_name: str | None
    occurrence: int  # how many earlier units of the same call had the same (task_name, text)


@dataclass
class Served:
    """One member's answers to a list of requests, with per-request FLOPs and confidence."""

    results: list[Any]
    flops: list[int]
    confidence: list[float]  # generation: mean token log-prob; log-likelihood: the log-prob


def unit_key(unit: Unit) -> int:
    """Stable 32-bit hash of a unit's task and text (zlib.crc32: same on every run and machine)."""
    return zlib.crc32(f"{unit.task_name or ''}\x00{unit.text}".encode("utf-8"))


def make_units(requests: Sequence[Any], request_type: str) -> list[Unit]:
    """The units of a request list (see the module docstring)."""
    groups: dict[Any, list[int]] = {}
    for i, inst in enumerate(requests):
        task, doc = getattr(inst, "task_name", None), getattr(inst, "doc_id", None)
        if request_type == "loglikelihood" and task is not None and doc is not None:
            groups.setdefault(("doc", task, doc), []).append(i)
        else:
            groups[("one", i)] = [i]
    units, seen = [], defaultdict(int)
    for indices in groups.values():  # in order of each unit's first request
        first = requests[indices[0]]
        text, task = first.args[0], getattr(first, "task_name", None)
        units.append(Unit(indices, text, task, seen[(task, text)]))
        seen[(task, text)] += 1
    return units


class PolicyLM(LM):
    """Base of the policies: an lm-eval ``LM`` over members.

    Subclasses implement ``route(units, request_type) -> (member per unit, routing FLOPs
    per unit)``; ``Cascade`` overrides ``dispatch`` instead.
    """

    # A policy class owns its facts: the `kind` name configs, journals and policy files use (and
    # older `aliases`), the parameters it is built from, whether it takes router models (`scorers`),
    # its genes and how they decode into parameters (evomerge/genome.py lays them out).
    kind: ClassVar[str] = "policy"
    aliases: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[str, ...]] = ()
    takes_scorers: ClassVar[bool] = False

    @classmethod
    def genes(cls, config: Any) -> list[tuple[str, float, float]]:
        """(name, low, high) of each policy gene for a PolicyConfig, in genome order."""
        raise NotImplementedError

    @classmethod
    def decode(cls, config: Any, values: list[float]) -> dict[str, Any]:
        """The parameters of a candidate from its policy genes (each in [0, 1])."""
        raise NotImplementedError

    @classmethod
    def build(cls, members: Sequence[Member], params: dict[str, Any], seed: int = 0,
              scorers: Sequence[Member] | None = None) -> PolicyLM:
        """The policy from its parameters (a policy file's or a recipe's)."""
        raise NotImplementedError

    def __init__(self, members: Sequence[Member]):
        super().__init__()
        if not members:
            raise ValueError("a policy needs at least one member")
        self.members = list(members)
        self.stats = PolicyStats(len(self.members))

    # --- lm-eval's interface ----------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.dispatch(list(requests), "loglikelihood")

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self.dispatch(list(requests), "generate_until")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.dispatch(list(requests), "loglikelihood_rolling")

    @property
    def tokenizer_name(self) -> str:
        return "+".join(str(getattr(m.lm, "tokenizer_name", m.name)) for m in self.members)

    def get_model_info(self) -> dict[str, Any]:
        return {"policy": self.kind, "members": [m.name for m in self.members]}

    @property
    def device(self):
        return self.members[0].lm.device

    # --- routing ------------------------------------------------------------------------------

    def route(self, units: list[Unit], request_type: str) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def dispatch(self, requests: list[Any], request_type: str) -> list[Any]:
        if not requests:
            return []
        units = make_units(requests, request_type)
        choice, routing = self.route(units, request_type)
        if len(choice) != len(units) or any(not 0 <= c < len(self.members) for c in choice):
            raise RuntimeError(f"{self.kind}: route returned {choice!r} for {len(units)} units")
        results: list[Any] = [None] * len(requests)
        flops = [0] * len(requests)
        member_of = [0] * len(requests)
        for m, member in enumerate(self.members):
            mine = [u for u, c in zip(units, choice) if c == m]
            if not mine:
                continue
            served = serve_units(member, [requests[i] for u in mine for i in u.indices], mine, request_type)
            pos = 0
            for unit in mine:
                for i in unit.indices:
                    results[i], flops[i], member_of[i] = served.results[pos], served.flops[pos], m
                    pos += 1
            self._account_member(m, len(served.results), sum(served.flops), served=True)
        for unit, cost in zip(units, routing):
            flops[unit.indices[0]] += cost
            self.stats.routing_flops += cost
            self.stats.flops += cost
        self._account_requests(flops, member_of)
        return results

    # --- bookkeeping --------------------------------------------------------------------------

    def _account_member(self, m: int, count: int, flops: int, served: bool) -> None:
        self.stats.consulted[m] += count
        if served:
            self.stats.served[m] += count
        self.stats.member_flops[m] += flops
        self.stats.flops += flops

    def _account_requests(self, flops: list[int], member_of: list[int]) -> None:
        self.stats.requests += len(flops)
        self.stats.request_flops.extend(flops)
        self.stats.request_member.extend(member_of)


# --- serving: one batched call per member -----------------------------------------------------

def serve_units(member: Member, instances: list[Any], units: list[Unit], request_type: str) -> Served:
    """``serve`` over the concatenated requests of ``units`` (in unit order)."""
    return serve(member, instances, request_type, [len(unit.indices) for unit in units])


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


# --- generation watch -------------------------------------------------------------------------

@dataclass
class GeneratedRow:
    tokens: list[int]  # everything generate returned after the prompt (up to the batch's last step)
    new_tokens: int  # tokens this row really generated, the one that stopped it included
    logprobs: list[float]  # log-prob of each of those tokens under the decoding distribution

    @property
    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else -math.inf


class GenerationWatch:
    """While active, ``model.generate`` also records, per row, how many tokens it generated
    before a stopping criterion fired and the log-probability of each.

    A logits processor (last in the list, so it sees the distribution the token is drawn
    from: the model's own under greedy decoding) keeps the step's log-softmax; a stopping
    criterion wrapping the caller's criteria reads the token just appended, and notes the
    step at which each row is first done (a caller criterion or an EOS token).  Neither
    changes what is generated.  Memory: one step of log-probs, ``batch x vocab``.
    """

    def __init__(self, model: Any):
        self.model = model
        self.rows: dict[tuple[int, ...], list[GeneratedRow]] = defaultdict(list)

    def __enter__(self) -> GenerationWatch:
        if "generate" in vars(self.model):
            raise RuntimeError("model.generate is already wrapped (nested GenerationWatch?)")
        original = self.model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            return self._generate(original, *args, **kwargs)

        self.model.generate = generate
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.generate

    def _generate(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        step = _StepLogProbs()
        watch = _StopWatch(step, kwargs.get("stopping_criteria") or [],
                           _eos_ids(self.model, kwargs), input_ids.shape[0])
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), step])
        kwargs["stopping_criteria"] = StoppingCriteriaList([watch])
        out = original(*args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        width = input_ids.shape[1]
        mask = kwargs.get("attention_mask")
        prompts = input_ids.tolist()
        if mask is not None:
            prompts = [[t for t, keep in zip(row, kept) if keep] for row, kept in zip(prompts, mask.tolist())]
        logprobs = torch.stack(watch.logprobs, dim=1).tolist() if watch.logprobs else [[]] * len(sequences)
        for prompt, generated, done, row_logprobs in zip(prompts, sequences[:, width:].tolist(), watch.first_done,
                                                         logprobs):
            used = min(done + 1 if done >= 0 else len(row_logprobs), len(generated))
            self.rows[tuple(prompt)].append(GeneratedRow(generated, used, row_logprobs[:used]))
        return out

    def take(self, prompt: tuple[int, ...], text: str, lm: Any) -> GeneratedRow | None:
        """The record of a generation from ``prompt`` that returned ``text`` (removed)."""
        rows = self.rows.get(prompt)
        if not rows:
            return None
        if len(rows) == 1:
            return rows.pop()
        for i, row in enumerate(rows):  # identical prompts: the row whose text it is (sampling)
            if lm.tok_decode(row.tokens[:row.new_tokens]).startswith(text):
                return rows.pop(i)
        return rows.pop(0)


def _eos_ids(model: Any, kwargs: dict[str, Any]) -> list[int]:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    eos = kwargs.get("eos_token_id", getattr(config, "eos_token_id", None))
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class _StepLogProbs(LogitsProcessor):
    """Keeps the log-softmax of the scores the next token is drawn from; changes nothing."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _StopWatch(StoppingCriteria):
    """Wraps the caller's stopping criteria: records each appended token's log-prob and the
    first step at which each row is done; answers what the wrapped list would answer.

    A row is done when a wrapped criterion says so for that row, or when it emits an EOS
    token.  lm-eval's stop-string criterion answers for the whole batch (done when every row
    is) and keeps the per-row decision in ``done_tracker``; that list is read when present."""

    def __init__(self, step: _StepLogProbs, inner: Any, eos_ids: list[int], batch: int):
        self.step, self.inner, self.steps = step, list(inner), 0
        self.eos = frozenset(eos_ids)
        self.first_done = [-1] * batch  # per row: the step at which it was first done
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
        batch = input_ids.shape[0]
        if self.step.last is not None:
            self.logprobs.append(self.step.last.gather(1, input_ids[:, -1:]).squeeze(1))
        answer: Any = False  # what the wrapped criteria answer together
        rows = [token in self.eos for token in input_ids[:, -1].tolist()]
        for criterion in self.inner:
            said = criterion(input_ids, scores, **kwargs)
            answer = answer | said
            tracker = getattr(criterion, "done_tracker", None)
            if not (isinstance(tracker, list) and len(tracker) == batch):
                tracker = torch.as_tensor(said).cpu().bool().expand(batch).tolist()
            rows = [done or bool(t) for done, t in zip(rows, tracker)]
        for r, done in enumerate(rows):
            if done and self.first_done[r] < 0:
                self.first_done[r] = self.steps
        self.steps += 1
        return answer
