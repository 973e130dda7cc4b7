"""mergekit configs, read and written in one place.

Writing (the end of this module): `mergekit_yaml` (a recipe as per-model parameters with layer
filters) and `passthrough_yaml` (an unscaled layer path as `slices:`), which `evomerge export`
puts beside every exported model.

Reading: a mergekit merge config, run by evomerge's own merge methods, written as a Hugging Face folder.

    evomerge merge CONFIG.yaml --out DIR

reads the fields of a mergekit config that describe one merge of whole models::

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/expert_a
        parameters: {weight: [0.2, 0.8], density: 0.5}    # a list: interpolated across layers
      - model: path/to/expert_b
        parameters:
          weight:
            - filter: self_attn                          # tensor names containing "self_attn"
              value: 0.7
            - value: 0.3                                 # everything else
    parameters: {normalize: true, lambda: 1.0}           # shared settings and per-model defaults
    dtype: float32
    tokenizer_source: base

and resolves every parameter per tensor the way mergekit 0.1.5 does (`mergekit/config.py`
`evaluate_setting`, `mergekit/plan.py`):

- a setting is a scalar, a list of scalars (a gradient) or a list of `{filter, value}`
  conditions; the first condition whose filter is a substring of the tensor name (no filter or
  `*`: any tensor) gives the value;
- a gradient is read at t = i / (L - 1) for a tensor of layer i of L (t = 1 when L is 1) and at
  t = 0 for everything outside the layer stack (embeddings, final norm, head), linearly
  interpolated between neighbouring entries (booleans and strings are picked, not interpolated);
- a model's own parameters win over the top-level `parameters`; per-model genes (`weight`,
  `density`) fall back to the top-level ones, then to mergekit's defaults (density 1);
  shared settings (`t`, `normalize`, `rescale`, `lambda`, ...) come from the top level only.

`slices:` is read in two forms: one slice whose sources each span every layer (mergekit's
spelling of the same merge, e.g. its slerp examples; a slice's `parameters` sit between the
sources' and the top-level ones), and `merge_method: passthrough` stacks of one-source slices
(frankenmerges, layer paths): the output's layers are copies of the slices' layers in order,
embeddings come from the first slice's model, final norm and head from the last one's.

The merge itself is `Merger.merge_into` with the registered method (`evomerge.merge`), the code
a search's workers and `evomerge export` run. Random-drop methods (dare_*) draw evomerge's masks
from `--seed`, so they match mergekit's merges in distribution only.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import yaml

from evomerge.config import ModelsConfig, RunConfig, _resolve_model, read_yaml
from evomerge.errors import ConfigError, ModelMismatchError
from evomerge.genome import ALL, EMBED_HEAD, Recipe, group_of, interpolate, layer_index
from evomerge.merge import METHODS, MergeMethod, get_method
from evomerge.merge.methods import passthrough
from evomerge.merge.registry import GENES
from evomerge.models.folders import Folder, check_folders, read_folder, same_tokenizer_files, write_folder

if TYPE_CHECKING:
    from evomerge.dataflow import LayerPath

logger = logging.getLogger(__name__)

SUPPORTED_FIELDS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                    "tokenizer_source")
REFUSED_FIELDS = {
    "modules": "per-module merges are not supported; list whole models under `models:`",
    "tokenizer": "the `tokenizer:` block (vocabulary surgery) is not supported; use tokenizer_source: base or a model",
    "chat_template": "chat_template is not supported; set it on the written tokenizer",
}
MODEL_FIELDS = ("model", "parameters")
SLICE_FIELDS = ("sources", "parameters")
SOURCE_FIELDS = ("model", "layer_range", "parameters")
PASSTHROUGH = passthrough.method.name
CONDITION_FIELDS = ("filter", "value")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# mergekit's parameter names that evomerge spells differently ('lambda' is a Python keyword).
EVOMERGE_NAME = {"lambda": "lambda_"}
MERGEKIT_NAME = {ours: theirs for theirs, ours in EVOMERGE_NAME.items()}
SHARED_GENES = tuple(name for name, spec in GENES.items() if not spec.per_expert)  # mergekit: shared parameters
NO_OP_SETTINGS = ("int8_mask",)  # mergekit options with no effect on the result (mask dtype)
_LAYER_IN_NAME = re.compile(r"(^|\.)(\d+)(\.|$)")  # the layer number in a name, as genome.layer_index reads it


@dataclass(frozen=True)
class ModelEntry:
    model: str  # resolved folder or Hugging Face id
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergekitConfig:
    """The validated fields of a mergekit config; `models` excludes base_model where the method has a base."""

    source: str  # the file, for messages
    method: MergeMethod
    base_model: str | None
    models: tuple[ModelEntry, ...]
    parameters: dict[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    slice_parameters: dict[str, Any] = field(default_factory=dict)  # a `slices:` config's one slice
    layer_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # model -> its slice's range

    @property
    def skeleton(self) -> str:
        """The model whose config and buffers the output takes (mergekit: base_model, else the first model)."""
        return self.base_model or self.models[0].model

    @property
    def shared_scopes(self) -> tuple[dict[str, Any], ...]:
        """Where shared settings are looked up, highest precedence first."""
        return (self.slice_parameters, self.parameters)


@dataclass(frozen=True)
class SliceSource:
    model: str
    start: int
    stop: int  # exclusive, as mergekit's layer_range


@dataclass(frozen=True)
class LayerStack:
    """A passthrough `slices:` config: the output's layers are the slices' layers, in order.

    Embeddings and everything before the layer stack come from the first slice's model, the final
    norm, head and everything after it from the last slice's model (as mergekit's planner does).
    """

    source: str
    base_model: str | None
    slices: tuple[SliceSource, ...]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None

    @property
    def skeleton(self) -> str:
        return self.base_model or self.slices[0].model

    @property
    def num_layers(self) -> int:
        return sum(s.stop - s.start for s in self.slices)


@dataclass(frozen=True)
class MergePlan:
    """Per-tensor keyword arguments for the merge method; what `Merger.merge_into` reads from a Recipe."""

    method: str
    tensors: dict[str, dict[str, Any]]

    def for_tensor(self, name: str) -> dict[str, Any]:
        return self.tensors[name]


# --------------------------------------------------------------------------- reading


def read_config(path: str | Path) -> MergekitConfig | LayerStack:
    """Read and validate a mergekit config; any problem is one ConfigError naming the field.

    `slices:` is read in two cases: one slice whose sources each span every layer (the same merge
    as `models:`; checked against the models' layer count in `plan_merge`), and passthrough
    stacks of one-source slices without parameters (a `LayerStack`).
    """
    path = Path(path)
    raw = read_yaml(path)
    source = str(path)
    unknown = [key for key in raw if key not in SUPPORTED_FIELDS]
    for key in unknown:
        if key in REFUSED_FIELDS:
            raise ConfigError(f"{source}: {key}: {REFUSED_FIELDS[key]}")
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(map(str, unknown))}; "
                          f"supported: {', '.join(SUPPORTED_FIELDS)}")
    name = raw.get("merge_method")
    folder = path.resolve().parent
    raw = {key: value for key, value in raw.items() if value is not None}  # `field: null` is no field
    if ("models" in raw) == ("slices" in raw):
        raise ConfigError(f"{source}: expected exactly one of `models:` or `slices:`")
    if "slices" in raw and name == PASSTHROUGH:
        return _layer_stack(raw, folder, source)
    if name not in METHODS:
        raise ConfigError(f"{source}: merge_method: {name!r} is not supported; expected one of: {', '.join(METHODS)}")
    method = get_method(name)
    base = _model_path(raw["base_model"], folder, source, "base_model") if raw.get("base_model") is not None else None

    slice_parameters: dict[str, Any] = {}
    layer_ranges: dict[str, tuple[int, int]] = {}
    if "slices" in raw:
        if not isinstance(raw["slices"], list) or len(raw["slices"]) != 1 or not isinstance(raw["slices"][0], dict):
            raise ConfigError(f"{source}: slices: {method.name} reads one slice whose sources span every layer; "
                              f"several slices are supported for passthrough only (one source each)")
        entries = _entries(raw["slices"][0].get("sources"), "slices[0].sources", SOURCE_FIELDS, source)
        slice_parameters = _mapping(raw["slices"][0].get("parameters"), f"{source}: slices[0].parameters")
        _check_fields(raw["slices"][0], SLICE_FIELDS, "slices[0]", source)
    else:
        entries = _entries(raw.get("models"), "models", MODEL_FIELDS, source)
    models = []
    for where, entry in entries:
        model = _model_path(entry["model"], folder, source, f"{where}.model")
        models.append(ModelEntry(model, _mapping(entry.get("parameters"), f"{source}: {where}.parameters")))
        if "slices" in raw:
            layer_ranges[model] = _layer_range(entry.get("layer_range"), f"{where}.layer_range", source)

    parameters = _mapping(raw.get("parameters"), f"{source}: parameters")
    config = MergekitConfig(
        source=source, method=method, base_model=base, models=tuple(_inputs(method, base, models, source)),
        parameters=parameters, dtype=_dtype(raw.get("dtype"), source, "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), source, "out_dtype"),
        tokenizer_source=_tokenizer_source(raw.get("tokenizer_source"), base, folder, source),
        slice_parameters=slice_parameters, layer_ranges=layer_ranges,
    )
    _check_parameter_names(config)
    return config


def _entries(value: Any, where: str, fields: tuple[str, ...], source: str) -> list[tuple[str, dict[str, Any]]]:
    """A list of mappings with `model:` and only the given fields, each with its place for messages."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: {where}: expected a list of {{{', '.join(fields)}}} entries")
    entries = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{source}: {where}[{i}]: expected a mapping with `model:` "
                              f"(fields: {', '.join(fields)})")
        _check_fields(entry, fields, f"{where}[{i}]", source)
        entries.append((f"{where}[{i}]", entry))
    return entries


