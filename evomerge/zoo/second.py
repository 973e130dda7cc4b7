"""The second zoo: tiny Qwen2 models with a byte-level BPE tokenizer, on skills other than the demo's.

It differs from the demo zoo (`evomerge.zoo.demo`) where a learned router could lean on the demo's
particulars: the architecture (``Qwen2ForCausalLM``: q/k/v biases, grouped-query attention,
untied embeddings), the tokenizer (a byte-level BPE trained here on the zoo's own training
text, so numbers and keywords are multi-character tokens), and the tasks:

- ``second_max`` (generate_until, exact match): the largest of 3-5 numbers, ``max 31 7 58=`` -> ``58``;
- ``second_succ`` (generate_until, exact match): each letter's successor, ``succ kqz=`` -> ``lra``;
- ``second_even`` (multiple_choice, acc): which of four numbers is even, ``even 13 27 44 91?``,
  scored by the log-likelihood of each choice (`` 44``);
- ``second_mix`` (generate_until, exact match): documents of ``max`` and ``succ`` in one task, so
  that a task-level choice of member answers only part of it and per-prompt routing is needed.

The base is pre-trained on related skills (copy, first number, short maxima, short successors,
two-choice parity) that also show each skill's prompt format at a low rate, then one expert per
skill is fine-tuned from it, with the demo's trainer (`evomerge.zoo.demo.train_sources`).
Every task has held-out ``test`` documents and a ``train`` split for router training; no
training batch holds a prompt of either. ``build_second_zoo`` writes the models, the lm-eval
tasks (``tasks/``) and ``zoo.json`` (what the build measured) into one folder, and reuses a
folder that holds a finished build.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch

from evomerge.zoo.demo import (
    FULL_RECIPE,
    GENERATE_TASK_YAML,
    QUICK_RECIPE,
    TASK_YAML_HEAD,
    Recipe,
    _on_word,
    _shifted,
    distinct_examples,
    encoder,
    greedy_exact_match,
    reuse_or_build,
    source_scores,
    train_path,
    train_sources,
    write_zoo_json,
)

logger = logging.getLogger(__name__)

__all__ = ["SKILLS", "TASKS", "SECOND_RECIPE", "QUICK_SECOND_RECIPE", "build_second_zoo", "make_tokenizer",
           "make_config", "task_documents", "write_second_tasks", "choice_accuracy"]

#: One expert each; `even` is scored as multiple choice.
SKILLS = ("max", "succ", "even")
#: The skills whose documents make up the mixed task `second_mix`.
MIXED = ("max", "succ")
#: lm-eval task name -> the skills its documents come from.
TASKS = {**{f"second_{s}": (s,) for s in SKILLS}, "second_mix": MIXED}
MULTIPLE_CHOICE = frozenset({"second_even"})
EVAL_SEED, TRAIN_SEED = 2468, 1357
EVAL_SIZE = TRAIN_SIZE = 200
MAX_GEN_TOKS = 8
MAX_POSITIONS = 64
VOCAB_SIZE = 512  # at most: the BPE stops when no pair of its training text is left to merge
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")
TOKENIZER_CORPUS = 4000  # training texts the BPE is fitted on

# --------------------------------------------------------------------------- skills


def _numbers(rng: random.Random, lo: int, hi: int) -> list[int]:
    return rng.sample(range(100), rng.randint(lo, hi))


def _listing(op: str, answer: Callable[[list[int]], int], lo: int, hi: int
             ) -> Callable[[random.Random], tuple[str, str]]:
    """A generator of ``op N N N=`` prompts over lo..hi distinct numbers below 100."""
    def generate(rng: random.Random) -> tuple[str, str]:
        numbers = _numbers(rng, lo, hi)
        return f"{op} {' '.join(map(str, numbers))}=", str(answer(numbers))
    return generate


def _even(count: int) -> Callable[[random.Random], tuple[str, str]]:
    """``even N N N N?`` with one even number among ``count``; the answer is it, after lm-eval's
    multiple-choice delimiter (a space)."""
    def generate(rng: random.Random) -> tuple[str, str]:
        numbers = [rng.randrange(0, 100, 2), *rng.sample(range(1, 100, 2), count - 1)]
        rng.shuffle(numbers)
        return f"even {' '.join(map(str, numbers))}?", f" {next(n for n in numbers if n % 2 == 0)}"
    return generate


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "max": _listing("max", max, 3, 5),
    "succ": _on_word("succ", _shifted, 3, 6),
    "even": _even(4),
    # related skills that only the base model sees
    "copy": _on_word("cp", str, 2, 6),
    "first": _listing("first", lambda numbers: numbers[0], 2, 5),
    "max_short": _listing("max", max, 2, 2),
    "succ_short": _on_word("succ", _shifted, 1, 2),
    "even_short": _even(2),
}

SECOND_RECIPE = replace(
    FULL_RECIPE,
    base_mix={"copy": 1.0, "first": 1.0, "max_short": 1.5, "succ_short": 1.0, "even_short": 1.0,
              "max": 0.1, "succ": 0.05, "even": 0.1},
    replay_mix={"max": 1.0, "succ": 1.0, "even": 1.0, "copy": 0.3, "first": 0.3, "max_short": 0.3,
                "succ_short": 0.3, "even_short": 0.3},
    router_steps=0,  # no hand-made router models: routers are the run's business (policy.kind classifier)
    score_limit=100,
)
QUICK_SECOND_RECIPE = replace(QUICK_RECIPE, base_mix=SECOND_RECIPE.base_mix, replay_mix=SECOND_RECIPE.replay_mix,
                              router_steps=0, score_limit=20)

# --------------------------------------------------------------------------- documents


def _mixed(rng: random.Random) -> tuple[str, str]:
    return GENERATORS[rng.choice(MIXED)](rng)


def _generator(task: str) -> Callable[[random.Random], tuple[str, str]]:
    skills = TASKS[task]
    return GENERATORS[skills[0]] if len(skills) == 1 else _mixed


def _document(task: str, example: dict) -> dict:
    """A task's document: ``{prompt, answer}``; for multiple choice also ``choices`` (the numbers of
    the prompt) and ``label`` (the index of the answer)."""
    if task not in MULTIPLE_CHOICE:
        return example
    choices = example["prompt"].rstrip("?").split()[1:]
    return {**example, "answer": example["answer"].strip(), "choices": choices,
            "label": choices.index(example["answer"].strip())}


@functools.cache
def _documents(n: int = EVAL_SIZE) -> dict[tuple[str, str], list[dict]]:
    """Every task's `n` `test` documents, then every task's `train` documents, each drawn from its own
    seeded generator; no prompt is in two of these lists."""
    used: set[str] = set()
    out: dict[tuple[str, str], list[dict]] = {}
    for split, size, seed in (("test", n, EVAL_SEED), ("train", TRAIN_SIZE, TRAIN_SEED)):
        for task in TASKS:
            examples = distinct_examples(_generator(task), size, random.Random(f"second-{split}-{task}-{seed}"),
                                         "prompt", frozenset(used))
            used.update(ex["prompt"] for ex in examples)
            out[task, split] = [_document(task, ex) for ex in examples]
    return out


def task_documents(task: str, split: str = "test", n: int = EVAL_SIZE) -> list[dict]:
    """The documents of a second-zoo task: `test` (held out, scored for fitness; `n` of them) or `train`
    (router training). With the default `n`, no training batch of the zoo's models holds one of their
    prompts; a larger `n` (benchmarks at more documents per task) draws test documents the training
    batches were not kept from, and its train documents differ."""
    if (task, split) not in _documents(n):
        raise ValueError(f"task/split: unknown {task!r}/{split!r}, expected one of {sorted(TASKS)} and "
                         f"test or train")
    return [dict(doc) for doc in _documents(n)[task, split]]


def excluded_prompts() -> frozenset[str]:
    """The prompts no training batch holds: every task's test and train documents."""
    return frozenset(doc["prompt"] for docs in _documents().values() for doc in docs)


