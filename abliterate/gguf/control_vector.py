"""Steering vectors (or an extracted direction) as a llama.cpp control vector GGUF.

llama.cpp's convention, read from its source (common/common.cpp `common_control_vector_load_one`,
src/llama-adapter.cpp `llama_adapter_cvec`, and each model graph's `build_cvec(cur, il)` after the
block's residual add): a tensor `direction.N` (F32, 1-D, n_embd) is added to the residual stream
leaving decoder block N, N counted from 0 like our layers; `direction.0` is refused by the loader
(block 0's output is never steered) and `--control-vector-scaled FILE S` multiplies the tensor by S.
`steer chat --layer L` adds coeff x vectors[L + 1] to the residual stream leaving layer L, so
`direction.L` = coeff x vectors[L + 1] steers the same layer by the same amount. The difference:
llama.cpp adds it at every position, the prompt's included (as `steer bake` does), while `steer chat`
starts at the assistant header. The file carries llama.cpp's `controlvector` metadata (architecture,
model hint, layer count) as its cvector-generator writes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from abliterate.errors import AbliterateError
from abliterate.gguf.edit import atomic_file
from abliterate.gguf.format import _gguf
from abliterate.options.values import TO_THE_END

VECTORS_KEY = "direction"


@dataclass(frozen=True)
class ControlVector:
    out: Path
    layers: tuple[int, ...]
    norms: tuple[float, ...]


def read_vectors(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """The stored vectors ([layers + 1, d] or one [d]) and metadata, unnormalised as `steer chat` uses them."""
    from safetensors import safe_open

    from abliterate.io.direction_file import refuse_several
    from abliterate.io.safetensors_format import read_header

    if not path.is_file():
        raise AbliterateError(f"vectors file {path} does not exist; make one with `abliterate steer vectors` or "
                              "`abliterate extract`")
    header = read_header(path)
    if VECTORS_KEY not in [t.name for t in header.tensors]:
        raise AbliterateError(f"{path} has no tensor {VECTORS_KEY!r}; pass a file from `abliterate steer vectors` or "
                              "`abliterate extract`")
    refuse_several(path, header.metadata, "a control vector")
    with safe_open(str(path), framework="np") as f:
        vectors = f.get_tensor(VECTORS_KEY)
    if vectors.ndim not in (1, 2) or vectors.dtype.kind != "f" or not np.isfinite(vectors).all():
        raise AbliterateError(f"{path}: {VECTORS_KEY} has shape {list(vectors.shape)} or holds NaN/inf; expected "
                              "finite [layers + 1, d] or [d]")
    return vectors.astype(np.float32), dict(header.metadata or {})


def export_control_vector(vectors_path: Path, coeff: float, layers: range, out: Path, *,
                          overwrite: bool = False) -> ControlVector:
    """Write `direction.L` = coeff x the vector for layer L (row L + 1, or the single [d] vector)."""
    if not math.isfinite(coeff):
        raise AbliterateError(f"--coeff {coeff} is not a finite number; use e.g. 4 (toward the behaviour) or -4")
    vectors, metadata = read_vectors(Path(vectors_path))
    if vectors.ndim == 2:
        chosen = range(vectors.shape[0] - 1)[layers.start : layers.stop]
        if not chosen:
            raise AbliterateError(f"--layers selects no layer of {vectors_path}, which has vectors for layers 0 to "
                                  f"{vectors.shape[0] - 2}")
        layers = chosen
    elif layers.stop >= TO_THE_END:
        raise AbliterateError("a single [d] direction has no layer count: give --layers START:END with an END")
    if layers.start < 1:
        raise AbliterateError("llama.cpp never steers the output of layer 0 (its loader refuses direction.0): "
                              "start --layers at 1 or later")
    gguf = _gguf()
    rows = {layer: (vectors[layer + 1] if vectors.ndim == 2 else vectors) * np.float32(coeff) for layer in layers}
    with atomic_file(Path(out), overwrite=overwrite) as tmp:
        writer = gguf.GGUFWriter(tmp, "controlvector")
        writer.add_string("controlvector.model_hint", metadata.get("model", "unknown"))
        writer.add_int32("controlvector.layer_count", len(rows))
        for layer, row in rows.items():
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(row, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return ControlVector(Path(out), tuple(rows), tuple(float(np.linalg.norm(v)) for v in rows.values()))