def _check_fields(entry: dict[str, Any], fields: tuple[str, ...], where: str, source: str) -> None:
    extra = [key for key in entry if key not in fields]
    if extra:
        raise ConfigError(f"{source}: {where}: unknown field(s) {', '.join(map(str, extra))}; "
                          f"supported: {', '.join(fields)}")


def _layer_range(value: Any, where: str, source: str) -> tuple[int, int]:
    """[start, stop): an empty range is a passthrough slice of no layers, which still decides where
    the embeddings (first slice) or the head (last slice) come from (evomerge's layer-path exports
    write such slices, as mergekit reads them)."""
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in value) or not 0 <= value[0] <= value[1]):
        raise ConfigError(f"{source}: {where}: expected [start, stop] with 0 <= start <= stop (got {value!r})")
    return value[0], value[1]


def _layer_stack(raw: dict[str, Any], folder: Path, source: str) -> LayerStack:
    slices = raw["slices"]
    if not isinstance(slices, list) or not slices:
        raise ConfigError(f"{source}: slices: expected a list of {{sources: [{{model, layer_range}}]}}")
    if raw.get("parameters"):
        raise ConfigError(f"{source}: parameters: passthrough slices are stacked as they are; "
                          f"scaling is not supported")
    stack = []
    for i, entry in enumerate(slices):
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: slices[{i}]: expected a mapping with `sources:`")
        _check_fields(entry, ("sources",), f"slices[{i}]", source)
        sources = _entries(entry.get("sources"), f"slices[{i}].sources", ("model", "layer_range"), source)
        if len(sources) != 1:
            raise ConfigError(f"{source}: slices[{i}].sources: passthrough takes one source per slice "
                              f"(got {len(sources)})")
        where, item = sources[0]
        start, stop = _layer_range(item.get("layer_range"), f"{where}.layer_range", source)
        stack.append(SliceSource(_model_path(item["model"], folder, source, f"{where}.model"), start, stop))
    if all(s.start == s.stop for s in stack):
        raise ConfigError(f"{source}: slices: every layer_range is empty; the stack needs at least one layer")
    base = _model_path(raw["base_model"], folder, source, "base_model") if raw.get("base_model") is not None else None
    return LayerStack(source=source, base_model=base, slices=tuple(stack),
                      dtype=_dtype(raw.get("dtype"), source, "dtype"),
                      out_dtype=_dtype(raw.get("out_dtype"), source, "out_dtype"),
                      tokenizer_source=_tokenizer_source(raw.get("tokenizer_source"), base, folder, source))