_CHOICE_TASK_YAML = TASK_YAML_HEAD + """\
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_second_tasks(task_dir: str | os.PathLike, n: int = EVAL_SIZE) -> dict[str, Path]:
    """Write the lm-eval tasks of the second zoo into ``task_dir``: ``<task>.yaml``, its ``n`` test
    documents ``<task>.jsonl`` and train documents ``<task>_train.jsonl``. Returns ``{task: yaml_path}``.
    ``n`` above EVAL_SIZE is for benchmarks at more documents per task (see task_documents)."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for task, skills in TASKS.items():
        test = task_dir / f"{task}.jsonl"
        for split, path in (("test", test), ("train", train_path(test))):
            lines = [json.dumps(doc, sort_keys=True) for doc in task_documents(task, split, n)]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        template = _CHOICE_TASK_YAML if task in MULTIPLE_CHOICE else GENERATE_TASK_YAML
        header = (f"The second zoo's task {task}: documents of skill(s) {', '.join(skills)}, written by "
                  f"evomerge.zoo.second (never trained on).")
        out[task] = task_dir / f"{task}.yaml"
        out[task].write_text(template.format(task=task, header=header, data_file=test.name,
                                             train_file=train_path(test).name, max_gen_toks=MAX_GEN_TOKS),
                             encoding="utf-8")
    return out


# --------------------------------------------------------------------------- tokenizer & model


