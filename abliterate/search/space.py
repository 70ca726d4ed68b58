"""The search space: the extraction's candidates, one point (a direction and a strength per writer), and the unit
direction a point removes (blended between neighbouring layers, optionally projected off the harmless mean), with
the first k - 1 further directions of a rank-K extraction (`extract --directions K`) when the point has k > 1."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from abliterate.edit.plan import EditOptions
from abliterate.edit.strengths import LAYERED, Profile, layer_scales, uniform
from abliterate.errors import AbliterateError
from abliterate.io.direction_file import RANK_KEY, Direction, orthonormalise, project_out
from abliterate.measure.loading import LoadedModel


@dataclass(frozen=True)
class CandidateSet:
    """The extraction's candidates, and which of them the search may pick."""

    candidates: torch.Tensor  # [num_layers + 1, positions, d] differences of means
    harmless_mean: torch.Tensor | None  # same shape, for the projected variant (None in older files)
    min_layer: int  # lowest residual-stream index searched (below it some candidate is zero: e.g. the embeddings
    # of a chat template's fixed suffix tokens, identical for both sets)
    max_layer: int  # highest residual-stream index searched (extraction's pruning)
    selected: tuple[int, int]  # (layer, position) extraction chose
    metadata: dict[str, str]
    digest: str  # identifies the candidates, so a resumed study is known to be about the same ones
    more: torch.Tensor | None = None  # [K - 1, d]: the rank-K file's directions after its first (None: rank 1)

    @property
    def positions(self) -> int:
        return self.candidates.shape[1]

    @property
    def max_directions(self) -> int:
        return 1 if self.more is None else 1 + len(self.more)


@dataclass(frozen=True)
class Point:
    """One edit: a direction and a strength per writer."""

    layer: float  # residual index; the fraction blends with the next layer's candidate
    position: int  # negative index among the post-instruction positions
    projected: bool
    embed: float
    profiles: dict[str, Profile]
    preserve: bool = False  # norm-preserving: each written vector keeps its norm (`apply --norm-preserve`)
    directions: int = 1  # k: remove the span of the direction and the rank-K file's next k - 1 directions

    def options(self, num_layers: int) -> EditOptions:
        return EditOptions(layer_scales=layer_scales(self.profiles, self.embed, num_layers),
                           norm_preserve=self.preserve)

    def params(self) -> dict[str, object]:
        out: dict[str, object] = {"direction_layer": self.layer, "direction_position": self.position,
                                  "projected": self.projected, "embed_strength": self.embed,
                                  "norm_preserve": self.preserve}
        for c, p in self.profiles.items():
            out.update({f"{c}_peak": p.peak, f"{c}_center": p.center, f"{c}_width": p.width, f"{c}_floor": p.floor})
        if self.directions > 1:
            out["directions"] = self.directions
        return out

    @classmethod
    def from_params(cls, params: dict) -> Point:
        profiles = {c: Profile(params[f"{c}_peak"], params[f"{c}_center"], params[f"{c}_width"], params[f"{c}_floor"])
                    for c in LAYERED}
        return cls(float(params["direction_layer"]), int(params["direction_position"]),
                   bool(params.get("projected", False)), float(params["embed_strength"]), profiles,
                   bool(params.get("norm_preserve", False)), int(params.get("directions", 1)))

    def describe(self) -> str:
        layer = f"{self.layer:.2f}".rstrip("0").rstrip(".")
        parts = [f"dir L{layer} p{self.position}{' proj' if self.projected else ''}"
                 f"{f' k={self.directions}' if self.directions > 1 else ''}"
                 f"{' norm-preserving' if self.preserve else ''}", f"embed {self.embed:.2f}"]
        parts += [f"{c} {p.peak:.2f}@{p.center:.1f} w{p.width:.1f} f{p.floor:.2f}" for c, p in self.profiles.items()]
        return ", ".join(parts)


