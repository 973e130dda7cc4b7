"""The demo zoo (quick mode): loadable HF folders, a round-tripping char tokenizer,
bitwise determinism, held-out eval data and real lm-eval scoring of the demo tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.zoo import demo as Z

REPO = Path(__file__).resolve().parents[1]
DEMO_TASKS = REPO / "evals" / "demo"
TASKS = [f"demo_{skill}" for skill in Z.SKILLS]


@pytest.fixture(scope="module")
def zoo_again(tmp_path_factory) -> dict[str, Path]:
    """A second quick build with the same seed, for the determinism check."""
    return Z.build_zoo(tmp_path_factory.mktemp("zoo_again"), quick=True)


def test_build_returns_base_and_one_folder_per_skill(zoo) -> None:
    assert set(zoo) == {"base", *Z.SKILLS}
    for path in zoo.values():
        assert (path / "model.safetensors").is_file()
        assert (path / "config.json").is_file()
        assert (path / "tokenizer.json").is_file()
    meta = json.loads((zoo["base"].parent / "zoo.json").read_text())
    assert meta["seed"] == 0 and meta["quick"] is True
    routers = {"mix", *Z.SKILLS}
    assert set(meta["training"]) == {"base", *Z.SKILLS, *(f"router-{r}" for r in routers)}
    assert set(meta["routers"]) == routers
    for name in routers:  # router models for prefix_router scorers: one-layer Llamas, same tokenizer
        folder = zoo["base"].parent / "routers" / name
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 1
    assert set(meta["scores"]) >= {"base", *Z.SKILLS, "uniform_average", "task_arithmetic_1.0"}
    for scores in meta["scores"].values():
        assert all(0.0 <= scores[k] <= 1.0 for k in (*Z.SKILLS, "mean"))
    assert all(v > 0 for v in meta["relative_task_vector_norm"].values())


def test_folders_load_with_auto_classes(zoo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path in zoo.values():
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        cfg = model.config
        assert cfg.model_type == "llama" and cfg.tie_word_embeddings is False
        assert cfg.vocab_size == len(tok) == len(Z.SPECIAL_TOKENS) + len(Z.CHARS)
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (Z.PAD_ID, Z.BOS_ID, Z.EOS_ID)
        assert model.generation_config.eos_token_id == Z.EOS_ID
        assert model.generation_config.pad_token_id == Z.PAD_ID
        with torch.no_grad():
            out = model.generate(**tok(["12+34="], return_tensors="pt"), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 9) or out.shape[1] <= 9


def test_tokenizer_round_trips_every_character(zoo) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo["base"])
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    rng = random.Random(0)
    samples = [Z.CHARS, "12+35=47\n", "rev abc=cba\n", "sort  x y =\n"]
    samples += ["".join(rng.choice(Z.CHARS) for _ in range(rng.randint(1, 30))) for _ in range(50)]
    for text in samples:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text)  # one token a character, no BOS/EOS added
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("A")["input_ids"]) == ["<unk>"]


def test_same_seed_gives_identical_weights(zoo, zoo_again) -> None:
    for name, path in zoo.items():
        a = load_file(path / "model.safetensors")
        b = load_file(zoo_again[name] / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs between two builds"
    # the experts really moved away from the base
    base = load_file(zoo["base"] / "model.safetensors")
    for skill in Z.SKILLS:
        expert = load_file(zoo[skill] / "model.safetensors")
        assert any(not torch.equal(base[k], expert[k]) for k in base)


def test_committed_eval_data_and_tasks_are_what_the_generator_writes(tmp_path) -> None:
    written = Z.write_demo_tasks(tmp_path)
    for skill, yaml_path in written.items():
        for name in (yaml_path.name, f"demo_{skill}.jsonl"):
            assert (DEMO_TASKS / name).read_text() == (tmp_path / name).read_text(), name
        rows = [json.loads(line) for line in (DEMO_TASKS / f"demo_{skill}.jsonl").read_text().splitlines()]
        assert len(rows) == Z.EVAL_SIZE
        assert len({row["prompt"] for row in rows}) == Z.EVAL_SIZE
        assert all(set(row["prompt"] + row["answer"]) <= set(Z.CHARS) for row in rows)


def test_more_documents_per_task_start_with_the_committed_ones(tmp_path) -> None:
    Z.write_demo_tasks(tmp_path, n=Z.EVAL_SIZE + 50)  # what a benchmark at a larger eval.limit writes
    for skill in Z.SKILLS:
        rows = (tmp_path / f"demo_{skill}.jsonl").read_text().splitlines()
        committed = (DEMO_TASKS / f"demo_{skill}.jsonl").read_text().splitlines()
        assert len(rows) == len(set(rows)) == Z.EVAL_SIZE + 50 and rows[:Z.EVAL_SIZE] == committed
        assert (tmp_path / f"demo_{skill}.yaml").read_text() == (DEMO_TASKS / f"demo_{skill}.yaml").read_text()


def test_eval_prompts_never_appear_in_training_batches() -> None:
    excluded = Z.training_excluded_prompts()
    assert len(excluded) == Z.EVAL_SIZE * len(Z.SKILLS)
    tok = Z.make_tokenizer()
    inv = {i: c for c, i in tok.get_vocab().items()}
    for skill in Z.SKILLS:
        sampler = Z._Sampler({skill: 1.0}, tok, random.Random(skill), excluded)
        seen = set()
        for _ in range(40):
            ids, labels = sampler.batch(64)
            for row, lab in zip(ids.tolist(), labels.tolist()):
                prompt = "".join(inv[t] for t, y in zip(row, lab) if y == -100 and t != Z.PAD_ID)
                seen.add(prompt)
        assert not seen & excluded
        # the training distribution does cover the evaluation prompts' format
        assert all(p.endswith("=") for p in seen)


def _hflm(path: Path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(path), batch_size=64)


def test_lm_eval_scores_each_demo_task(zoo, tmp_path) -> None:
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    # absolute data_files: plain lm-eval from any working directory
    Z.write_demo_tasks(tmp_path / "tasks", absolute=True)
    task_dict = get_task_dict(TASKS, TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    lm = _hflm(zoo["base"])
    limit = 20
    first = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    for task in TASKS:
        assert 0.0 <= first["results"][task]["exact_match,none"] <= 1.0

    # the same task dict and HFLM after the weights changed in place: fresh results
    expert = Z.SKILLS[1]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expert_model = AutoModelForCausalLM.from_pretrained(zoo[expert])
    with torch.no_grad():
        for p, q in zip(lm.model.parameters(), expert_model.parameters()):
            p.copy_(q)
    second = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    fresh = evaluate(lm=_hflm(zoo[expert]), task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    tok = AutoTokenizer.from_pretrained(zoo[expert])
    for task, skill in zip(TASKS, Z.SKILLS):
        assert second["results"][task]["exact_match,none"] == fresh["results"][task]["exact_match,none"]
        # zoo.greedy_exact_match (the scorer behind zoo.json) agrees with lm-eval
        mine = Z.greedy_exact_match(expert_model, tok, Z.eval_examples(skill)[:limit])
        assert abs(mine - fresh["results"][task]["exact_match,none"]) <= 0.1