def _inputs(method: MergeMethod, base: str | None, models: list[ModelEntry], source: str) -> list[ModelEntry]:
    """The models merged as experts: for methods with a base, every model but base_model (mergekit
    ignores the base's parameters there); for the others every model, plus base_model when it is
    not listed (mergekit adds it as an input)."""
    if method.needs_base:
        if base is None:
            raise ConfigError(f"{source}: base_model: merge_method {method.name} needs a base model")
        experts = [entry for entry in models if entry.model != base]
        if not experts:
            raise ConfigError(f"{source}: models: {method.name} needs at least one model besides base_model")
    else:
        experts = models + ([ModelEntry(base)] if base is not None and base not in [m.model for m in models] else [])
    if method.max_experts is not None and len(experts) > method.max_experts:
        raise ConfigError(f"{source}: models: {method.name} merges base_model with at most {method.max_experts} "
                          f"other model(s); got {len(experts)}")
    return experts


def _model_path(value: Any, folder: Path, source: str, field_name: str) -> str:
    """A model reference: a folder relative to the working directory (as mergekit reads it), else to
    the config's folder, else a Hugging Face id. LoRA references (`model+lora`) are refused."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{source}: {field_name}: expected a model folder or Hugging Face id (got {value!r})")
    if "+" in value and not Path(value).exists():
        raise ConfigError(f"{source}: {field_name}: LoRA references ({value!r}) are not supported; "
                          f"merge the adapter first")
    if Path(value).expanduser().is_dir():
        folder = Path.cwd()
    problems: list[str] = []
    resolved = _resolve_model(value, folder, field_name, problems)
    if problems:
        raise ConfigError(f"{source}: {problems[0]}")
    return resolved


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of parameter names to values (got {type(value).__name__})")
    return dict(value)


def _dtype(value: Any, source: str, field_name: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise ConfigError(f"{source}: {field_name}: {value!r} is not supported; expected one of: {', '.join(DTYPES)}")
    return str(value)


def _tokenizer_source(value: Any, base: str | None, folder: Path, source: str) -> str | None:
    if value is None:
        return None
    if value == "base":
        if base is None:
            raise ConfigError(f"{source}: tokenizer_source: 'base' needs base_model")
        return base
    if value == "union":
        raise ConfigError(f"{source}: tokenizer_source: 'union' is not supported (evomerge merges models that "
                          f"share one vocabulary); expected 'base' or a model")
    return _model_path(value, folder, source, "tokenizer_source")


def method_settings(method: MergeMethod) -> tuple[list[str], list[str]]:
    """(per-model genes, shared settings) of a method, in mergekit's spelling."""
    options = method.options
    per_model = [gene for gene in method.genes if gene not in SHARED_GENES]
    shared = [gene for gene in method.genes if gene in SHARED_GENES]
    return per_model, shared + [MERGEKIT_NAME.get(option, option) for option in options] + list(NO_OP_SETTINGS)


