"""The source models of a run: where they live, whether they can be merged, how to load them.

`check_sources` runs in the driver before any worker starts: it reads each model's config,
tokenizer vocabulary and tensor names/shapes (from the config on the meta device, so it costs
no weights) and refuses incompatible sources with the field or tensor named.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch

from evomerge.config import ModelsConfig
from evomerge.errors import ConfigError, ModelMismatchError

logger = logging.getLogger(__name__)

ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "intermediate_size", "tie_word_embeddings")


@dataclass(frozen=True)
class SourceInfo:
    num_layers: int
    tied_embeddings: bool
    shapes: dict[str, tuple[int, ...]]  # parameter name -> shape (tied duplicates removed)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():  # GPU-only branch guard
        raise ConfigError("models.device: 'cuda' asked for but torch sees no CUDA device")
    return torch.device(name)


def field_names(models: ModelsConfig) -> list[str]:
    return ["models.base", *[f"models.experts.{i}" for i in range(len(models.experts))]]


# A folder holding any of these has a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def has_tokenizer(path: str) -> bool:
    """False for a local folder without any tokenizer file (a hub id is assumed to have one)."""
    folder = Path(path)
    return not folder.is_dir() or any((folder / name).exists() for name in TOKENIZER_FILES)


def folder_like(path: str) -> bool:
    """A model path that can only mean a local folder: ./ ../ / ~, more than one slash, a trailing
    slash, or a first component that is a local folder (a Hugging Face id is `org/name`)."""
    text = str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or text.endswith("/"):
        return True
    return "/" in text and Path(text.split("/")[0]).is_dir()


def check_sources(models: ModelsConfig, tokenizers: bool = True) -> SourceInfo:
    """Refuse sources that cannot be merged, naming the field or tensor; return what the genome needs.
    `tokenizers=False` (a plain merge of tokenizer-less folders) skips the vocabulary check."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if models.trust_remote_code:
        logger.warning("models.trust_remote_code is on: the workers will run model code shipped with %s",
                       ", ".join(models.sources))
    configs, vocabs, shapes = [], [], []
    for field, path in zip(field_names(models), models.sources):
        if folder_like(path) and not Path(path).expanduser().is_dir():
            raise ModelMismatchError(f"{field}: no local folder {str(Path(path).expanduser().resolve())!r} "
                                     f"(not looked up on the Hugging Face hub: the path names a folder)")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=models.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad folder
            local = "" if Path(path).is_dir() else f"no local folder {str(Path(path).resolve())!r}, and "
            raise ModelMismatchError(f"{field}: cannot read the model config of {path!r} ({local}"
                                     f"{_first_line(exc)})") from None
        try:
            tokenizer = (AutoTokenizer.from_pretrained(path, trust_remote_code=models.trust_remote_code)
                         if tokenizers else None)
            vocabs.append(tokenizer.get_vocab() if tokenizer is not None else None)
        except Exception as exc:  # noqa: BLE001
            raise ModelMismatchError(f"{field}: cannot load the tokenizer of {path!r} ({_first_line(exc)})") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=models.trust_remote_code)
        configs.append(config)
        shapes.append({name: tuple(p.shape) for name, p in model.named_parameters()})
        shapes[-1].update(_file_shapes(Path(path)) if Path(path).is_dir() else {})

    base_field, base_config = "models.base", configs[0]
    for field, config, vocab, shape in zip(field_names(models)[1:], configs[1:], vocabs[1:], shapes[1:]):
        for key in ARCH_FIELDS:
            ours, theirs = getattr(base_config, key, None), getattr(config, key, None)
            if ours != theirs:
                raise ModelMismatchError(f"{field}: config.{key} is {theirs!r} but {base_field} has {ours!r}")
        if vocab != vocabs[0]:
            differing = sorted(set(vocab.items()) ^ set(vocabs[0].items()))[:3]
            raise ModelMismatchError(f"{field}: tokenizer vocabulary differs from {base_field} "
                                     f"(e.g. {differing}); merged models need one vocabulary")
        _compare_shapes(field, shape, shapes[0])
    if models.check_finite:
        for field, path in zip(field_names(models), models.sources):
            if Path(path).is_dir():
                _check_finite(field, Path(path))
    num_layers = int(getattr(base_config, "num_hidden_layers"))
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config, trust_remote_code=models.trust_remote_code)
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return SourceInfo(num_layers=num_layers, tied_embeddings=tied, shapes=params)