def make_tokenizer():
    """Qwen2's tokenizer pipeline (its pre-tokenizing regex: digits one by one, words with their
    leading space; byte-level; NFC) with a BPE of up to ``VOCAB_SIZE`` tokens fitted on the zoo's training
    text (the base mix's generators, none of the tasks' documents); deterministic. A
    ``Qwen2Tokenizer``, which ``AutoTokenizer`` loads back unchanged for a Qwen2 model (it rebuilds
    the pipeline from the vocabulary and merges). No special token is added when encoding."""
    from tokenizers import trainers
    from transformers import Qwen2Tokenizer

    rng = random.Random("second-tokenizer")
    names = sorted(SECOND_RECIPE.base_mix)
    excluded = excluded_prompts()
    corpus = []
    while len(corpus) < TOKENIZER_CORPUS:
        prompt, answer = GENERATORS[rng.choice(names)](rng)
        if prompt not in excluded:
            corpus.append(prompt + answer + "\n")
    backend = Qwen2Tokenizer().backend_tokenizer  # the pipeline, with an empty BPE
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers_alphabet()))
    model = json.loads(backend.to_str())["model"]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(pair) for pair in model["merges"]],
                          unk_token=None, eos_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[0],
                          pad_token=SPECIAL_TOKENS[1], clean_up_tokenization_spaces=False,
                          model_max_length=MAX_POSITIONS)


def pre_tokenizers_alphabet() -> list[str]:
    """The 256 byte-level symbols: every byte is a token, so no text is ever unknown."""
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def make_config(recipe: Recipe, tok):
    """The Qwen2 config of the zoo's models: q/k/v biases, two key/value heads, untied embeddings."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=max(1, recipe.num_heads // 2),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def choice_accuracy(model, tok, docs: list[dict]) -> float:
    """lm-eval's multiple-choice `acc`: the choice (after a space) with the highest summed
    log-likelihood given the prompt, against the label."""
    model.eval()
    encode = encoder(tok)
    correct = 0
    for doc in docs:
        context = encode(doc["prompt"])
        rows = [encode(doc["prompt"] + " " + choice)[len(context):] for choice in doc["choices"]]
        width = len(context) + max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(context) + len(row)] = torch.tensor(context + row)
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        totals = [sum(float(logp[i, len(context) + j - 1, t]) for j, t in enumerate(row)) for i, row in enumerate(rows)]
        correct += max(range(len(rows)), key=totals.__getitem__) == doc["label"]
    return correct / max(1, len(docs))


def task_scores(model, tok, limit: int) -> dict[str, float]:
    """Each task's metric on its first `limit` test documents (what lm-eval computes), and their mean."""
    per = {}
    for task in TASKS:
        docs = task_documents(task)[:limit]
        per[task] = choice_accuracy(model, tok, docs) if task in MULTIPLE_CHOICE else greedy_exact_match(
            model, tok, docs, MAX_GEN_TOKS)
    per["mean"] = sum(per.values()) / len(per)
    return {k: round(v, 4) for k, v in per.items()}


# --------------------------------------------------------------------------- build


def build_second_zoo(out_dir: str | os.PathLike, *, quick: bool = False, seed: int = 0,
                     force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the second zoo under ``out_dir``: ``base/`` and one expert folder per skill
    (Hugging Face folders with the tokenizer), ``tasks/`` (the lm-eval tasks and their documents) and
    ``zoo.json`` (recipe, timings, relative task-vector norms, the scores of the base, the experts,
    their uniform average and their task arithmetic at 1.0). A folder whose zoo.json is there is
    returned as it is unless ``force``. One torch thread (fastest on a shared machine)."""
    out = Path(out_dir)
    return reuse_or_build(out, {"base": out / "base", **{s: out / s for s in SKILLS}}, "second zoo",
                          lambda: _build(out, QUICK_SECOND_RECIPE if quick else SECOND_RECIPE, seed), force)


def _build(out: Path, recipe: Recipe, seed: int) -> None:
    from transformers import Qwen2ForCausalLM

    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    write_second_tasks(out / "tasks")
    tok = make_tokenizer()
    base, experts, training = train_sources(out, recipe, seed, tok, lambda: Qwen2ForCausalLM(make_config(recipe, tok)),
                                            SKILLS, GENERATORS, excluded_prompts())
    timings = {"train_and_save_s": round(time.perf_counter() - t_start, 2)}
    t0 = time.perf_counter()
    scores, norms = source_scores(lambda model: task_scores(model, tok, recipe.score_limit), base, experts)
    timings["score_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    meta = {
        "zoo": "second",
        "seed": seed,
        "quick": recipe == QUICK_SECOND_RECIPE,
        "recipe": asdict(recipe),
        "architecture": "Qwen2ForCausalLM",
        "parameters": sum(p.numel() for p in base.parameters()),
        "vocab_size": len(tok),
        "skills": list(SKILLS),
        "tasks": {task: list(skills) for task, skills in TASKS.items()},
        "eval_seed": EVAL_SEED,
        "training": training,
        "relative_task_vector_norm": norms,
        "scores": scores,
        "scores_note": f"each task's metric (exact match; acc for {', '.join(sorted(MULTIPLE_CHOICE))}) on its "
                       f"first {recipe.score_limit} test documents, computed as lm-eval does",
        "timings": timings,
    }
    write_zoo_json(out, meta)
    logger.info("second zoo: built %s in %.1f s; scores %s", out, timings["total_s"], scores)
