"""Per-family settings (recipes/*.yaml): what to extract with, how to edit, how to evaluate.

A recipe is layered: recipes/default.yaml, then recipes/<model_type>.yaml, then a user's
--recipe FILE, then command-line flags; each layer only names what it changes. Every key is
checked against the schema below, so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from abliterate.arch.writers import COMPONENTS
from abliterate.errors import AbliterateError, first_line

REFUSAL_OBJECTIVES = ("score", "count")  # what ranks candidates: first-token log-odds, or refused greedy replies
KL_OBJECTIVES = ("first-token", "continuation")  # what the KL filter reads
PROPOSALS = ("principal", "categories")  # where a rank-K extraction's directions beside the chosen one come from


@dataclass(frozen=True)
class SelectionSettings:
    """What choosing among scored candidates needs (measure/selection): part of the extract section."""

    prune_layers: float = 0.2
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    batch_size: int = 16
    screen_prompts: int = 8  # harmful validation prompts in the first (cheap) round of successive halving
    finalists: int = 8  # candidates that get all three scores; 0: every candidate (exhaustive)
    refusal_objective: str = "score"  # "score": first-token ablation score; "count": refused greedy replies first
    kl_objective: str = "first-token"  # or "continuation": the KL filter reads CandidateScore.kl_continuation
    max_new_tokens: int = 24  # reply length counted with refusal_objective "count"
    kl_tokens: int = 16  # reply tokens averaged with kl_objective "continuation"

    def selection(self) -> SelectionSettings:
        """Only the selection settings (what a direction file records of them)."""
        return SelectionSettings(**{f.name: getattr(self, f.name) for f in fields(SelectionSettings)})


@dataclass(frozen=True)
class ExtractSettings(SelectionSettings):
    n_train: int = 128
    n_val: int = 32
    positions: int | None = None
    dtype: str = "auto"
    harmful: str = "builtin:harmful"
    harmless: str = "builtin:harmless"
    directions: int = 1  # K: the chosen direction and K - 1 principal directions beside it (a rank-K file)
    proposals: str = "principal"  # or "categories": the K - 1 are categories' differences (measure/directions.py)


@dataclass(frozen=True)
class ApplySettings:
    scale: float = 1.0
    layers: str | None = None
    components: tuple[str, ...] = COMPONENTS
    targets: tuple[str, ...] = ()
    keep_tied: bool = False
    layer_scales: dict[str, tuple[float, ...]] = field(default_factory=dict)
    direction: str | None = None  # a direction file (relative paths: to the recipe file), as `search` writes
    norm_preserve: bool = False  # rescale each written vector to its original norm after the projection
    biprojected: bool = False  # make the direction orthogonal to the harmless mean at its layer first


@dataclass(frozen=True)
class EvaluateSettings:
    limit: int = 32
    max_new_tokens: int = 128
    kl_tokens: int = 16
    batch_size: int = 8


@dataclass(frozen=True)
class Recipe:
    name: str = "default"
    notes: str = ""
    extract: ExtractSettings = field(default_factory=ExtractSettings)
    apply: ApplySettings = field(default_factory=ApplySettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, for YAML."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


SECTIONS = {"extract": ExtractSettings, "apply": ApplySettings, "evaluate": EvaluateSettings}


def recipe_dir() -> Path:
    """recipes/ of a source checkout, else the copy installed with the package."""
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if (checkout / "default.yaml").is_file():
        return checkout
    return Path(str(resources.files("abliterate") / "recipes"))


def overlay(recipe: Recipe, data: dict[str, Any], source: str) -> Recipe:
    """Apply the keys present in `data` on top of `recipe`, checking names and types."""
    if not isinstance(data, dict):
        raise AbliterateError(f"{source}: a recipe must be a mapping of sections; see recipes/README.md")
    unknown = set(data) - {"name", "notes", *SECTIONS}
    if unknown:
        raise AbliterateError(f"{source}: unknown key(s) {sorted(unknown)}; valid: name, notes, {', '.join(SECTIONS)}")
    changes: dict[str, Any] = {k: str(data[k]) for k in ("name", "notes") if k in data}
    for section, cls in SECTIONS.items():
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise AbliterateError(f"{source}: section {section!r} must be a mapping")
        valid = {f.name: f for f in fields(cls)}
        bad = set(values) - set(valid)
        if bad:
            raise AbliterateError(f"{source}: unknown {section} key(s) {sorted(bad)}; valid: {', '.join(valid)}")
        current = getattr(recipe, section)
        converted = {k: _convert(section, k, v, getattr(current, k), source) for k, v in values.items()}
        changes[section] = replace(getattr(recipe, section), **converted)
    return replace(recipe, **changes)


def _convert(section: str, key: str, value: Any, default: Any, source: str) -> Any:
    where = f"{source}: {section}.{key}"
    if key == "components":
        value = tuple(value) if isinstance(value, list) else tuple(str(value).split(","))
        if not set(value) <= set(COMPONENTS):
            raise AbliterateError(f"{where} must be a subset of {list(COMPONENTS)}")
        return value
    if key == "targets":
        return tuple(value or ())
    if key == "layer_scales":
        return _layer_scales(value, where)
    if value is None:
        return None
    if key == "proposals" and value not in PROPOSALS:
        raise AbliterateError(f"{where} should be one of {', '.join(PROPOSALS)}, got {value!r}")
    if key == "directions" and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64):
        raise AbliterateError(f"{where} should be a whole number from 1 to 64, got {value!r}")
    expected = type(default) if default is not None else (int if key == "positions" else str)
    if expected is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
        raise AbliterateError(f"{where} should be {expected.__name__}, got {value!r}")
    return value


def _layer_scales(value: Any, where: str) -> dict[str, tuple[float, ...]]:
    """component -> finite numbers, one per layer (one for embed): checked here so a bad file is one clear line."""
    if not isinstance(value, dict) or not set(value) <= set(COMPONENTS):
        raise AbliterateError(f"{where} must map components ({', '.join(COMPONENTS)}) to per-layer lists")
    out = {}
    for component, scales in value.items():
        ok = isinstance(scales, list) and scales and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scales)
        if not ok:
            raise AbliterateError(f"{where}.{component} must be a non-empty list of finite numbers, one per layer")
        if component == "embed" and len(scales) != 1:
            raise AbliterateError(f"{where}.embed must have exactly one entry (the embedding is one writer)")
        out[component] = tuple(float(x) for x in scales)
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise AbliterateError(f"{path} is not valid YAML: {first_line(e)}") from None
    except OSError as e:
        raise AbliterateError(f"cannot read recipe {path}: {e.strerror}") from None


def load_recipe(model_type: str | None, user_file: Path | None = None) -> Recipe:
    """default.yaml, then the family's file if there is one, then the user's file."""
    folder = recipe_dir()
    recipe = overlay(Recipe(), read_yaml(folder / "default.yaml"), "recipes/default.yaml")
    family = folder / f"{model_type}.yaml"
    if model_type and family.is_file():
        recipe = overlay(recipe, read_yaml(family), f"recipes/{family.name}")
    if user_file is not None:
        recipe = overlay(recipe, read_yaml(Path(user_file)), str(user_file))
        direction = recipe.apply.direction
        if direction is not None and not Path(direction).is_absolute():
            recipe = replace(recipe, apply=replace(recipe.apply, direction=str(Path(user_file).parent / direction)))
    return recipe


def read_layer_scales(path: Path) -> dict[str, tuple[float, ...]]:
    """`apply --layer-scales FILE`: apply.layer_scales of a recipe (as `search` writes), or a bare mapping."""
    data = read_yaml(Path(path))
    if isinstance(data, dict) and isinstance(data.get("apply"), dict):
        data = data["apply"].get("layer_scales") or {}
    scales = _layer_scales(data, f"{path}: layer_scales")
    if not scales:
        raise AbliterateError(f"{path} holds no layer scales; pass a recipe written by `abliterate search`")
    return scales


def apply_settings(model_type: str | None, recipe_file: Path | None, values: dict[str, Any], given: set[str],
                   layer_scales_file: Path | None = None) -> ApplySettings:
    """`apply`'s settings: without --recipe the command-line values; with it the recipe's apply section, with the
    values given on the command line laid over it; --layer-scales FILE replaces the per-layer scales.

    values: ApplySettings fields as the command line holds them (direction a path or None);
    given: the names set explicitly on the command line."""
    settings = ApplySettings()
    if recipe_file is not None:
        settings = load_recipe(model_type, recipe_file).apply
        values = {k: v for k, v in values.items() if k in given}
    if values.get("direction") is not None:
        values = {**values, "direction": str(values["direction"])}
    settings = replace(settings, **{k: v for k, v in values.items() if k != "direction" or v is not None})
    if layer_scales_file is not None:
        settings = replace(settings, layer_scales=read_layer_scales(layer_scales_file))
    return settings


def save_recipe(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