def _check_parameter_names(config: MergekitConfig) -> None:
    per_model, shared = method_settings(config.method)
    name = config.method.name
    for where, scope in (("parameters", config.parameters), ("slices[0].parameters", config.slice_parameters)):
        for key in scope:
            if key not in per_model and key not in shared:
                raise ConfigError(f"{config.source}: {where}.{key}: not a parameter of {name}; "
                                  f"supported: {', '.join(per_model + shared)}")
    for i, entry in enumerate(config.models):
        for key in entry.parameters:
            if key in shared:
                raise ConfigError(f"{config.source}: model {entry.model}: parameters.{key} is shared by all models "
                                  f"in {name}; set it under the top-level parameters")
            if key not in per_model:
                raise ConfigError(f"{config.source}: model {entry.model}: parameters.{key}: not a per-model "
                                  f"parameter of {name}; supported: {', '.join(per_model) or 'none'}")


# --------------------------------------------------------------------------- parameters per tensor


def evaluate_setting(setting: Any, tensor: str, t: float, where: str) -> Any:
    """A setting's value for one tensor at layer position t (None when no condition matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, list):
        raise ConfigError(f"{where}: expected a value, a list of values or a list of {{filter, value}} "
                          f"(got {setting!r})")
    if not setting:
        return None
    if all(_is_scalar(item) for item in setting):
        return _gradient(setting, t, where)
    for condition in setting:
        if not isinstance(condition, dict) or "value" not in condition:
            raise ConfigError(f"{where}: expected {{filter, value}} entries (got {condition!r})")
        extra = [key for key in condition if key not in CONDITION_FIELDS]
        if extra:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(map(str, extra))}; supported: filter, value")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or str(pattern) in tensor:
            return evaluate_setting(condition["value"], tensor, t, where)
    return None


def _gradient(values: list[Any], t: float, where: str) -> Any:
    """mergekit's gradient: linear interpolation at t * (n - 1); non-numbers are picked, not mixed."""
    numbers = [_number(v) for v in values]
    if any(n is None for n in numbers):
        return values[int(t * (len(values) - 1))]
    return interpolate(numbers, t)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)  # mergekit reads '1e-3' as a number for numeric parameters
    except (TypeError, ValueError):
        return None


