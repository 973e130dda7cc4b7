"""GenerationWatch: while active, `model.generate` also records per row how many tokens it
generated and their log-probabilities, without changing what is generated (FLOPs of a generation
request and the confidence `Cascade` compares, at no extra forward pass)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

__all__ = ["GeneratedRow", "GenerationWatch"]


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
