"""Bad inputs give one-line errors naming the field or tensor, exit code 2, before any evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evomerge.cli import main

from conftest import write_config

pytestmark = pytest.mark.slow


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_several_wrong_fields_at_once(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nmodels: {base: ./nowhere, experts: []}\nmerge: {method: avg}\n"
                    "eval: {tasks: [{name: t}]}\nsearch: {generations: 0}\n")
    code, err = run_cli(["search", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    for field in ("models.experts", "merge.method", "eval.tasks.0.metric", "search.generations"):
        assert field in err
    assert not (tmp_path / "r").exists()


def test_missing_model_path(zoo, tmp_path, capsys) -> None:
    path = write_config(tmp_path, zoo, models={"base": str(tmp_path / "gone"), "experts": [str(zoo["base"])]})
    code, err = run_cli(["search", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "models.base: no such model folder" in err and len(err.splitlines()) == 1


def _variant(zoo, tmp_path: Path, name: str, **changes) -> Path:
    """A copy of the quick base with a changed config (a different architecture, built with fresh weights);
    a changed `model_type` takes that architecture's config with the base's sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(zoo["base"])
    if "model_type" in changes:
        sizes = {key: value for key, value in config.to_dict().items()
                 if key not in ("model_type", "architectures", "transformers_version")}
        config = AutoConfig.for_model(changes.pop("model_type"), **sizes)
    for key, value in changes.items():
        setattr(config, key, value)
    folder = tmp_path / name
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(zoo["base"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("changes, expected", [
    ({"hidden_size": 48, "head_dim": 12}, "config.hidden_size is 48 but models.base has {hidden_size}"),
    ({"intermediate_size": 40}, "config.intermediate_size is 40 but models.base has {intermediate_size}"),
    # a Mistral of the base's sizes has the base's tensor names and shapes: only the architecture differs
    ({"model_type": "mistral"}, "config.model_type is 'mistral' but models.base has '{model_type}'"),
    # the same tokenizer, a larger embedding: the config is refused before the tensors are compared
    ({"vocab_size": 64}, "config.vocab_size is 64 but models.base has {vocab_size}"),
], ids=["hidden_size", "intermediate_size", "model_type", "vocab_size"])
def test_incompatible_expert_is_refused_before_evaluation(zoo, tmp_path, capsys, changes, expected) -> None:
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(zoo["base"]).to_dict()
    assert all(base[key] != value for key, value in changes.items())
    other = _variant(zoo, tmp_path, "other", **changes)
    path = write_config(tmp_path, zoo, models={"experts": [str(other)]})
    code, err = run_cli(["search", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and err == f"evomerge: error: models.experts.0: {expected.format(**base)}"
    assert not (tmp_path / "r").exists()


def test_different_vocabulary_is_refused(zoo, tmp_path, capsys) -> None:
    other = tmp_path / "vocab"
    shutil.copytree(zoo["base"], other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    path = write_config(tmp_path, zoo, models={"experts": [str(other)]})
    code, err = run_cli(["search", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "models.experts.0: tokenizer vocabulary differs" in err


def test_missing_tensor_is_named(zoo, tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "cut"
    shutil.copytree(zoo["base"], other)
    tensors = load_file(other / "model.safetensors")
    dropped = sorted(tensors)[3]
    del tensors[dropped]
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    path = write_config(tmp_path, zoo, models={"experts": [str(other)]})
    code, err = run_cli(["search", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and f"tensor {dropped!r} is missing" in err


def test_extra_tensor_is_named(zoo, tmp_path, capsys) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "extra"
    shutil.copytree(zoo["base"], other)
    tensors = load_file(other / "model.safetensors")
    extra = "model.layers.0.mlp.extra_proj.weight"
    assert extra not in tensors
    tensors[extra] = torch.zeros(4, 4)
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    path = write_config(tmp_path, zoo, models={"experts": [str(other)]})
    code, err = run_cli(["search", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and err == f"evomerge: error: models.experts.0: extra tensor {extra!r} (models.base has none)"
    assert not (tmp_path / "r").exists()


def test_non_finite_weights_are_named(zoo, tmp_path, capsys) -> None:
    from safetensors.torch import load_file, save_file

    other = tmp_path / "nan"
    shutil.copytree(zoo["base"], other)
    tensors = load_file(other / "model.safetensors")
    poisoned = sorted(tensors)[-1]
    tensors[poisoned][0] = float("nan")
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    path = write_config(tmp_path, zoo, models={"experts": [str(other)]})
    code, err = run_cli(["search", str(path), "--run-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and f"models.experts.0: tensor {poisoned!r} in model.safetensors has non-finite values" in err


@pytest.mark.parametrize("values, finite", [
    ([1.0, 2.0], True),
    ([60000.0] * 8, True),  # the float16 sum overflows to inf: checked value by value, and accepted
    ([1.0, float("inf")], False),
    ([float("inf"), float("-inf")], False),  # a sum of NaN
    ([1.0, float("nan")], False),
])
def test_the_finite_check_uses_the_sum_only_as_a_proof(tmp_path, values, finite) -> None:
    from safetensors.torch import save_file

    from evomerge.errors import ModelMismatchError
    from evomerge.models.sources import _check_finite

    save_file({"w": torch.tensor(values, dtype=torch.float16)}, tmp_path / "model.safetensors")
    if finite:
        _check_finite("models.base", tmp_path)
    else:
        with pytest.raises(ModelMismatchError, match="tensor 'w' in model.safetensors has non-finite values"):
            _check_finite("models.base", tmp_path)


@pytest.mark.parametrize("name", ["journal.jsonl", "subsample.jsonl", "genome.dfs.json", "report.md",
                                  ".checkpoint.pkl.tmp"])
def test_run_files_linking_outside_the_run_directory_are_refused(tmp_path, capsys, name) -> None:
    from evomerge.cli import main

    outside = tmp_path / "precious.txt"
    outside.write_text("keep me\n")
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: r\n")
    (run_dir / name).symlink_to(outside)
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert name in err and "outside the run directory" in err and len(err.splitlines()) == 1
    assert outside.read_text() == "keep me\n" and not (run_dir / "run.log").exists()
