"""Sources are memory-mapped from safetensors, and merge exactly as sources loaded by transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

from evomerge.config import ModelsConfig
from evomerge.genome import Recipe
from evomerge.merge.merger import Merger, load_merge_target
from evomerge.models.sources import load_model, mapped_parameters


def _tiny(folder: Path, seed: int, tied: bool) -> str:
    """A two-layer Llama-style model with GQA and biases on attention, saved as safetensors."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                                      tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def sources(request, tmp_path) -> ModelsConfig:
    paths = [_tiny(tmp_path / f"m{i}", i, request.param) for i in range(3)]
    return ModelsConfig(base=paths[0], experts=paths[1:], device="cpu")


def _file_of(address: int) -> str | None:
    """The file mapped at `address` in this process, if any (Linux /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, stop = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < stop:
            return fields[5] if len(fields) >= 6 else None
    return None


@pytest.mark.parametrize("method,genes", [("ties", {"weight": [0.7, 0.4], "density": [0.5, 0.3]}),
                                          ("dare_ties", {"weight": [0.7, 0.4], "density": [0.5, 0.3]}),
                                          ("task_arithmetic", {"weight": [0.6, 0.9]})])
def test_mapped_sources_merge_bit_identically_to_loaded_models(sources, method, genes) -> None:
    model, merger = load_merge_target(sources, seed=3, device=torch.device("cpu"))
    loaded = [{n: p.detach().clone() for n, p in load_model(path, sources, torch.device("cpu")).named_parameters()}
              for path in sources.sources]
    reference = Merger(loaded[0], loaded[1:], seed=3)
    recipe = Recipe(method, "global", 2, {"all": genes})
    expected = dict(reference.merged(recipe))
    merger.merge_into(model, recipe)
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[name], expected[name]) for name in expected)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_sources_are_mapped_from_their_files_not_copied(sources) -> None:
    model, merger = load_merge_target(sources, seed=0, device=torch.device("cpu"))
    for path, tensors in zip(sources.sources, [merger.base, *merger.experts]):
        expected = str(Path(path).resolve() / "model.safetensors")
        assert {_file_of(t.data_ptr()) for t in tensors.values()} == {expected}
    # The target may itself be a private mapping made by transformers, but never the sources' one.
    assert not {p.data_ptr() for p in model.parameters()} & {t.data_ptr() for t in merger.base.values()}


def test_a_converted_dtype_matches_from_pretrained(sources) -> None:
    half = sources.model_copy(update={"dtype": "bfloat16"})
    model = load_model(half.base, half, torch.device("cpu"))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    mapped = mapped_parameters(half.base, shapes, torch.bfloat16)
    assert mapped is not None and all(t.dtype == torch.bfloat16 for t in mapped.values())
    assert all(torch.equal(mapped[n], p) for n, p in model.named_parameters())


def test_a_file_without_the_model_names_falls_back_to_loading(sources, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for item in Path(sources.base).iterdir():
        if item.suffix != ".safetensors":
            (renamed / item.name).write_bytes(item.read_bytes())
    tensors = load_file(Path(sources.base) / "model.safetensors")
    save_file({f"other.{k}": v for k, v in tensors.items()}, renamed / "model.safetensors", metadata={"format": "pt"})
    model = load_model(sources.base, sources, torch.device("cpu"))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert mapped_parameters(str(renamed), shapes, torch.float32) is None
    assert mapped_parameters(sources.base, {**shapes, "extra.weight": (1,)}, torch.float32) is None
    wrong = {n: (s[0] + 1, *s[1:]) if n.endswith("q_proj.weight") else s for n, s in shapes.items()}
    assert mapped_parameters(sources.base, wrong, torch.float32) is None
