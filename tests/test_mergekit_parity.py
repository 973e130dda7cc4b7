"""Parity with mergekit 0.1.5: the same config merged by mergekit and by `evomerge merge` gives the
same tensors (fp32, max abs diff <= 1e-5), for every method evomerge registers.

Each registered method needs an entry in CASES: the mergekit config (method name and parameters,
written with per-layer gradients and tensor-name filters so the parameter resolution is tested
too). Methods that draw random masks are compared with the randomness removed (density 1); their
drop statistics are compared with mergekit's own sparsifiers separately. Tiny models are built
here: a Llama with GQA and untied embeddings, and a Qwen2 with attention biases and tied
embeddings. mergekit runs in-process on the CPU, offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import mergekit  # noqa: F401 - a test dependency (pip install -e '.[test]'): missing fails, never skips
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.merge import METHODS, get_method
from evomerge.merge.mergekit import MergekitConfig, ModelEntry, plan_merge

TOLERANCE = 1e-5
FAMILIES = ("llama", "qwen2")

# ------------------------------------------------------------------ tiny models


def _build_family(root: Path, family: str) -> dict[str, str]:
    """A base and three experts (base + small noise on every tensor), saved with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from evomerge.zoo import make_tokenizer

    tokenizer = make_tokenizer()
    shape = dict(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "llama":
        config, cls = LlamaConfig(**shape, tie_word_embeddings=False), LlamaForCausalLM
    else:  # q/k/v biases, tied embeddings
        config, cls = Qwen2Config(**shape, tie_word_embeddings=True), Qwen2ForCausalLM
    generator = torch.Generator().manual_seed(0 if family == "llama" else 1)
    torch.manual_seed(0)
    base = cls(config)
    with torch.no_grad():
        for param in base.parameters():  # norms start at 1, biases at 0: make them differ too
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    paths = {}
    for name in ("base", "e0", "e1", "e2"):
        model = cls(config)
        model.load_state_dict(base.state_dict())
        if name != "base":
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(0.3 * param.abs().mean() * torch.randn(param.shape, generator=generator))
        folder = root / family / name
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        paths[name] = str(folder)
    return paths


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("parity_models")
    return {family: _build_family(root, family) for family in FAMILIES}


# ------------------------------------------------------------------ running both


def run_mergekit(config: dict[str, Any], out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(cuda=False, copy_tokenizer=True, write_model_card=False, lazy_unpickle=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return load_tensors(out)


def run_evomerge(config_path: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    assert main(["merge", str(config_path), "--out", str(out), *extra]) == 0
    return load_tensors(out)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The model's parameters as transformers loads them (tied weights once, whatever the files hold)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def max_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    return max(((ours[n] - theirs[n]).abs().max().item(), n) for n in ours)


def write_yaml(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------ one mergekit config per method

# Settings that exercise mergekit's resolution: a gradient across layers, filters with a default.
GRADIENT = [0.2, 0.9, 0.5]
FILTERED = [{"filter": "self_attn", "value": 0.7}, {"filter": "mlp", "value": [0.3, 0.6]}, {"value": 0.45}]


def _task_vector_case(method: str, density: float | list | None = None, **shared: Any) -> Callable[[dict], dict]:
    def case(m: dict[str, str]) -> dict[str, Any]:
        extra = {} if density is None else {"density": density}
        return {"merge_method": method, "base_model": m["base"],
                "models": [{"model": m["base"]},
                           {"model": m["e0"], "parameters": {"weight": GRADIENT, **extra}},
                           {"model": m["e1"], "parameters": {"weight": FILTERED, **extra}},
                           {"model": m["e2"]}],
                "parameters": {"weight": 0.35, **shared}, "dtype": "float32", "tokenizer_source": "base"}
    return case


CASES: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
    "linear": lambda m: {"merge_method": "linear",
                         "models": [{"model": m["e0"], "parameters": {"weight": GRADIENT}},
                                    {"model": m["e1"], "parameters": {"weight": FILTERED}},
                                    {"model": m["e2"], "parameters": {"weight": 0.25}}],
                         "dtype": "float32"},
    "task_arithmetic": _task_vector_case("task_arithmetic", **{"lambda": 0.8}),
    "ties": _task_vector_case("ties", density=[0.3, 0.8], rescale=True, **{"lambda": 1.1}),
    "dare_ties": _task_vector_case("dare_ties", density=1.0, normalize=True),
    "dare_linear": _task_vector_case("dare_linear", density=1.0, **{"lambda": 0.9}),
    "breadcrumbs": _task_vector_case("breadcrumbs", density=0.8, gamma=0.05),
    "breadcrumbs_ties": _task_vector_case("breadcrumbs_ties", density=0.7, gamma=0.02, normalize=True),
    "della": _task_vector_case("della", density=1.0, epsilon=0.1),
    "della_linear": _task_vector_case("della_linear", density=1.0, epsilon=0.1),
    "slerp": lambda m: {"merge_method": "slerp", "base_model": m["base"],
                        "models": [{"model": m["base"]}, {"model": m["e0"]}],
                        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                             {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                                             {"value": 0.5}]},
                        "dtype": "float32", "tokenizer_source": "base"},
    "nuslerp": lambda m: {"merge_method": "nuslerp", "base_model": m["base"],
                          "models": [{"model": m["e0"], "parameters": {"weight": GRADIENT}},
                                     {"model": m["e1"], "parameters": {"weight": 0.6}}],
                          "dtype": "float32"},
    "multislerp": lambda m: {"merge_method": "multislerp", "base_model": m["base"],
                             "models": [{"model": m["e0"], "parameters": {"weight": GRADIENT}},
                                        {"model": m["e1"], "parameters": {"weight": 0.6}},
                                        {"model": m["e2"], "parameters": {"weight": FILTERED}}],
                             "dtype": "float32"},
    "model_stock": lambda m: {"merge_method": "model_stock", "base_model": m["base"],
                              "models": [{"model": m["e0"]}, {"model": m["e1"]}, {"model": m["e2"]}],
                              "dtype": "float32"},
    "passthrough": lambda m: {"merge_method": "passthrough", "models": [{"model": m["e1"]}], "dtype": "float32"},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(set(METHODS) | set(CASES)))
def test_evomerge_merge_equals_mergekit(method, family, families, tmp_path):
    assert method in METHODS, f"{method!r} has a mergekit config in CASES but is not registered in evomerge.merge"
    assert method in CASES, f"registered method {method!r} has no mergekit config in CASES; add one"
    config = CASES[method](families[family])
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_evomerge(write_yaml(tmp_path, config), tmp_path / "evomerge")
    difference, where = max_difference(ours, theirs)
    assert difference <= TOLERANCE, f"{method}/{family}: max abs diff {difference:.3g} in {where}"
    base = load_tensors(Path(families[family]["base"]))
    assert max_difference(ours, base)[0] > 1e-3  # the merge did something


SLICE_CASES: dict[str, Callable[[dict[str, str]], dict[str, Any]]] = {
    # mergekit's classic slerp example: one slice over every layer, t per module type
    "slerp_slice": lambda m: {"merge_method": "slerp", "base_model": m["base"], "dtype": "float32",
                              "slices": [{"sources": [{"model": m["base"], "layer_range": [0, 4]},
                                                      {"model": m["e2"], "layer_range": [0, 4]}],
                                          "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}]}}],
                              "parameters": {"t": 0.4}},
    # a frankenmerge / layer path: 3 + 2 + 1 layers from three models
    "passthrough_stack": lambda m: {"merge_method": "passthrough", "dtype": "float32",
                                    "slices": [{"sources": [{"model": m["e0"], "layer_range": [0, 3]}]},
                                               {"sources": [{"model": m["e1"], "layer_range": [1, 3]}]},
                                               {"sources": [{"model": m["e2"], "layer_range": [3, 4]}]}]},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", sorted(SLICE_CASES))
def test_slice_configs_equal_mergekit(case, family, families, tmp_path):
    if case == "passthrough_stack" and family == "qwen2":
        pytest.skip("mergekit 0.1.5 keeps Qwen2's layer_types at the sources' length: transformers 5 refuses "
                    "its config (test_a_stacked_layer_is_the_source_layer covers evomerge's Qwen2 stack)")
    config = SLICE_CASES[case](families[family])
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = run_evomerge(write_yaml(tmp_path, config), tmp_path / "evomerge")
    difference, where = max_difference(ours, theirs)
    assert difference <= TOLERANCE, f"{case}/{family}: max abs diff {difference:.3g} in {where}"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_stacked_layer_is_the_source_layer(family, families, tmp_path):
    models = families[family]
    config = SLICE_CASES["passthrough_stack"](models)
    ours = run_evomerge(write_yaml(tmp_path, config), tmp_path / "evomerge")
    e0, e1, e2 = (load_tensors(Path(models[name])) for name in ("e0", "e1", "e2"))
    assert torch.equal(ours["model.layers.4.self_attn.q_proj.weight"], e1["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.layers.5.mlp.up_proj.weight"], e2["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], e0["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(ours["model.norm.weight"], e2["model.norm.weight"])  # the last slice's
    assert len({name.split(".")[2] for name in ours if name.startswith("model.layers.")}) == 6
    written = json.loads((tmp_path / "evomerge" / "config.json").read_text())
    assert written["num_hidden_layers"] == 6 and len(written.get("layer_types") or [None] * 6) == 6


# ------------------------------------------------------------------ drop statistics of random methods


def _evomerge_sparsify(method: str, delta: torch.Tensor, density: float, seed: int, **params: Any) -> torch.Tensor:
    """One expert's dropped (and rescaled) task vector, parameters translated as `evomerge merge` does."""
    config = MergekitConfig(source="test", method=get_method(method), base_model="base",
                            models=(ModelEntry("e0", {"weight": 1.0, "density": density, **params}),),
                            parameters={"normalize": False}, dtype=None, out_dtype=None, tokenizer_source=None)
    kwargs = plan_merge(config, ["x"], 1).for_tensor("x")
    return get_method(method).fn(torch.zeros_like(delta), [delta], seed=seed, **kwargs)


def _mergekit_sparsify(method: str, delta: torch.Tensor, density: float, **params: Any) -> torch.Tensor:
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    kind = SparsificationMethod.della_magprune if method.startswith("della") else SparsificationMethod.random
    torch.manual_seed(0)
    return sparsify(delta, density=density, method=kind, rescale_norm=RescaleNorm.l1, **params)


RANDOM_CASES = {"dare_linear": {}, "dare_ties": {}, "della": {"epsilon": 0.1}, "della_linear": {"epsilon": 0.1}}


@pytest.mark.parametrize("method", sorted(RANDOM_CASES))
def test_drop_statistics_match_mergekit(method):
    assert method in METHODS, f"{method!r} is not registered in evomerge.merge"
    n, density = 200_000, 0.3
    delta = torch.rand(n, generator=torch.Generator().manual_seed(5)) + 0.5  # U[0.5, 1.5): all positive
    ours = _evomerge_sparsify(method, delta, density, seed=7, **RANDOM_CASES[method])
    theirs = _mergekit_sparsify(method, delta, density, **RANDOM_CASES[method])
    for out in (ours, theirs):
        kept = out != 0
        assert abs(kept.float().mean().item() - density) < 0.01  # ~10 standard deviations
        # rescale: the L1 norm is kept, so each kept entry is scaled by one factor |delta|_1 / |kept delta|_1,
        # ~ 1/density for dare's uniform drop (della keeps large entries more often: a smaller factor)
        torch.testing.assert_close(out.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)
        factor = out[kept] / delta[kept]
        assert torch.allclose(factor, factor[0], rtol=1e-4)
        expected = delta.abs().sum() / delta[kept].abs().sum()
        assert abs(factor[0].item() - expected.item()) < 1e-3
        if method.startswith("dare"):
            assert abs(factor[0].item() - 1 / density) < 0.05
    ours_kept, theirs_kept = ours != 0, theirs != 0
    if method.startswith("della"):  # magnitude-aware: large entries are kept more often, by the same amount
        top = delta > delta.quantile(0.9)
        bottom = delta < delta.quantile(0.1)
        for kept in (ours_kept, theirs_kept):
            assert kept[top].float().mean() - kept[bottom].float().mean() > 0.1
        assert abs(ours_kept[top].float().mean() - theirs_kept[top].float().mean()) < 0.03



# ------------------------------------------------------------------ the YAML `evomerge export` writes

DEMO_TASKS = Path(__file__).resolve().parents[1] / "evals" / "demo"
EXPORTED = {  # method -> (granularity, experts); dare at density 1 so both tools draw no masks
    "linear": ("layer", 3), "task_arithmetic": ("block:3", 3), "ties": ("layer", 2),
    "dare_ties": ("global", 2), "slerp": ("layer", 1),
}  # the other methods' exports go through both tools in test_merge_methods_vs_mergekit.py (EXPORT_CASES)


def test_every_method_is_exported_through_mergekit_and_evomerge_merge():
    from test_merge_methods_vs_mergekit import EXPORT_CASES

    assert set(EXPORTED) | {case[0] for case in EXPORT_CASES} == set(METHODS)


def _recipe(method: str, granularity: str, num_layers: int, experts: int):
    from evomerge.genome import GenomeLayout

    layout = GenomeLayout.build(method, granularity, num_layers, experts,
                                {"weight": (0.2, 1.2), "density": (0.3, 1.0), "t": (0.0, 1.0)})
    x = torch.rand(layout.size, generator=torch.Generator().manual_seed(3)).numpy()
    for index, gene in enumerate(layout.genes):
        if gene.name == "density" and method.startswith("dare"):
            x[index] = 1.0
    return layout.decode(x)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(EXPORTED))
def test_exported_yaml_runs_in_mergekit_and_evomerge_merge_with_the_exported_tensors(method, families, tmp_path):
    from evomerge.config import load_config
    from evomerge.export import write_folder

    granularity, count = EXPORTED[method]
    models = families["llama"]
    raw = {"seed": 0, "models": {"base": models["base"], "experts": [models[f"e{i}"] for i in range(count)],
                                 "device": "cpu"},
           "merge": {"method": method, "granularity": granularity},
           "eval": {"include_path": str(DEMO_TASKS), "tasks": [{"name": "demo_add", "metric": "exact_match"}]}}
    config = load_config(write_yaml(tmp_path / "run", raw))
    recipe = _recipe(method, granularity, 4, count)
    export = tmp_path / "export"
    export.mkdir()
    write_folder(export, config, {"trial": 5, "quality": 0.5, "metrics": {}, "recipe": recipe.to_json()})
    exported = load_tensors(export)

    document = yaml.safe_load((export / "mergekit.yaml").read_text())
    theirs = run_mergekit(document, tmp_path / "mergekit")
    ours = run_evomerge(export / "mergekit.yaml", tmp_path / "evomerge")
    for name, tensors in (("mergekit", theirs), ("evomerge merge", ours)):
        difference, where = max_difference(tensors, exported)
        assert difference <= TOLERANCE, f"{method}: {name} differs from the export by {difference:.3g} in {where}"
    assert json.loads((export / "recipe.json").read_text())["trial"] == 5


@pytest.mark.slow
def test_incompatible_models_are_named_by_path(families, tmp_path, capsys):
    config = {"merge_method": "task_arithmetic", "base_model": families["llama"]["base"],
              "models": [{"model": families["qwen2"]["e0"], "parameters": {"weight": 1.0}}]}
    assert main(["merge", str(write_yaml(tmp_path, config)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"model {families['qwen2']['e0']}: config.model_type is 'qwen2' but model {families['llama']['base']}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_merged_folder_is_complete_in_its_out_dtype(families, tmp_path):
    """Written file to file (no model object): config with the out dtype, generation config,
    tokenizer files, tied embeddings as the sources store them; transformers loads it."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = families["qwen2"]
    config = {"merge_method": "ties", "base_model": m["base"], "dtype": "float32", "out_dtype": "bfloat16",
              "models": [{"model": m["e0"], "parameters": {"weight": 0.7, "density": 0.6}},
                         {"model": m["e1"], "parameters": {"weight": 0.5, "density": 0.8}}]}
    out = tmp_path / "out"
    assert main(["merge", str(write_yaml(tmp_path, config)), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "mergekit.yaml"} <= {
        p.name for p in out.iterdir()}
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle, \
            safe_open(str(Path(m["base"]) / "model.safetensors"), framework="pt") as base:
        assert set(handle.keys()) == set(base.keys())  # tied: the head is not stored twice
        assert all(handle.get_slice(k).get_dtype() == "BF16" for k in handle.keys())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tokens = AutoTokenizer.from_pretrained(out)("12+34=", return_tensors="pt")
    assert torch.isfinite(model(**tokens).logits).all()
    theirs = run_mergekit(config, tmp_path / "mergekit")
    assert max_difference(load_tensors(out), theirs)[0] <= 1e-2  # both rounded to bfloat16 once


@pytest.mark.slow
def test_sources_with_other_tokenizer_files_are_compared_by_vocabulary(families, tmp_path, capsys):
    import shutil

    m = families["llama"]
    other = tmp_path / "other"
    shutil.copytree(m["e0"], other)
    document = json.loads((other / "tokenizer.json").read_text())
    document["model"]["vocab"] = {f"x{token}": index for token, index in document["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(document))
    config = {"merge_method": "linear", "models": [{"model": m["e1"], "parameters": {"weight": 1.0}},
                                                   {"model": str(other), "parameters": {"weight": 1.0}}]}
    assert main(["merge", str(write_yaml(tmp_path, config)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"model {other}: tokenizer vocabulary differs from model {m['e1']}" in err

    # the same vocabulary written differently (reformatted JSON) merges
    (other / "tokenizer.json").write_text(json.dumps(json.loads((Path(m["e0"]) / "tokenizer.json").read_text()),
                                                     indent=4))
    assert main(["merge", str(write_yaml(tmp_path, config)), "--out", str(tmp_path / "out")]) == 0
