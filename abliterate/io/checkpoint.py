"""A Hugging Face model folder on disk: config, safetensors shards, index, and the other files.

Opening a checkpoint reads only config.json, the index and each shard's header, and validates
all of them up front, so a broken input fails before any output is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from abliterate.errors import AbliterateError
from abliterate.io.json_files import read_json_object
from abliterate.io.safetensors_format import ShardHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weights in other formats would be stale, unedited copies in the output: never carried over.
FOREIGN_WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")
NOT_COPIED = {"README.md"}  # the base model's card describes weights we changed
SKIPPED_DIRS = {".git", ".cache", ".huggingface"}
HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


@dataclass(frozen=True)
class Checkpoint:
    """A validated model folder. `tensors` maps each tensor name to its shard file name and entry."""

    root: Path
    config: dict
    index_bytes: bytes | None
    shards: tuple[str, ...]
    headers: dict[str, ShardHeader]
    tensors: dict[str, tuple[str, TensorInfo]]

    @classmethod
    def open(cls, root: str | Path) -> Checkpoint:
        root = Path(root)
        if not root.is_dir():
            raise AbliterateError(f"{root} is not a folder; pass a local model folder (config.json + shards)")
        config = _read_config(root)
        index_bytes, shards = _find_shards(root)
        headers = {name: read_header(root / name) for name in shards}
        tensors: dict[str, tuple[str, TensorInfo]] = {}
        for shard, header in headers.items():
            for info in header.tensors:
                if info.name in tensors:
                    raise AbliterateError(
                        f"tensor {info.name} appears in both {tensors[info.name][0]} and {shard}; "
                        "the checkpoint is inconsistent: re-download it"
                    )
                tensors[info.name] = (shard, info)
        if index_bytes is not None:
            _check_index_matches(root, json.loads(index_bytes)["weight_map"], tensors)
        return cls(root, config, index_bytes, shards, headers, tensors)

    @property
    def text_config(self) -> dict:
        """The language model's config (multimodal configs nest it under text_config)."""
        return self.config.get("text_config") or self.config

    @property
    def tied_flag(self) -> bool | None:
        """tie_word_embeddings as transformers reads it: a multimodal model's own (outer) flag, which governs its
        lm_head, else its language model's; None when neither config states it."""
        if "tie_word_embeddings" in self.config:
            return self.config["tie_word_embeddings"]
        return self.text_config.get("tie_word_embeddings")

    @property
    def hidden_size(self) -> int:
        return _first_int(self.text_config, HIDDEN_SIZE_KEYS, self.root, "hidden size")

    @property
    def num_layers(self) -> int:
        # Nemotron-H's config.json may give only its layer pattern: a list of layer kinds, or a string, one per layer
        for key in ("layers_block_type", "hybrid_override_pattern"):
            pattern = self.text_config.get(key)
            if not any(k in self.text_config for k in NUM_LAYERS_KEYS) and isinstance(pattern, (list, str)):
                return len(pattern)
        return _first_int(self.text_config, NUM_LAYERS_KEYS, self.root, "number of layers")

    def other_files(self) -> tuple[list[Path], list[Path]]:
        """(files to copy as they are, files deliberately left out), relative to the root."""
        copied, skipped = [], []
        own = {*self.shards, INDEX_NAME}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if rel.parts[0] in SKIPPED_DIRS or (rel.parts[0].startswith(".") and "abliterate-" in rel.parts[0]):
                continue
            if not path.is_file() or str(rel) in own:
                continue
            if path.name.endswith(FOREIGN_WEIGHT_SUFFIXES) or str(rel) in NOT_COPIED:
                skipped.append(rel)
            else:
                copied.append(rel)
        return copied, skipped


def _read_config(root: Path) -> dict:
    return read_json_object(root / "config.json", f"{root} has no config.json; pass a Hugging Face model folder",
                            "re-download it")


def _find_shards(root: Path) -> tuple[bytes | None, tuple[str, ...]]:
    index_path = root / INDEX_NAME
    if index_path.is_file():
        raw = index_path.read_bytes()
        try:
            weight_map = json.loads(raw)["weight_map"]
            assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        except (ValueError, KeyError, TypeError, AssertionError):
            raise AbliterateError(f"{index_path} is not a valid index (no weight_map); re-download it") from None
        shards = tuple(dict.fromkeys(weight_map.values()))
        for tensor, shard in weight_map.items():
            if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise AbliterateError(
                    f"{index_path}: weight_map entry for {tensor} points outside the folder ({shard!r}); "
                    "the index is corrupt or unsafe: re-download the checkpoint"
                )
        for shard in shards:
            if not (root / shard).is_file():
                raise AbliterateError(
                    f"shard {shard} named in {index_path.name} is missing from {root}; re-download the checkpoint"
                )
        return raw, shards
    if (root / SINGLE_NAME).is_file():
        return None, (SINGLE_NAME,)
    found = sorted(p.name for p in root.glob("*.safetensors"))
    if len(found) == 1:
        return None, (found[0],)
    if found:
        raise AbliterateError(
            f"{root} has {len(found)} .safetensors files but no {INDEX_NAME}; add the index that maps tensors "
            "to shards (transformers needs it too)"
        )
    pickles = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AbliterateError(
            f"{root} holds only PyTorch pickle weights ({', '.join(pickles[:3])}); abliterate never loads pickles "
            "because they can run arbitrary code: convert the model to safetensors first"
        )
    raise AbliterateError(f"{root} has no .safetensors weights; pass a folder with model*.safetensors")


def _check_index_matches(root: Path, weight_map: dict[str, str], tensors: dict) -> None:
    for tensor, shard in weight_map.items():
        if tensor not in tensors or tensors[tensor][0] != shard:
            raise AbliterateError(
                f"{INDEX_NAME} in {root} says {tensor} is in {shard}, but that shard has no such tensor; "
                "index and shards disagree: re-download the checkpoint"
            )


def _first_int(config: dict, keys: tuple[str, ...], root: Path, what: str) -> int:
    for key in keys:
        if isinstance(config.get(key), int):
            return config[key]
    raise AbliterateError(f"{root}/config.json has no {what} (looked for {', '.join(keys)})")
