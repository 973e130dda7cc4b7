"""A member: one model a policy can send requests to, as lm-eval's HFLM plus its cost model.

`worker_hflm` is the HFLM subclass every member uses: lm-eval's answers, with what repeats from
candidate to candidate on a worker done once (see its docstring).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteriaList

from evomerge.flops import CostModel

__all__ = ["Member", "worker_hflm"]


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
    # a router model's mean NLL per scored prefix (token ids): a prefix router keeps them for router
    # models, whose weights never change (policies/router.py), never for members scoring themselves
    kept_nll: dict[tuple[int, ...], float] = field(default_factory=dict, repr=False)

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