def load_candidates(path: str | Path, lm: LoadedModel) -> CandidateSet:
    """The candidates that `abliterate extract` saved beside the direction, checked against the model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"direction file {path} does not exist; make one with `abliterate extract`")
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            metadata = dict(f.metadata() or {})
            if "candidates" not in names:
                raise AbliterateError(f"{path} has no 'candidates' tensor; search needs the file written by "
                                      "`abliterate extract` (re-run it)")
            candidates = f.get_tensor("candidates").float()
            harmless = f.get_tensor("harmless_mean").float() if "harmless_mean" in names else None
            rows = f.get_tensor("direction").float() if RANK_KEY in metadata and "direction" in names else None
    except (OSError, ValueError) as e:  # safetensors raises SafetensorError (a ValueError subclass) on bad files
        raise AbliterateError(f"cannot read {path}: {e}") from None
    want = (lm.num_layers + 1, lm.hidden_size)
    if candidates.ndim != 3 or (candidates.shape[0], candidates.shape[2]) != want:
        raise AbliterateError(f"{path}: candidates have shape {list(candidates.shape)} but this model needs "
                              f"[{want[0]}, positions, {want[1]}]; use a direction extracted from this model")
    if harmless is not None and harmless.shape != candidates.shape:
        harmless = None
    scores = json.loads(metadata.get("candidate_scores", "[]"))
    max_layer = max((s["layer"] for s in scores), default=int(lm.num_layers * 0.8) - 1)
    k = candidates.shape[1]
    selected = (int(metadata.get("layer", max_layer)), int(metadata.get("position", -1)))
    if not (0 <= selected[0] <= lm.num_layers and -k <= selected[1] < 0):
        raise AbliterateError(f"{path}: metadata names candidate {selected}, outside the saved candidates")
    max_layer = max(max_layer, selected[0])
    usable = [bool(torch.isfinite(candidates[i]).all() and (candidates[i].norm(dim=-1) > 0).all())
              for i in range(max_layer + 1)]
    if harmless is not None:
        usable = [u and bool((harmless[i].norm(dim=-1) > 0).all()) for i, u in enumerate(usable)]
    min_layer = max_layer + 1
    while min_layer > 0 and usable[min_layer - 1]:
        min_layer -= 1
    if min_layer > selected[0]:
        raise AbliterateError(f"{path}: the candidates at layers up to {selected[0]} include zero or non-finite "
                              "vectors; re-run `abliterate extract`")
    digest = hashlib.sha256(candidates.numpy().tobytes()).hexdigest()[:16]
    more = None
    if rows is not None and rows.ndim == 2 and len(rows) > 1 and rows.shape[1] == lm.hidden_size:
        more = rows[1:]
        digest = hashlib.sha256(candidates.numpy().tobytes() + more.numpy().tobytes()).hexdigest()[:16]
    return CandidateSet(candidates, harmless, min_layer, max_layer, selected, metadata, digest, more)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def direction_for(cands: CandidateSet, point: Point) -> torch.Tensor | Direction:
    """The unit direction [d] a point removes: blended between neighbouring layers, optionally projected; for
    k > 1 directions a rank-k `Direction`: that direction and the file's next k - 1, orthonormalised in order."""
    j = point.position + cands.positions
    lo = min(math.floor(point.layer), cands.candidates.shape[0] - 1)
    frac = point.layer - lo
    hi = min(lo + 1, cands.candidates.shape[0] - 1)

    def blend(t: torch.Tensor) -> torch.Tensor:
        return _unit((1 - frac) * _unit(t[lo, j]) + frac * _unit(t[hi, j])) if frac > 0 else _unit(t[lo, j])

    r = blend(cands.candidates)
    h = None
    if point.projected:
        if cands.harmless_mean is None:
            raise AbliterateError("the projected variant needs the harmless mean; re-run `abliterate extract`")
        h = blend(cands.harmless_mean)
        r = _unit(r - (r @ h) * h)
    if point.directions <= 1:
        return r
    if cands.more is None or point.directions > cands.max_directions:
        raise AbliterateError(f"the point removes {point.directions} directions but the direction file holds "
                              f"{cands.max_directions}; use the file written by `abliterate extract --directions`")
    rows = torch.cat([r[None], cands.more[: point.directions - 1]]).numpy()
    # projected: the whole span made orthogonal to the harmless mean (RankDeficientError when that loses one)
    q = orthonormalise(rows, "the searched directions") if h is None else project_out(
        rows, h.double().numpy() / float(h.double().norm()), "the searched directions")
    return Direction(q, {RANK_KEY: str(point.directions)}, None, point.directions)


def selected_point(cands: CandidateSet) -> Point:
    """The extraction's own choice, removed fully from every writer: what `apply` does by default."""
    return Point(float(cands.selected[0]), cands.selected[1], False, 1.0, {c: uniform(1.0) for c in LAYERED})


def seed_points(cands: CandidateSet, num_layers: int, preserve: bool) -> list[Point]:
    """Points a study starts from after the paper's: its direction without the embedding edit (which changes every
    token's input: the costliest writer in KL on real models), and the other tool's parametrisation (heretic: the
    direction projected off the harmless mean, norm-preserving writes, no embedding edit, strengths peaking in the
    later layers and zero far from the peak)."""
    top = selected_point(cands)
    late = Profile(peak=1.0, center=0.75 * (num_layers - 1), width=0.5 * num_layers, floor=0.0)
    heretic = replace(top, embed=0.0, projected=cands.harmless_mean is not None, preserve=preserve,
                      profiles={c: late for c in LAYERED})
    return [replace(top, embed=0.0), heretic]