def layer_position(tensor: str, num_layers: int) -> float:
    """mergekit's t: i / (L - 1) for layer i of L (1 when L is 1), 0 outside the layer stack."""
    index = layer_index(tensor)
    if index is None or index >= num_layers:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def plan_merge(config: MergekitConfig, tensor_names: list[str], num_layers: int) -> MergePlan:
    """Resolve every parameter of every tensor before any weight is loaded."""
    per_model, shared = method_settings(config.method)
    for model, (start, stop) in config.layer_ranges.items():
        if (start, stop) != (0, num_layers):
            raise ConfigError(f"{config.source}: slices[0]: layer_range [{start}, {stop}] of {model}; "
                              f"{config.method.name} merges whole models: expected [0, {num_layers}]")
    tensors = {}
    for tensor in tensor_names:
        t = layer_position(tensor, num_layers)
        kwargs: dict[str, Any] = {}
        for gene in per_model:
            values = []
            for entry in config.models:
                value = _first(tensor, t, gene, (entry.parameters, *config.shared_scopes),
                               f"{config.source}: model {entry.model}: {gene}")
                if value is None:
                    value = GENES[gene].default  # mergekit 0.1.5's default; None: required
                if value is None:
                    raise ConfigError(f"{config.source}: model {entry.model}: no {gene} for tensor {tensor!r}; "
                                      f"expected it in the model's or the top-level parameters")
                values.append(_gene_value(value, f"{config.source}: model {entry.model}: {gene}"))
            kwargs[gene] = values
        for setting in shared:
            value = _first(tensor, t, setting, config.shared_scopes, f"{config.source}: parameters.{setting}")
            if setting in NO_OP_SETTINGS:
                continue
            if setting in config.method.genes:
                if value is None:
                    raise ConfigError(f"{config.source}: parameters.{setting}: no value for tensor {tensor!r}; "
                                      f"{config.method.name} needs one")
                value = _gene_value(value, f"{config.source}: parameters.{setting}")
            if value is not None:
                kwargs[EVOMERGE_NAME.get(setting, setting)] = value
        tensors[tensor] = kwargs
    return MergePlan(config.method.name, tensors)


def _first(tensor: str, t: float, name: str, scopes: tuple[Mapping[str, Any], ...], where: str) -> Any:
    for scope in scopes:
        if name in scope:
            value = evaluate_setting(scope[name], tensor, t, where)
            if value is not None:
                return value
    return None


def _gene_value(value: Any, where: str) -> float:
    number = _number(value)
    if number is None:
        raise ConfigError(f"{where}: expected a number (got {value!r})")
    return number


# --------------------------------------------------------------------------- merging


