"""The data-flow space: layer paths built from shared layers, their genome, FLOPs, stages and export."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.config import load_config, validate
from evomerge.dataflow import DataflowLayout, LayerPath, Step, layer_list_path, materialize, path_of
from evomerge.errors import ConfigError
from evomerge.flops import CostModel
from evomerge.genome import ALL, GenomeLayout, Recipe
from evomerge.merge.mergekit import passthrough_yaml
from evomerge.run_dir import RunDir, canonical
from evomerge.search import run_loop
from evomerge.trial import TrialResult, TrialState

from conftest import REPO, says, write_config
from fakes import FakePool, make_config

VOCAB, HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 50, 32, 64, 4, 2, 3


def llama(seed: int, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=tied,
                         pad_token_id=0, eos_token_id=1)
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                      pad_token_id=0, eos_token_id=1)).eval()


IDS = torch.randint(2, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def greedy(model, use_cache: bool = True) -> torch.Tensor:
    return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, do_sample=False,
                          use_cache=use_cache, pad_token_id=0)


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("make", [llama, lambda seed: llama(seed, tied=True), gpt2], ids=["llama", "tied", "gpt2"])
@torch.no_grad()
def test_a_path_of_one_models_layers_is_that_model(make) -> None:
    first, other = make(0), make(1)
    flow = LayerPath([first, other], ["first", "other"])
    model = flow.set_path([Step(0, layer) for layer in range(LAYERS)])
    assert torch.equal(model(IDS).logits, first(IDS).logits)
    assert torch.equal(greedy(model), greedy(first))
    shared = {p.data_ptr() for p in first.parameters()}
    assert {p.data_ptr() for p in model.parameters()} <= shared | {p.data_ptr() for p in other.parameters()}


@torch.no_grad()
def test_the_path_follows_the_sources_weights_in_place() -> None:
    first, other = llama(0), llama(1)
    flow = LayerPath([first, other])
    model = flow.set_path([Step(1, layer) for layer in range(LAYERS)])
    before = model(IDS).logits
    for name, param in first.named_parameters():  # embeddings, norm and head are the first model's
        if ".layers." not in name:
            param.mul_(1.5)
    assert not torch.equal(model(IDS).logits, before)


def test_an_empty_path_is_refused_and_the_model_keeps_its_path() -> None:
    """A genome with no include gene above its threshold decodes to no layers: the worker's
    `set_path` refuses it (the candidate fails, named), since no such model could be exported."""
    flow = LayerPath([llama(0), llama(1)])
    model = flow.set_path([Step(1, 0)])
    with pytest.raises(ValueError, match="dataflow: the path has no layers"):
        flow.set_path([])
    assert flow.path == [Step(1, 0)] and model.config.num_hidden_layers == 1
    layout = DataflowLayout(("a", "b"), (LAYERS, LAYERS), 1, None, Recipe("linear", "global", LAYERS, {}))
    assert path_of(layout.decode(np.zeros(layout.size)).dataflow) == []


@torch.no_grad()
def test_a_repeated_layer_gets_its_own_cache_entry() -> None:
    first, other = llama(0), llama(1)
    flow = LayerPath([first, other])
    model = flow.set_path([Step(0, 0), Step(1, 1, 0.8), Step(0, 0, 1.2), Step(1, 2), Step(0, 2)])
    assert model.config.num_hidden_layers == 5
    with_cache, without = greedy(model), greedy(model, use_cache=False)
    assert with_cache.shape == (2, IDS.shape[1] + 6)
    assert torch.equal(with_cache, without)  # one cache entry per step, or the cached run would drift
    out = model(IDS, use_cache=True)
    assert len(out.past_key_values.layers) == 5
    # the layers' own indices are restored after each step
    assert first.model.layers[0].self_attn.layer_idx == 0 and other.model.layers[1].self_attn.layer_idx == 1


def test_flops_count_every_step_of_the_path_by_hand() -> None:
    first, other = llama(0), llama(1)
    flow = LayerPath([first, other])
    model = flow.set_path([Step(0, 0), Step(1, 1), Step(0, 0), Step(1, 2), Step(0, 2)])
    head_dim = HIDDEN // HEADS
    per_layer = (HIDDEN * HEADS * head_dim * 2 + HIDDEN * KV_HEADS * head_dim * 2  # q, o, k, v
                 + 3 * HIDDEN * FFN)  # gate, up, down
    cost = CostModel.from_model(model)
    assert cost.matmul_params == 5 * per_layer + HIDDEN * VOCAB  # layer 0 of model 0 counted twice
    assert cost.num_layers == 5 and cost.attn_dim == 5 * HEADS * head_dim
    tokens = 10
    assert cost.forward_flops(tokens) == (2 * (5 * per_layer + HIDDEN * VOCAB) * tokens
                                          + 4 * 5 * HEADS * head_dim * tokens * (tokens + 1) // 2)
    assert CostModel.from_model(flow.set_path([Step(0, 1)])).matmul_params == per_layer + HIDDEN * VOCAB


def test_layer_lists_are_found_generically() -> None:
    assert layer_list_path(llama(0)) == "model.layers"
    assert layer_list_path(gpt2(0)) == "transformer.h"


def test_models_whose_layers_cannot_follow_each_other_are_refused() -> None:
    from evomerge.errors import ModelMismatchError

    with pytest.raises(ModelMismatchError, match="dataflow.models: b has config.model_type 'gpt2' but a has 'llama'"):
        LayerPath([llama(0), gpt2(0)], ["a", "b"])


# --------------------------------------------------------------------------- the genome


def layout(scaling: bool = True, repeats: int = 2) -> DataflowLayout:
    merge = Recipe("task_arithmetic", "global", LAYERS, {ALL: {"weight": [0.0]}})
    return DataflowLayout(("base", "expert:0"), (LAYERS, LAYERS), repeats, (0.5, 1.5) if scaling else None, merge)


def test_decoding_is_pure_and_follows_the_slots() -> None:
    space = layout()
    assert space.size == 2 * (2 * LAYERS * 2)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=space.size)
    first, second = space.decode(x), space.decode(x.copy())
    assert first == second and first.to_json() == second.to_json()
    assert Recipe.from_json(first.to_json()) == first
    slots = space.slots
    kept = [t for t in range(len(slots)) if x[t] > 0.5]
    path = first.dataflow["path"]
    assert [(m, layer) for m, layer, _ in path] == [slots[t] for t in kept]
    assert [s for _, _, s in path] == pytest.approx([0.5 + x[len(slots) + t] for t in kept])
    assert first.method == "task_arithmetic" and first.params == {ALL: {"weight": [0.0]}}


def test_the_include_threshold_is_strict_and_encode_inverts_decode() -> None:
    space = layout()
    assert space.decode(np.full(space.size, 0.5)).dataflow["path"] == []
    path = [Step(0, 0), Step(1, 2, 1.25), Step(0, 0, 0.75), Step(0, 2)]  # layer 0 again in the second pass
    recipe = space.decode(space.encode(path))
    assert recipe.dataflow["path"] == [[s.model, s.layer, s.scale] for s in path]
    unscaled = layout(scaling=False, repeats=1)
    assert unscaled.size == 2 * LAYERS
    assert all(s == 1.0 for _, _, s in unscaled.decode(np.ones(unscaled.size)).dataflow["path"])


def test_bad_genomes_name_the_gene() -> None:
    space = layout()
    x = np.full(space.size, 0.7)
    x[13] = 1.5
    with pytest.raises(ValueError, match=r"genome\[13\] \(slot 1/base layer 1/scale\): expected a value in \[0, 1\]"):
        space.decode(x)
    with pytest.raises(ValueError, match="expected 24 values"):
        space.decode(np.ones(3))


def test_with_a_start_path_the_centre_of_the_box_is_the_first_model() -> None:
    space = replace(layout(), start=tuple(range(LAYERS)))
    centre = space.decode(np.full(space.size, 0.5))
    assert centre.dataflow["path"] == [[0, layer, 1.0] for layer in range(LAYERS)]
    x = np.full(space.size, 0.5)
    x[0], x[LAYERS] = 0.2, 0.8  # drop the first layer, add the second model's first layer
    assert space.decode(x).dataflow["path"] == [[0, 1, 1.0], [0, 2, 1.0], [1, 0, 1.0]]
    path = [Step(1, 1), Step(0, 0, 1.2)]
    assert space.decode(space.encode(path)).dataflow["path"] == [[1, 1, 1.0], [0, 0, 1.2]]


def test_references_are_each_models_own_layers() -> None:
    refs = layout().references()
    assert [r.label for r in refs] == ["path:base", "path:expert:0"]
    assert refs[1].dataflow["path"] == [[1, layer, 1.0] for layer in range(LAYERS)]


# --------------------------------------------------------------------------- export


@torch.no_grad()
def test_a_scaled_path_materialises_into_an_ordinary_model(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    first, other = llama(0), llama(1)
    flow = LayerPath([first, other])
    flow.set_path([Step(0, 0), Step(1, 1, 0.8), Step(0, 0, 1.3), Step(1, 2, 0.9), Step(0, 2)])
    expected = flow.model(IDS).logits
    materialize(flow).save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_hidden_layers == 5
    # exact but for the norms' epsilon (folded scales): far below the logits' spread
    assert (loaded(IDS).logits - expected).abs().max() < 1e-3 * expected.abs().max()
    flow.set_path([Step(1, 0), Step(0, 1), Step(0, 1)])
    assert torch.equal(materialize(flow)(IDS).logits, flow.model(IDS).logits)  # unscaled: bit-exact


def test_passthrough_yaml_only_for_unscaled_paths_of_folders() -> None:
    flow = LayerPath([llama(0), llama(1)])
    flow.set_path([Step(1, 0), Step(1, 1), Step(0, 1), Step(0, 1)])
    document = yaml.safe_load(passthrough_yaml(flow, ["/a", "/b"], "float32", 3))
    assert document["merge_method"] == "passthrough"
    assert [s["sources"][0] for s in document["slices"]] == [
        {"model": "/a", "layer_range": [0, 0]}, {"model": "/b", "layer_range": [0, 2]},
        {"model": "/a", "layer_range": [1, 2]}, {"model": "/a", "layer_range": [1, 2]},
        {"model": "/a", "layer_range": [0, 0]}]
    assert passthrough_yaml(flow, [None, "/b"], "float32", 3) is None  # the merged candidate has no folder
    flow.set_path([Step(1, 0, 1.1)])
    assert passthrough_yaml(flow, ["/a", "/b"], "float32", 3) is None


@pytest.mark.slow
@torch.no_grad()
def test_mergekit_and_evomerge_merge_build_the_same_model_from_the_passthrough_yaml(zoo, tmp_path: Path) -> None:
    """The export's passthrough YAML (empty slices of the first model pin embeddings and head)
    gives the materialised path with mergekit-yaml and with `evomerge merge`."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.mergekit import run_merge

    folders = [str(zoo["base"]), str(zoo[[n for n in zoo if n != "base"][0]])]
    models = [AutoModelForCausalLM.from_pretrained(f).eval() for f in folders]
    flow = LayerPath(models)
    flow.set_path([Step(1, 0), Step(0, 1), Step(0, 1), Step(1, 1)])  # the quick zoo has 2 layers
    (tmp_path / "m.yaml").write_text(passthrough_yaml(flow, folders, "float32", 0))
    tool = Path(sys.executable).with_name("mergekit-yaml")
    done = subprocess.run([str(tool), str(tmp_path / "m.yaml"), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = materialize(flow).state_dict()
    run_merge(tmp_path / "m.yaml", tmp_path / "evomerge-out")
    for out in ("out", "evomerge-out"):
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / out).state_dict()
        assert set(theirs) == set(ours), out
        assert all(torch.equal(theirs[name], ours[name]) for name in ours), out


# --------------------------------------------------------------------------- config


def raw_config(**sections) -> dict:
    raw = {"models": {"base": "b", "experts": ["e0", "e1"]}, "eval": {"tasks": [{"name": "t", "metric": "acc"}]}}
    raw.update(sections)
    return raw


def test_stages_default_from_the_dataflow_block() -> None:
    assert validate(raw_config()).stages == ["ps"]
    config = validate(raw_config(dataflow={"repeats": 2}))
    assert config.stages == ["dfs"] and config.dataflow_models == ["base", "expert:0", "expert:1"]
    staged = validate(raw_config(dataflow={}, search={"stages": ["ps", "dfs"]}))
    assert staged.dataflow_models == ["merged", "expert:0", "expert:1"]


@pytest.mark.parametrize("sections, message", [
    ({"search": {"stages": ["dfs"]}}, "dataflow: search.stages has dfs but there is no dataflow block"),
    ({"search": {"stages": ["ps"]}, "dataflow": {}}, r"dataflow: search.stages is \['ps'\]; add dfs"),
    ({"search": {"stages": ["dfs", "ps"]}, "dataflow": {}}, r"search.stages: expected \[ps\], \[dfs\] or \[ps, dfs\]"),
    ({"dataflow": {"models": ["base", "teacher"]}}, "dataflow.models: expected merged, base or expert:I"),
    ({"dataflow": {"models": ["base", "expert:5"]}}, "dataflow.models: expert:5 but there are 2 experts"),
    ({"dataflow": {"models": ["base", "base"]}}, "dataflow.models: each model once"),
    ({"dataflow": {"repeats": 0}}, says("dataflow.repeats", "1")),
    ({"dataflow": {"bounds": {"scale": [1.5, 0.5]}}}, r"dataflow.bounds.scale: expected \[low, high\]"),
    ({"dataflow": {"paths": 3}}, "dataflow.paths: unknown key; expected one of: models, repeats"),
    ({"dataflow": {"start": "last"}}, says("dataflow.start", "first", "none")),
    ({"dataflow": {}, "policy": {"kind": "blend", "members": ["merged", "base"]}}, "policy.kind: a dfs stage"),
])
def test_bad_dataflow_configs_are_one_line_errors(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        validate(raw_config(**sections))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, stages", [("demo_dfs.yaml", ["dfs"]), ("demo_ps_dfs.yaml", ["ps", "dfs"])])
def test_shipped_dataflow_configs_load(tmp_path: Path, name: str, stages: list[str]) -> None:
    (tmp_path / "search_spaces").mkdir()
    (tmp_path / "search_spaces" / name).write_text((REPO / "search_spaces" / name).read_text())
    for model in ("base", "add", "rev", "sort"):
        (tmp_path / "runs" / "zoo" / model).mkdir(parents=True)
        (tmp_path / "runs" / "zoo" / model / "config.json").write_text("{}")
    (tmp_path / "evals" / "demo").mkdir(parents=True)
    config = load_config(tmp_path / "search_spaces" / name)
    assert config.stages == stages and config.dataflow is not None
    assert config.dataflow_models[0] == ("merged" if stages[0] == "ps" else "base")


# --------------------------------------------------------------------------- stages


class PathPool(FakePool):
    """FakePool for both stages: a dfs trial scores by how close its path is to a target path."""

    TARGET = [(1, 0), (0, 1), (2, 2), (2, 2)]

    def result(self, trial) -> TrialResult:
        if trial.recipe.dataflow is None:
            return super().result(trial)
        path = [(m, layer) for m, layer, _ in trial.recipe.dataflow["path"]]
        scales = [s for _, _, s in trial.recipe.dataflow["path"]]
        hits = sum(a == b for a, b in zip(path, self.TARGET)) - abs(len(path) - len(self.TARGET))
        quality = float(hits - 0.1 * sum(abs(s - 1.0) for s in scales))
        return TrialResult(trial.id, TrialState.COMPLETE, quality=quality, metrics={"t": quality}, worker="fake")


def staged_config():
    raw = make_config(generations=3).to_yaml_dict()
    raw["search"]["stages"] = ["ps", "dfs"]
    raw["dataflow"] = {"repeats": 2, "generations": 3, "population": 6}
    return validate(raw)


def start(tmp_path: Path, config, name: str):
    ps = GenomeLayout.build("task_arithmetic", "layer", 3, 2, {"weight": (0.0, 1.5)})
    return RunDir.create(tmp_path / name, config, ps.describe()), ps


def test_a_staged_run_searches_paths_through_the_best_merge(tmp_path: Path) -> None:
    config = staged_config()
    run, ps = start(tmp_path, config, "run")
    run_loop(run, config, ps, PathPool())
    records = sorted(run.records(), key=lambda r: r["trial"])
    stages = [r["stage"] for r in records]
    assert stages == ["ps"] * (4 + 3 * 6) + ["dfs"] * (3 + 3 * 6)  # dfs references: merged, expert:0, expert:1
    dfs = [r for r in records if r["stage"] == "dfs"]
    assert sorted({r["generation"] for r in dfs}) == [3, 4, 5]
    best_ps = max((r for r in records if r["stage"] == "ps"), key=lambda r: (r["quality"], -r["trial"]))
    assert all(r["recipe"]["params"] == best_ps["recipe"]["params"] for r in dfs)
    assert dfs[0]["label"] == "path:merged" and dfs[0]["recipe"]["dataflow"]["models"] == ["merged", "expert:0",
                                                                                           "expert:1"]
    assert len(records[-1]["genome"]) == 2 * (3 * 3 * 2)  # include + scale per slot, 3 models x 3 layers x 2
    assert (run.path / "genome.dfs.json").is_file()
    assert run.load_checkpoint().stage == 1 and run.load_checkpoint().generation == 6


@pytest.mark.parametrize("stop_after", [10, 22, 25, 40])  # mid ps, at the boundary, mid dfs generation 3, later
def test_resume_across_the_stage_boundary_equals_an_uninterrupted_run(tmp_path: Path, stop_after: int) -> None:
    config = staged_config()
    run, ps = start(tmp_path, config, "straight")
    run_loop(run, config, ps, PathPool())
    expected = canonical(run.records())

    run, ps = start(tmp_path, config, "interrupted")
    first = PathPool(stop_after=stop_after)
    with pytest.raises(KeyboardInterrupt):
        run_loop(run, config, ps, first)
    assert len(run.records()) == stop_after
    second = PathPool()
    run_loop(RunDir.open(run.path), config, ps, second)
    assert canonical(run.records()) == expected
    assert not set(first.evaluated) & set(second.evaluated)


class GenerousSubsetPool(PathPool):
    """PathPool whose scores on eval.subsample's subset (trial.limit set) are 0.5 too high: a pruned
    ps trial then records the highest quality of the ps stage."""

    def result(self, trial) -> TrialResult:
        result = super().result(trial)
        if trial.limit is None or not result.ok:
            return result
        return dataclasses.replace(result, quality=result.quality + 0.5, metrics={"t": result.quality + 0.5})


def test_a_dfs_stage_after_subsample_starts_from_a_complete_ps_trial(tmp_path: Path) -> None:
    raw = staged_config().to_yaml_dict()
    raw["eval"].update(limit=100, subsample={"fraction": 0.25, "promote": 0.5})
    config = validate(raw)
    run, ps = start(tmp_path, config, "run")
    run_loop(run, config, ps, GenerousSubsetPool())
    records = run.records()
    ps_records = [r for r in records if r["stage"] == "ps"]
    pruned = [r for r in ps_records if r["state"] == TrialState.PRUNED.value]
    complete = [r for r in ps_records if r["state"] == TrialState.COMPLETE.value]
    assert pruned and complete
    # the trap is set: a subset-only trial has the highest quality the ps stage recorded
    assert max(ps_records, key=lambda r: r["quality"])["state"] == TrialState.PRUNED.value
    start_from = max(complete, key=lambda r: (r["quality"], -r["trial"]))
    dfs = [r for r in records if r["stage"] == "dfs"]
    assert dfs and all(r["recipe"]["params"] == start_from["recipe"]["params"] for r in dfs)


# --------------------------------------------------------------------------- real models, real lm-eval


@pytest.fixture(scope="module")
def runner(zoo, tmp_path_factory):
    from evomerge.workers import CandidateRunner

    folder = tmp_path_factory.mktemp("dfs")
    path = write_config(folder, zoo, dataflow={"repeats": 2}, merge={"method": "task_arithmetic",
                                                                      "granularity": "global"})
    config = load_config(path)
    return CandidateRunner(config), config


@pytest.mark.slow
def test_a_path_of_one_models_layers_scores_like_that_model(runner, zoo, tmp_path: Path) -> None:
    from evomerge.genome import reference_recipes
    from evomerge.search import genome_layout
    from evomerge.trial import Trial
    from evomerge.workers import CandidateRunner

    candidate, config = runner
    space = genome_layout(config)
    assert isinstance(space, DataflowLayout) and space.members == ("base", "expert:0", "expert:1", "expert:2")
    plain = reference_recipes(len(config.models.experts), space.merge.num_layers)  # base, expert:i, uniform
    as_path, alone = candidate.run(Trial(0, 0, space.references()[0])), candidate.run(Trial(1, 0, plain[0]))
    assert as_path.ok and alone.ok, (as_path.error, alone.error)
    assert (as_path.quality, as_path.metrics, as_path.flops) == (alone.quality, alone.metrics, alone.flops)
    # an expert's layers under the base's embeddings and head run, but are not that expert
    assert candidate.run(Trial(2, 0, space.references()[2])).ok
    # with the expert first (its embeddings and head), its own path is the expert exactly
    path = write_config(tmp_path, zoo, dataflow={"models": ["expert:1", "base"]},
                        merge={"method": "task_arithmetic", "granularity": "global"})
    expert_first = CandidateRunner(load_config(path))
    as_path = expert_first.run(Trial(0, 0, genome_layout(expert_first.config).references()[0]))
    alone = expert_first.run(Trial(1, 0, plain[2]))
    assert plain[2].label == "expert:1" and as_path.ok and alone.ok, (as_path.error, alone.error)
    assert (as_path.quality, as_path.metrics, as_path.flops) == (alone.quality, alone.metrics, alone.flops)


@pytest.mark.slow
def test_a_repeated_layer_runs_through_lm_eval_and_costs_more(runner) -> None:
    from evomerge.trial import Trial

    candidate, config = runner
    space = layout_of(candidate, config)
    own = candidate.run(Trial(0, 0, space.references()[0]))
    longer = candidate.run(Trial(1, 0, space.recipe([Step(0, 0), Step(0, 1), Step(0, 1, 0.9), Step(1, 0),
                                                     Step(0, 1)])))
    assert own.ok and longer.ok, longer.error
    assert candidate.flow.model.config.num_hidden_layers == 5
    assert longer.flops > own.flops


def layout_of(candidate, config) -> DataflowLayout:
    """The dfs genome of the runner's config (base, experts; the quick zoo's models have 2 layers)."""
    from evomerge.genome import reference_recipes

    layers = len(candidate.flow.layers[0])
    merge = replace(reference_recipes(len(config.models.experts), layers)[0], label=None)
    return DataflowLayout(tuple(config.dataflow_models), (layers,) * len(config.dataflow_models), 2, (0.5, 1.5),
                          merge)


@pytest.mark.slow
def test_an_exported_path_reloads_with_its_score(runner, tmp_path: Path) -> None:
    from evomerge.export import evaluate_folder, export
    from evomerge.trial import Trial, record

    candidate, config = runner
    space = layout_of(candidate, config)
    run = RunDir.create(tmp_path / "run", config, space.describe())
    paths = {0: [Step(0, 0), Step(2, 1, 1.2), Step(0, 1), Step(0, 1, 0.8), Step(0, 0), Step(3, 1), Step(0, 1)],
             1: [Step(0, 0), Step(0, 1), Step(1, 1), Step(1, 1), Step(0, 1)]}
    for trial_id, path in paths.items():
        trial = Trial(trial_id, 0, space.recipe(path), stage="dfs")
        run.append(record(trial, candidate.run(trial)))
    for trial_id, journaled in run.finished().items():
        assert journaled["state"] == "complete", journaled["error"]
        out = tmp_path / f"out{trial_id}"
        export(run.path, out, trial_id)
        assert evaluate_folder(config, out) == pytest.approx(journaled["quality"], abs=1e-12)
        assert (out / "mergekit.yaml").is_file() == (trial_id == 1)  # unscaled paths only


@pytest.mark.slow
def test_search_starts_a_dfs_only_run_from_a_config(zoo, tmp_path: Path) -> None:
    from evomerge.search import search

    config = load_config(write_config(tmp_path, zoo, dataflow={"repeats": 1, "scaling": False},
                                      search={"population": 4, "generations": 2}))
    summary = search(config, tmp_path / "run", pool=PathPool())
    records = RunDir.open(tmp_path / "run").records()
    assert {r["stage"] for r in records} == {"dfs"} and summary["trials"] == 4 + 2 * 4
    assert [r["label"] for r in summary["references"]] == ["path:base", "path:expert:0", "path:expert:1",
                                                           "path:expert:2"]