def _file_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes as stored in the folder's safetensors files (prefixed 'file:' to keep them apart)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[f"file:{key}"] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _check_finite(field: str, folder: Path) -> None:
    """Refuse a source with NaN or inf weights, naming the tensor (reads each file once, memory-mapped).
    A finite sum proves every value finite (a NaN or inf makes any sum NaN or inf) at a tenth of
    `isfinite`'s cost; only a sum that is not finite (an overflow, or a bad value) is checked value by value."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if (tensor.is_floating_point() and not torch.isfinite(tensor.sum())
                        and not torch.isfinite(tensor).all()):
                    raise ModelMismatchError(f"{field}: tensor {key!r} in {file.name} has non-finite values "
                                             f"(NaN or inf)")


def require_same_shapes(reference: Mapping[str, Sequence[int]], other: Mapping[str, Sequence[int]],
                        messages: Mapping[str, str], order: Sequence[str] | None = None) -> None:
    """Raise ModelMismatchError at the first tensor name where `other` differs from `reference`:
    `messages["missing"]` (only in reference), `["extra"]` (only in other) or `["shape"]`, each
    formatted with `name` (without a `file:` prefix), `ours` (reference's shape) and `theirs`
    (other's). Names are checked in `order` (default: sorted)."""
    for name in order if order is not None else sorted(set(reference) | set(other)):
        how = "missing" if name not in other else "extra" if name not in reference else (
            "shape" if tuple(reference[name]) != tuple(other[name]) else None)
        if how is not None:
            shown = name.removeprefix("file:")
            raise ModelMismatchError(messages[how].format(name=shown, ours=list(reference.get(name, ())),
                                                          theirs=list(other.get(name, ()))))


def _compare_shapes(field: str, theirs: dict[str, tuple[int, ...]], ours: dict[str, tuple[int, ...]]) -> None:
    require_same_shapes(ours, theirs, {
        "missing": f"{field}: tensor {{name!r}} is missing (models.base has it)",
        "extra": f"{field}: extra tensor {{name!r}} (models.base has none)",
        "shape": f"{field}: tensor {{name!r}} has shape {{theirs}}, models.base has {{ours}}"})


def mapped_parameters(path: str, shapes: Mapping[str, tuple[int, ...]],
                      dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The named tensors of a local safetensors folder, memory-mapped rather than read.

    safetensors' `get_tensor` returns a CPU tensor backed by a private mapping of the file, so a
    source costs no memory until its pages are read, and the OS may drop them again under
    pressure. A tensor stored in another dtype than `dtype` is converted (a copy), as
    `from_pretrained` would. Returns None when the folder is not local, holds no safetensors, or
    lacks a name or shape the model has (e.g. keys renamed at load time): the caller then loads
    the model itself.
    """
    from safetensors import safe_open

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key in shapes and key not in tensors:
                    tensors[key] = handle.get_tensor(key)
    if set(tensors) != set(shapes) or any(tuple(t.shape) != shapes[k] for k, t in tensors.items()):
        return None
    return {name: t if t.dtype == dtype else t.to(dtype) for name, t in tensors.items()}


def spread_over_gpus(device: torch.device, gpus_per_worker: float) -> bool:
    """True when a worker holds more than one GPU: its model is then spread over them."""
    return device.type == "cuda" and gpus_per_worker > 1 and torch.cuda.device_count() > 1


def source_parameters(path: str, shapes: Mapping[str, tuple[int, ...]], models: ModelsConfig,
                      device: torch.device, placement: Mapping[str, torch.device] | None = None,
                      ) -> dict[str, torch.Tensor]:
    """One source's parameters by the model's names: memory-mapped where possible, else loaded.

    On a GPU the tensors are copied to the device once, here (GPU-only branch); with a
    `placement` (a model spread over several GPUs) each goes to its parameter's device. On the
    CPU the mapped tensors are used as they are.
    """
    tensors = mapped_parameters(path, shapes, torch_dtype(models.dtype))
    if tensors is None:
        logger.info("%s: parameters not readable straight from safetensors; loading the model", path)
        model = load_model(path, models, torch.device("cpu"))
        tensors = {name: p.detach() for name, p in model.named_parameters()}
        del model
    if placement is not None:  # GPU-only branch: each tensor where its parameter is
        tensors = {name: t.to(placement[name]) for name, t in tensors.items()}
    elif device.type != "cpu":  # GPU-only branch: one copy per worker, reused for every merge
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors


def load_model(path: str, models: ModelsConfig, device: torch.device, spread: bool = False):
    """Load one source as a causal LM on `device` in the configured dtype, in eval mode; with
    `spread`, over every GPU the process sees (accelerate's device map "auto", layers split
    between them: a model too large for one GPU; GPU-only branch)."""
    from transformers import AutoModelForCausalLM

    if models.trust_remote_code:
        logger.warning("trust_remote_code is on: running the model code shipped with %s", path)
    if spread:  # GPU-only branch
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(models.dtype), device_map="auto",
                                                    trust_remote_code=models.trust_remote_code).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(models.dtype),
                                                 trust_remote_code=models.trust_remote_code)
    return model.to(device).eval()


def load_tokenizer(path: str, models: ModelsConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=models.trust_remote_code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