def run_merge(config_path: str | Path, out: str | Path, *, force: bool = False, seed: int = 0,
              device: str = "cpu") -> Path:
    """Merge (or stack) what a mergekit config describes and write a Hugging Face folder to `out`."""
    from evomerge.export import check_out, staged
    from evomerge.models.sources import pick_device

    config = read_config(config_path)
    out = Path(out)
    check_out(out, force)

    inputs = ([entry.model for entry in config.models] if isinstance(config, MergekitConfig)
              else list(dict.fromkeys(s.model for s in config.slices)))
    folders = [read_folder(path) for path in [config.skeleton, *inputs]]
    plain = isinstance(config, MergekitConfig) and all(folders)  # local safetensors folders: no model object
    dtype = config.dtype or (_declared_dtype(folders[0].config) if plain else _stored_dtype(config.skeleton))
    models = ModelsConfig(base=config.skeleton, experts=inputs, dtype=_canonical(dtype), device=device,
                          check_finite=False)
    if plain:
        return _merge_folders(config, models, folders, out, seed, pick_device(device), config_path)
    tokenizer_path = _output_tokenizer(config)
    info = _checked_sources(models, tokenizers=tokenizer_path is not None)
    tokenizer = _checked_tokenizer(config, models, tokenizer_path) if tokenizer_path is not None else None

    if isinstance(config, MergekitConfig):
        model = _merge(config, models, info, seed, pick_device(device))
    else:
        model = _stack(config, models, info.num_layers, pick_device(device))
    if config.out_dtype is not None:
        model = model.to(DTYPES[config.out_dtype])
    model.config.dtype = DTYPES[config.out_dtype or dtype]

    with staged(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        copy_config(config_path, staging / "mergekit.yaml", seed)
    return out


def copy_config(config_path: str | Path, target: Path, seed: int) -> None:
    """The merge config, copied with a closing comment that records the seed (the random masks of
    dare and della come from it): `evomerge merge CONFIG --seed N` makes the same folder again."""
    text = Path(config_path).read_text(encoding="utf-8")
    target.write_text(text + ("" if text.endswith("\n") else "\n")
                      + f"# evomerge merge --seed {seed}: the seed of the random drop masks (dare_*, della*)\n",
                      encoding="utf-8")


def _merge_folders(config: MergekitConfig, models: ModelsConfig, folders: list[Folder], out: Path, seed: int,
                   device: torch.device, config_path: str | Path) -> Path:
    """The merge of local safetensors folders, file to file (`evomerge.models.folders`): every stored
    floating tensor merged into a new tensor, the others taken from the skeleton."""
    from evomerge.export import staged
    from evomerge.merge.merger import Merger
    from evomerge.merge.prepared import Prepared
    from evomerge.models.sources import field_names, source_parameters

    with _named_by_path(models):
        check_folders(folders, field_names(models))
    tokenizer_path = _output_tokenizer(config)
    tokenizer = Path(tokenizer_path) if tokenizer_path is not None else None
    if tokenizer is not None and not all(same_tokenizer_files(folders[0].path, other)
                                         for other in [*(f.path for f in folders[1:]), tokenizer]):
        _checked_sources(models, tokenizers=True)  # the files differ: compare what they encode
        _checked_tokenizer(config, models, tokenizer_path)

    skeleton = folders[0]
    sources = [source_parameters(str(f.path), skeleton.shapes, models, device) for f in folders]
    floating = [name for name, tensor in sources[0].items() if tensor.is_floating_point()]
    plan = plan_merge(config, floating, skeleton.num_layers)
    logger.info("merging %d model(s) with %s", len(config.models), config.method.name)
    merged = {name: torch.empty_like(tensor) if name in floating else tensor for name, tensor in sources[0].items()}
    merger = Merger(sources[0], sources[1:], seed=seed)
    merger.prepared = Prepared(keep_masks=False)  # experts equal to the base are passed as the base (same values)
    for _ in merger.merged(plan, floating, into=merged):
        pass
    out_dtype = DTYPES[config.out_dtype] if config.out_dtype is not None else None
    written = {name: (t.to(out_dtype) if out_dtype is not None and name in floating else t).cpu()
               for name, t in merged.items()}
    with staged(out) as staging:
        write_folder(staging, written, skeleton, _canonical(config.out_dtype or models.dtype), tokenizer)
        copy_config(config_path, staging / "mergekit.yaml", seed)
    return out


def _output_tokenizer(config: MergekitConfig | LayerStack) -> str | None:
    """The folder whose tokenizer the output gets; None (with a warning, as mergekit) when no
    tokenizer_source is set and the skeleton has none."""
    from evomerge.models.sources import has_tokenizer

    if config.tokenizer_source is None and not has_tokenizer(config.skeleton):
        logger.warning("%s has no tokenizer: the merged folder gets none (set tokenizer_source to give it one)",
                       config.skeleton)
        return None
    return config.tokenizer_source or config.skeleton


@contextmanager
def _named_by_path(models: ModelsConfig) -> Iterator[None]:
    """A ModelMismatchError raised inside names the models by path, as the mergekit config does."""
    try:
        yield
    except ModelMismatchError as exc:
        raise ModelMismatchError(_mergekit_names(str(exc), models)) from None


def _checked_sources(models: ModelsConfig, tokenizers: bool) -> Any:
    """`sources.check_sources`, its messages naming models by path."""
    from evomerge.models.sources import check_sources

    with _named_by_path(models):
        return check_sources(models, tokenizers=tokenizers)


def _checked_tokenizer(config: MergekitConfig | LayerStack, models: ModelsConfig, path: str) -> Any:
    """The tokenizer of `path`, refused when it is not one of the merged models and encodes with
    another vocabulary than the skeleton's."""
    from evomerge.models.sources import load_tokenizer

    tokenizer = load_tokenizer(path, models)
    if path not in models.sources:
        _check_vocabulary(tokenizer, load_tokenizer(config.skeleton, models), path, config.source)
    return tokenizer


def _declared_dtype(declared: dict) -> str:
    """The dtype a config.json declares (`dtype`, or 4.x's `torch_dtype`); float32 when none."""
    name = str(declared.get("dtype") or declared.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _merge(config: MergekitConfig, models: ModelsConfig, info: Any, seed: int, device: torch.device) -> torch.nn.Module:
    """The base (or first model) with every parameter overwritten by the merge, as a search's workers do it."""
    from evomerge.merge.merger import load_merge_target
    from evomerge.merge.prepared import Prepared

    plan = plan_merge(config, list(info.shapes), info.num_layers)  # every parameter resolved before loading
    logger.info("merging %d model(s) with %s", len(config.models), config.method.name)
    model, merger = load_merge_target(models, seed, device)
    # experts equal to the base bit for bit are passed as the base (the same values; task-vector
    # methods skip them); nothing else is kept for one merge
    merger.prepared = Prepared(keep_masks=False)
    merger.merge_into(model, plan)
    return model


@torch.inference_mode()
def _stack(stack: LayerStack, models: ModelsConfig, source_layers: int, device: torch.device) -> torch.nn.Module:
    """A new model with the slices' layers in order (copies, no arithmetic), embeddings from the first
    slice's model and the final norm / head from the last one's."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from evomerge.models.sources import load_model, torch_dtype

    for i, part in enumerate(stack.slices):
        if part.stop > source_layers:
            raise ConfigError(f"{stack.source}: slices[{i}]: layer_range [{part.start}, {part.stop}] of {part.model}; "
                              f"it has {source_layers} layers")
    config = AutoConfig.from_pretrained(stack.skeleton, trust_remote_code=models.trust_remote_code)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = stack.num_layers
    if isinstance(layer_types, list) and len(layer_types) == source_layers:
        config.layer_types = [layer_types[j] for part in stack.slices for j in range(part.start, part.stop)]
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(models.dtype),
                                             trust_remote_code=models.trust_remote_code).to(device).eval()
    try:
        model.generation_config = GenerationConfig.from_pretrained(stack.skeleton)
    except OSError:  # no generation_config.json: keep the default one
        pass
    sources = {}
    for path in dict.fromkeys(part.model for part in stack.slices):
        sources[path] = {name: p.detach() for name, p in load_model(path, models, device).named_parameters()}
    names = [name for name, _ in model.named_parameters()]
    first_layer = next((i for i, name in enumerate(names) if layer_index(name) is not None), len(names))
    origin = [(part, j) for part in stack.slices for j in range(part.start, part.stop)]
    logger.info("stacking %d layers from %d slice(s)", stack.num_layers, len(stack.slices))
    for position, (name, param) in enumerate(model.named_parameters()):
        index = layer_index(name)
        if index is not None and index < stack.num_layers:
            part, j = origin[index]
            source_name = _LAYER_IN_NAME.sub(lambda m: f"{m.group(1)}{j}{m.group(3)}", name, count=1)
        else:  # before the layer stack: the first slice's model; after it: the last slice's
            part, source_name = (stack.slices[0] if position < first_layer else stack.slices[-1]), name
        param.copy_(sources[part.model][source_name])
    return model


def _stored_dtype(path: str) -> str:
    """The dtype a model's config declares (mergekit keeps stored dtypes when `dtype` is unset)."""
    from transformers import AutoConfig

    declared = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    return name if name in DTYPES else "float32"


def _canonical(dtype: str) -> str:
    return str(DTYPES[dtype]).removeprefix("torch.")


def _mergekit_names(message: str, models: ModelsConfig) -> str:
    """Name models by path in source-check messages (they speak of models.base / models.experts.i)."""
    for i, path in reversed(list(enumerate(models.experts))):
        message = message.replace(f"models.experts.{i}", f"model {path}")
    return message.replace("models.base", f"model {models.base}")


def _check_vocabulary(tokenizer: Any, reference: Any, path: str, source: str) -> None:
    if tokenizer.get_vocab() != reference.get_vocab():
        raise ModelMismatchError(f"{source}: tokenizer_source: the tokenizer of {path} has another vocabulary "
                                 f"than the merged models; expected the same vocabulary")


# -- writing: a recipe or a layer path as a mergekit config (what `evomerge export` writes) ---------

def mergekit_yaml(recipe: Recipe, config: RunConfig, parameter_names: list[str], trial: int) -> str:
    """A mergekit config for the recipe: per-model parameters as layer filters with a default."""
    experts = list(config.models.experts)
    layer_prefixes = _layer_prefixes(parameter_names, recipe.num_layers)
    models: list[dict[str, Any]] = []
    document: dict[str, Any] = {"merge_method": recipe.method}
    if not get_method(recipe.method).per_expert:  # one shared value (slerp's t): base and its one expert
        document["base_model"] = config.models.base
        document["models"] = [{"model": config.models.base}, {"model": experts[0]}]
        document["parameters"] = {"t": _values(recipe, "t", 0, layer_prefixes, parameter_names)}
    else:
        genes = next(iter(recipe.params.values()), {}).keys()
        for index, path in enumerate(experts):
            parameters = {gene: _values(recipe, gene, index, layer_prefixes, parameter_names) for gene in genes}
            models.append({"model": path, "parameters": parameters} if parameters else {"model": path})
        if get_method(recipe.method).needs_base:
            document["base_model"] = config.models.base
        document["models"] = models
    document["dtype"] = config.models.dtype
    # The exported folder carries the base's tokenizer; linear has no base_model to call "base".
    document["tokenizer_source"] = "base" if "base_model" in document else config.models.base
    header = f"# evomerge export of trial {trial} ({recipe.label or 'evolved'}), run seed {config.seed}\n"
    if get_method(recipe.method).random:
        header += (f"# {recipe.method} masks are random: mergekit draws its own, so its tensors match only in "
                   "distribution\n")
    return header + yaml.safe_dump(document, sort_keys=False)


def _values(recipe: Recipe, gene: str, expert: int, layer_prefixes: dict[int, str],
            parameter_names: list[str]) -> Any:
    """A scalar when every group agrees, else `[{filter: 'model.layers.i.', value}, ..., {value}]`."""
    if set(recipe.params) == {ALL}:
        return recipe.params[ALL][gene][expert]
    if recipe.modules is not None:
        return prefix_filters(parameter_names, lambda name: recipe.params[recipe.group(name)][gene][expert])
    entries = []
    for index, prefix in sorted(layer_prefixes.items()):
        group = group_of(prefix + "weight", recipe.granularity, recipe.num_layers)
        entries.append({"filter": prefix, "value": recipe.params[group][gene][expert]})
    entries.append({"value": recipe.params[EMBED_HEAD][gene][expert]})
    return entries


def prefix_filters(names: list[str], value_of: Callable[[str], float]) -> Any:
    """mergekit filters giving each tensor its value: a scalar when all agree, else a list.

    mergekit gives a tensor the value of the first entry whose filter is a substring of its name
    (an entry without a filter matches all). Walking the dotted names as a tree, a subtree whose
    tensors share one value is one entry (its prefix); a mixed one lists its exceptions first,
    then its prefix with its most common value. The last entry (the root's) is the default.
    A subtree whose most common value is its parent's needs no entry of its own. Every tensor is
    checked to get its own value; if one would not, the entries are whole names, longest first.
    """
    values = {name: value_of(name) for name in names}
    entries: list[tuple[str, float]] = []

    def visit(prefix: str, members: list[str], inherited: float | None) -> None:
        counts = Counter(values[name] for name in members)
        best = max(counts.values())
        common = inherited if counts.get(inherited) == best else next(v for v, c in counts.items() if c == best)
        children: dict[str, list[str]] = {}
        for name in members:
            children.setdefault(name[len(prefix):].split(".")[0], []).append(name)
        for component, group in children.items():
            if all(values[name] == common for name in group):
                continue
            child = prefix + component
            if group == [child]:
                entries.append((child, values[child]))
            else:
                visit(child + ".", group, common)
        if common != inherited:  # else the enclosing entry, which comes later, gives the same value
            entries.append((prefix, common))

    visit("", list(names), None)
    if len(entries) == 1:
        return entries[0][1]
    for name, value in values.items():
        if next(v for f, v in entries if f in name) != value:  # a filter matching elsewhere too
            # whole names, longest first: a name is matched by no earlier entry but its own
            entries = [*sorted(values.items(), key=lambda item: -len(item[0])), ("", entries[-1][1])]
            break
    return [{"filter": f, "value": v} for f, v in entries[:-1]] + [{"value": entries[-1][1]}]


def _layer_prefixes(names: list[str], num_layers: int) -> dict[int, str]:
    """Layer index -> tensor-name prefix that selects exactly that layer (e.g. 'model.layers.3.')."""
    prefixes: dict[int, str] = {}
    for name in names:
        index = layer_index(name)
        if index is not None and index < num_layers and index not in prefixes:
            marker = f".{index}."
            prefixes[index] = name[: name.index(marker) + len(marker)] if marker in name else f"{index}."
    return prefixes


def passthrough_yaml(flow: LayerPath, folders: Sequence[str | None], dtype: str, trial: int) -> str | None:
    """A mergekit `passthrough` config of `slices:` reproducing an unscaled path; None when it cannot
    (a scale other than 1, or a member without a folder such as the merged candidate)."""
    if any(step.scale != 1.0 for step in flow.path) or any(folders[s.model] is None for s in flow.path):
        return None
    if folders[0] is None:
        return None
    # mergekit takes the embeddings from the first slice's model and the final norm and head from
    # the last slice's: empty slices of the first model pin both to it.
    slices: list[dict[str, Any]] = [{"sources": [{"model": folders[0], "layer_range": [0, 0]}]}]
    for step in flow.path:
        last = slices[-1]["sources"][0] if slices else None
        if last is not None and last["model"] == folders[step.model] and last["layer_range"][1] == step.layer:
            last["layer_range"][1] += 1
        else:
            slices.append({"sources": [{"model": folders[step.model], "layer_range": [step.layer, step.layer + 1]}]})
    slices.append({"sources": [{"model": folders[0], "layer_range": [0, 0]}]})
    document = {"slices": slices, "merge_method": passthrough.method.name, "dtype": dtype}
    header = f"# evomerge export of trial {trial} (data-flow path of {len(flow.path)} layers)\n"
    return header + yaml.safe_dump(document, sort_keys=False)
