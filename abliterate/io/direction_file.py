"""The direction file: one artifact that carries a direction from extraction to every edit.

A .safetensors file with tensor ``direction`` of shape [d] (one direction for every layer) or
[num_layers + 1, d] (row 0 for the embedding output, row L + 1 for what layer L writes), and
string metadata (model, layer, position, hidden_size, command). Extraction may store more
tensors beside it (candidates); editing reads only ``direction``.

Several directions (a rank-k edit removes their span): metadata ``rank`` = k, and ``direction`` of shape
[k, d] (the same k directions for every layer) or [num_layers + 1, k, d]. The marker is what tells
[k, d] from [num_layers + 1, d]; a file without it is rank 1, read as before. The rows are made
orthonormal here, in float64, by Gram-Schmidt in their order (row 0 keeps its own direction, so the
rank-1 choice stays the first row); a set whose rows are (nearly) linearly dependent is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from abliterate.errors import AbliterateError
from abliterate.io.safetensors_format import read_header

DIRECTION_KEY = "direction"
RANK_KEY = "rank"
# a row keeping less than this fraction of its norm after removing the rows before it is "dependent"
DEPENDENT = 1e-4


@dataclass(frozen=True)
class Direction:
    """Unit direction(s) in float32, one row per residual stream position when per-layer; for rank k > 1,
    k orthonormal rows (per residual stream when per-layer)."""

    vectors: np.ndarray  # rank 1: [d] or [num_layers + 1, d]; rank k: [k, d] or [num_layers + 1, k, d]
    metadata: dict[str, str]
    path: Path | None = None
    rank: int = 1

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[-1]

    @property
    def per_layer(self) -> bool:
        return self.vectors.ndim == (2 if self.rank == 1 else 3)

    def for_layer(self, layer: int | None) -> np.ndarray:
        """What `layer` writes has removed (None: the embeddings): the unit direction [d], or for rank k the
        orthonormal rows [k, d] whose span is removed."""
        if not self.per_layer:
            return self.vectors
        return self.vectors[0 if layer is None else layer + 1]

    def leading(self, k: int) -> Direction:
        """The first k directions (their span is that of the file's first k rows); k = 1 is a rank-1 direction,
        identical to one saved alone."""
        if not 1 <= k <= self.rank:
            raise AbliterateError(f"asked for {k} directions but {self.path or 'the direction'} has {self.rank}")
        if k == self.rank:
            return self
        rows = self.vectors[..., 0, :] if k == 1 else self.vectors[..., :k, :]
        meta = {key: v for key, v in self.metadata.items() if key != RANK_KEY}
        return Direction(np.ascontiguousarray(rows), meta if k == 1 else {**meta, RANK_KEY: str(k)}, None, k)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Unit rows, normalised in float64 so that |r| = 1 to float32 precision."""
    v = np.asarray(vectors, dtype=np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def orthonormalise(rows: np.ndarray, where: str = "the directions") -> np.ndarray:
    """Orthonormal rows spanning the same space, by Gram-Schmidt in float64 (twice, for float64 accuracy) in
    the rows' order: row 0 is normalise(row 0) exactly. [.., k, d] -> float32 [.., k, d]."""
    v = np.asarray(rows, dtype=np.float64)
    flat = v.reshape(-1, v.shape[-2], v.shape[-1])
    out = np.empty_like(flat)
    for s, group in enumerate(flat):
        for i, row in enumerate(group):
            q = row / np.linalg.norm(row)
            for _ in range(2):
                q = q - out[s, :i].T @ (out[s, :i] @ q)
            kept = np.linalg.norm(q)
            if not kept > DEPENDENT:
                stream = f" (residual stream {s})" if len(flat) > 1 else ""
                raise AbliterateError(f"{where}: direction {i} lies (almost) in the span of the ones before it"
                                      f"{stream}, so the set is rank-deficient; drop it or re-extract with fewer "
                                      "directions")
            out[s, i] = q / kept
    return out.reshape(v.shape).astype(np.float32)


def as_numpy(t: object) -> np.ndarray:
    """Accept numpy arrays and torch tensors alike (torch is not imported here)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu().float().numpy()  # type: ignore[attr-defined]
    return np.ascontiguousarray(t)


def save_direction(path: str | Path, vectors: object, metadata: dict[str, object],
                   extra: dict[str, object] | None = None) -> None:
    """Write atomically (temp file, then rename) so a killed run never leaves a half file."""
    path = Path(path)
    vectors = as_numpy(vectors).astype(np.float32)
    meta = {k: str(v) for k, v in metadata.items() if v is not None}
    if RANK_KEY in meta and (vectors.ndim not in (2, 3) or str(vectors.shape[-2]) != meta[RANK_KEY]):
        raise ValueError(f"rank {meta[RANK_KEY]} does not match a direction of shape {list(vectors.shape)}")
    meta.setdefault("hidden_size", str(vectors.shape[-1]))
    tensors = {DIRECTION_KEY: vectors}
    tensors.update({k: as_numpy(v) for k, v in (extra or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_direction(path: str | Path, *, hidden_size: int | None = None,
                   num_layers: int | None = None) -> Direction:
    """Load and check a direction file against the model it is about to edit."""
    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"direction file {path} does not exist; make one with `abliterate extract`")
    header = read_header(path)  # clear errors for truncated or non-safetensors files
    names = [t.name for t in header.tensors]
    if DIRECTION_KEY not in names and "candidates" in names:
        raise AbliterateError(f"{path} holds extraction candidates but no chosen direction; choose one with "
                              f"`abliterate extract --reselect {path} --out direction.safetensors`")
    if DIRECTION_KEY not in names:
        raise AbliterateError(
            f"{path} has no tensor named {DIRECTION_KEY!r} (found: {', '.join(names) or 'none'}); "
            "pass a file written by `abliterate extract`"
        )
    with safe_open(str(path), framework="np") as f:
        vectors = f.get_tensor(DIRECTION_KEY)
    metadata = dict(header.metadata or {})
    rank = _rank(path, vectors.shape, metadata)
    if rank == 1 and RANK_KEY in metadata:  # [1, d] or [layers + 1, 1, d]: a rank-1 direction
        vectors = vectors[..., 0, :]
    if vectors.dtype.kind != "f" or not np.isfinite(vectors).all():
        raise AbliterateError(f"{path}: direction contains NaN/inf or is not floating point; re-extract it")
    if (np.linalg.norm(vectors.astype(np.float64), axis=-1) == 0).any():
        raise AbliterateError(f"{path}: direction has a zero row; re-extract it")
    source = f" (extracted from {metadata['model']})" if "model" in metadata else ""
    if hidden_size is not None and vectors.shape[-1] != hidden_size:
        raise AbliterateError(
            f"{path}: direction has hidden size {vectors.shape[-1]} but the model has {hidden_size}{source}; "
            "use a direction extracted from this model"
        )
    per_layer = vectors.ndim == (2 if rank == 1 else 3)
    if num_layers is not None and per_layer and vectors.shape[0] != num_layers + 1:
        raise AbliterateError(
            f"{path}: per-layer direction has {vectors.shape[0]} rows but the model has {num_layers} layers "
            f"(needs {num_layers + 1}: embedding + one per layer){source}"
        )
    if rank == 1:
        return Direction(normalise(vectors), metadata, path)
    return Direction(orthonormalise(vectors, str(path)), metadata, path, rank)


def refuse_several(path: str | Path, metadata: dict[str, str] | None, what: str) -> None:
    """For readers that take one direction per residual stream (probe, steering, control vectors): a rank-k
    file's [k, d] must not pass for [layers + 1, d]."""
    rank = (metadata or {}).get(RANK_KEY)
    if rank not in (None, "1"):
        raise AbliterateError(f"{path} holds {rank} directions (metadata rank = {rank}); {what} takes one direction "
                              "per residual stream: pass a rank-1 direction file (e.g. from `abliterate extract` "
                              "without --directions)")


def _rank(path: Path, shape: tuple[int, ...], metadata: dict[str, str]) -> int:
    """k from the `rank` marker (1 without it), checked against the tensor's shape."""
    if shape and shape[-1] == 0:
        raise AbliterateError(f"{path}: direction has shape {list(shape)}; its rows are empty")
    if RANK_KEY not in metadata:
        if len(shape) not in (1, 2):
            raise AbliterateError(f"{path}: direction has shape {list(shape)} but no `rank` metadata; expected [d] "
                                  "or [layers + 1, d], or with rank = k in the metadata [k, d] or [layers + 1, k, d]")
        return 1
    try:
        rank = int(metadata[RANK_KEY])
    except ValueError:
        rank = 0
    if rank < 1 or len(shape) not in (2, 3) or shape[-2] != rank:
        raise AbliterateError(f"{path}: metadata rank = {metadata[RANK_KEY]!r} but direction has shape {list(shape)}; "
                              f"a rank-k file holds [k, d] or [layers + 1, k, d] with k = rank")
    return rank


class RankDeficientError(AbliterateError):
    """Directions that span fewer dimensions than their count (e.g. once the harmless mean is projected out)."""


def project_out(rows: np.ndarray, h: np.ndarray, where: str) -> np.ndarray:
    """Orthonormal rows [k, d] spanning what the rows' span keeps orthogonal to the unit vector h: each row with h
    projected out, then Gram-Schmidt in order (row 0 becomes unit(r0 - (r0.h) h)). For orthonormal rows Q the
    projected set's smallest singular value is sqrt(1 - |Q h|^2): when h lies (almost) in the span a direction is
    lost, and the set is refused (RankDeficientError) rather than completed with rounding noise."""
    q = orthonormalise(rows, where).astype(np.float64)
    inside = float(np.linalg.norm(q @ h))  # |Q h|: how much of h the span holds
    message = (f"{where}: the harmless mean lies (almost) in the span of its {len(q)} directions, so making them "
               f"orthogonal to it leaves {len(q) - 1}: the set is rank-deficient; drop --biproject, or use fewer "
               "directions")
    if not np.sqrt(max(0.0, 1.0 - inside**2)) > DEPENDENT:
        raise RankDeficientError(message)
    try:
        return orthonormalise(q - np.outer(q @ h, h), where)
    except AbliterateError:
        raise RankDeficientError(message) from None


def biproject(direction: Direction) -> Direction:
    """The direction made orthogonal to the harmless mean at its own layer and position (what the search's
    "projected" variant does): r' = unit(r - (r.h) h), h the unit harmless mean that extraction saved; for k
    directions their span made orthogonal to h (`project_out`), refused when that loses a direction."""
    where = direction.path or "the direction"
    if direction.per_layer:
        raise AbliterateError(f"{where}: biprojection needs one direction [d] or one set [k, d], not one per layer")
    try:
        layer, position = int(direction.metadata["layer"]), int(direction.metadata["position"])
        with safe_open(str(direction.path), framework="np") as f:
            means = f.get_tensor("harmless_mean") if "harmless_mean" in f.keys() else None
        h = np.asarray(means[layer, position], dtype=np.float64)  # type: ignore[index]
    except (KeyError, TypeError, ValueError, IndexError, OSError):
        raise AbliterateError(f"{where} has no harmless mean at its layer and position (saved by `abliterate "
                              "extract`); biprojection needs the file extraction wrote") from None
    if not np.isfinite(h).all() or not np.linalg.norm(h):
        raise AbliterateError(f"{where}: the harmless mean at layer {layer} is zero or not finite; re-extract it")
    h /= np.linalg.norm(h)
    metadata = {**direction.metadata, "biprojected": "true"}
    if direction.rank > 1:
        return Direction(project_out(direction.vectors, h, f"{where} (--biproject)"), metadata, None, direction.rank)
    r = direction.vectors.astype(np.float64)
    projected = r - (r @ h) * h
    return Direction(normalise(projected), metadata, None)


def check_output_file(path: str | Path, example: str = "direction.safetensors") -> None:
    """Checked before the model is loaded, so a bad --out does not cost a whole extraction."""
    path = Path(path)
    if path.is_dir():
        raise AbliterateError(f"--out {path} is a folder; give the file's name, e.g. {path / example}")
    if path.parent.exists() and not path.parent.is_dir():
        raise AbliterateError(f"--out {path}: {path.parent} is a file, not a folder; choose another --out")
