"""Projections of the residual stream on a direction, per prompt, layer and position (`abliterate probe`).

A direction says something about a model only through what its activations do along it: the
refusal direction should be large on harmful prompts and small on harmless ones at the layer it
was chosen at; a jailbreak should lower the harmfulness projection. This module measures that for
any direction file (refusal, harmfulness, a jailbreak vector, a steering vector), at the
instruction's last token and at every post-instruction position (what the chat template adds after
the user's message), at every residual stream (row i: entering decoder layer i; the last row:
after the last layer).

Per-prompt projections are kept (a float per prompt, layer and position), so callers can compare
distributions, not only means: whether the projection separates two sets, or which prompts of a
set a jailbreak succeeded on.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from abliterate.errors import AbliterateError
from abliterate.measure.activations import decoder
from abliterate.measure.batching import Batch, batches, run_fitting
from abliterate.measure.hooks import capture_residuals
from abliterate.measure.loading import LoadedModel
from abliterate.measure.templates import post_instruction_count, post_instruction_suffix, render

DIRECTION_KEY = "direction"
VECTOR_PREFIX = "vector."  # per-class tensors of a jailbreak vectors file: vector.<class>


def load_probe_direction(path: str | Path, *, hidden_size: int, num_layers: int,
                         name: str | None = None) -> np.ndarray:
    """Unit rows [num_layers + 1, d] from any direction or vectors file; a zero row (e.g. the embedding row of
    a vector measured at the same tokens) stays zero and its projections are reported as 0.

    name: a class of a jailbreak vectors file (tensor ``vector.NAME``); default the file's ``direction``.
    """
    from safetensors import safe_open

    from abliterate.io.direction_file import refuse_several
    from abliterate.io.safetensors_format import read_header

    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"direction file {path} does not exist; pass a file from `abliterate extract`, "
                              "`abliterate steer vectors` or `abliterate jailbreak vectors`")
    names = [t.name for t in read_header(path).tensors]
    key = DIRECTION_KEY if name is None else VECTOR_PREFIX + name
    if key not in names:
        classes = sorted(n[len(VECTOR_PREFIX):] for n in names if n.startswith(VECTOR_PREFIX))
        hint = f" (its classes: {', '.join(classes)})" if classes else ""
        what = f"no class {name!r}{hint}" if name is not None else f"no tensor {DIRECTION_KEY!r}"
        raise AbliterateError(f"{path} has {what}; pass a direction file or a class it holds")
    with safe_open(str(path), framework="np") as f:
        vectors = f.get_tensor(key)
        model = (f.metadata() or {}).get("model")
        refuse_several(path, f.metadata(), "probe")
    source = f" (made from {model})" if model else ""
    if vectors.dtype.kind != "f" or not np.isfinite(vectors).all():
        raise AbliterateError(f"{path}: the direction contains NaN/inf or is not floating point; rebuild it")
    if vectors.shape[-1] != hidden_size or vectors.ndim not in (1, 2) or \
            (vectors.ndim == 2 and vectors.shape[0] != num_layers + 1):
        raise AbliterateError(f"{path}: the direction has shape {list(vectors.shape)} but this model needs "
                              f"[{hidden_size}] or [{num_layers + 1}, {hidden_size}]{source}; use a direction made "
                              "from this model")
    rows = np.tile(vectors, (num_layers + 1, 1)) if vectors.ndim == 1 else vectors
    rows = rows.astype(np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    if not norms.any():
        raise AbliterateError(f"{path}: the direction is zero everywhere; rebuild it")
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0).astype(np.float32)


@dataclass(frozen=True)
class Projections:
    """values[n, i, j]: prompt n's residual stream i projected on row i, at position j (0: the instruction's
    last token, 1..k: the post-instruction tokens, in order)."""

    values: np.ndarray  # [prompts, num_layers + 1, 1 + k]

    @property
    def mean(self) -> np.ndarray:
        return self.values.mean(axis=0)

    @property
    def post_instruction(self) -> np.ndarray:
        """[prompts, num_layers + 1]: the mean over the post-instruction positions."""
        return self.values[:, :, 1:].mean(axis=-1)


def post_positions(lm: LoadedModel, prompts: Sequence[str], template: str | None = None,
                   **template_kwargs) -> int:
    """How many post-instruction tokens every rendered prompt ends with (k)."""
    suffix = post_instruction_suffix(lm.tokenizer, template, **template_kwargs)
    return post_instruction_count(lm.tokenizer, list(prompts), suffix)


def project(lm: LoadedModel, instructions: Sequence[str], units: np.ndarray, *, template: str | None = None,
            batch_size: int = 16, desc: str = "probe", quiet: bool = False, positions: int | None = None,
            **template_kwargs) -> Projections:
    """Render each instruction with the chat template and project its last 1 + k residual positions on `units`.

    positions: k, the post-instruction tokens to keep (default: as many as every prompt has).
    """
    if not instructions:
        raise AbliterateError("no prompts to probe")
    prompts = [render(lm.tokenizer, t, template, **template_kwargs) for t in instructions]
    k = post_positions(lm, prompts, template, **template_kwargs) if positions is None else positions
    r = torch.from_numpy(np.asarray(units, dtype=np.float32))
    out = torch.zeros(len(prompts), lm.num_layers + 1, 1 + k, dtype=torch.float64)
    rows: list[int] = []

    def sink(i: int, hidden: torch.Tensor) -> None:
        tail = hidden[:, -(1 + k):, :].float()
        out[rows, i] = (tail @ r[i].to(tail.device)).to("cpu", torch.float64)

    def step(batch: Batch) -> None:  # a retried piece overwrites every value a failed try wrote for its rows
        rows[:] = batch.indices
        decoder(lm)(**batch.inputs(), use_cache=False)

    with capture_residuals(lm.model, lm.arch, sink), torch.inference_mode(), \
            tqdm(total=len(prompts), desc=desc, unit="prompt", disable=quiet, leave=False) as bar:
        run_fitting(lm, list(batches(lm, prompts, batch_size)), step, progress=bar.update)  # OOM: halved
    return Projections(out.numpy())


def separation(high: np.ndarray, low: np.ndarray) -> float:
    """The share of (high, low) pairs ordered high > low (the ROC AUC): 1 separates completely, 0.5 not at all."""
    high, low = np.asarray(high, dtype=np.float64), np.asarray(low, dtype=np.float64)
    greater = (high[:, None] > low[None, :]).sum() + 0.5 * (high[:, None] == low[None, :]).sum()
    return float(greater / (high.size * low.size))


def format_table(results: dict[str, Projections]) -> str:
    """Per residual stream (row i: entering decoder layer i, as `extract` counts layers; 0: the embeddings, the
    last: after the last layer), each set's mean projection at the instruction's last token and over the
    post-instruction tokens."""
    names = list(results)
    width = max(9, *(len(n) + 6 for n in names))
    head = "resid" + "".join(f" {n + ':inst':>{width}} {n + ':post':>{width}}" for n in names)
    rows = [head]
    layers = next(iter(results.values())).values.shape[1]
    for i in range(layers):
        cells = "".join(f" {results[n].mean[i, 0]:>{width}.4f} {results[n].post_instruction[:, i].mean():>{width}.4f}"
                        for n in names)
        rows.append(f"{i:>5}{cells}")
    return "\n".join(rows)


def to_json(results: dict[str, Projections], extra: dict) -> str:
    return json.dumps({**extra, "sets": {name: {
        "prompts": int(p.values.shape[0]),
        "mean": p.mean.round(6).tolist(),  # [layer row][position]: position 0 = instruction's last token
        "std": p.values.std(axis=0).round(6).tolist(),
    } for name, p in results.items()}}, indent=2)


def plot(results: dict[str, Projections], path: Path) -> bool:
    """Two panels (instruction's last token, post-instruction mean), one line per set; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, p in results.items():
        x = np.arange(p.values.shape[1])
        axes[0].plot(x, p.mean[:, 0], marker="o", label=name)
        axes[1].plot(x, p.post_instruction.mean(axis=0), marker="o", label=name)
    for ax, title in zip(axes, ("instruction's last token", "post-instruction tokens (mean)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("residual stream (i: entering layer i)")
        ax.axhline(0, color="grey", linewidth=0.5)
    axes[0].set_ylabel("mean projection on the direction")
    axes[0].legend(fontsize="small")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
