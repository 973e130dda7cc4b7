"""Hugging Face model folders read and written as files: config.json, safetensors, tokenizer files.

`evomerge merge` of local safetensors folders needs no model object: the merge reads the
sources' tensors memory-mapped, writes each result into its own output tensor and saves them
with safetensors, and the folder's config, generation config and tokenizer are copied. Without
transformers' import, model construction and `save_pretrained`, a merge costs its reads, its
arithmetic and its writes. The checks are those of `sources.check_sources`, read from the files:
the architecture fields of config.json, every tensor's name and shape from the safetensors
headers, and the tokenizer files (identical bytes, or else the vocabularies compared through
transformers).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from evomerge.errors import ModelMismatchError
from evomerge.models.sources import ARCH_FIELDS, TOKENIZER_FILES, _compare_shapes

logger = logging.getLogger(__name__)

# What a copied tokenizer consists of: the files that make one, and those that go with them.
COPIED_TOKENIZER_FILES = (*TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "added_tokens.json",
                          "chat_template.jinja")
SHARD_BYTES = 5 * 2**30  # as save_pretrained: files of at most 5 GiB, with an index beyond one


@dataclass(frozen=True)
class Folder:
    """A local model folder: its config.json and the name -> shape of every stored tensor."""

    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]

    @property
    def num_layers(self) -> int:
        return int(self.config.get("num_hidden_layers") or self.config.get("text_config", {}).get("num_hidden_layers"))


def read_folder(path: str) -> Folder | None:
    """The folder's config and tensor shapes, or None when it is not a local folder of safetensors
    with a config.json (a hub id, .bin weights: the caller takes the transformers path)."""
    from safetensors import safe_open

    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files or not (folder / "config.json").is_file():
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes.setdefault(key, tuple(handle.get_slice(key).get_shape()))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict) or config.get("num_hidden_layers") is None:
        return None
    return Folder(folder, config, shapes)


def check_folders(folders: list[Folder], fields: list[str]) -> None:
    """Refuse folders that cannot be merged with the first, naming the field or tensor (the
    messages of `sources.check_sources`)."""
    base = folders[0]
    for field, folder in zip(fields[1:], folders[1:]):
        for key in ARCH_FIELDS:
            ours, theirs = base.config.get(key), folder.config.get(key)
            if ours != theirs:
                raise ModelMismatchError(f"{field}: config.{key} is {theirs!r} but {fields[0]} has {ours!r}")
        _compare_shapes(field, folder.shapes, base.shapes)


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in COPIED_TOKENIZER_FILES if (folder / name).is_file()]


def same_tokenizer_files(a: Path, b: Path) -> bool:
    """True when both folders hold the same tokenizer files with the same bytes."""
    files_a, files_b = tokenizer_files(a), tokenizer_files(b)
    return ([f.name for f in files_a] == [f.name for f in files_b]
            and all(x.read_bytes() == y.read_bytes() for x, y in zip(files_a, files_b)))


def write_folder(out: Path, tensors: Mapping[str, torch.Tensor], skeleton: Folder, dtype: str,
                 tokenizer: Path | None) -> None:
    """A Hugging Face folder: the tensors (safetensors, sharded past 5 GiB), the skeleton's config
    with `dtype`, its generation config, and the tokenizer files of `tokenizer` (if any)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        index = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            index.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n")
    config = dict(skeleton.config)
    for key in ("dtype", "torch_dtype"):  # transformers 5 reads `dtype`, 4.x `torch_dtype`
        if key in config or key == "dtype":
            config[key] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (skeleton.path / "generation_config.json").is_file():
        shutil.copyfile(skeleton.path / "generation_config.json", out / "generation_config.json")
    for file in tokenizer_files(tokenizer) if tokenizer is not None else []:
        shutil.copyfile(file, out / file.name)
