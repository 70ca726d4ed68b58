"""`jailbreak evaluate` end to end: inputs checked before the model loads, then the measurement and its table."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from abliterate.errors import AbliterateError
from abliterate.evaluate.records import EvalSettings
from abliterate.jailbreak.evaluate import Hardening, JailbreakReport, evaluate_jailbreaks, format_report
from abliterate.jailbreak.wrappers import load_wrappers
from abliterate.measure.harmfulness import harmfulness_direction
from abliterate.measure.loading import LoadedModel, load_model
from abliterate.measure.probe import load_probe_direction
from abliterate.measure.templates import load_template
from abliterate.options.families import ModelOptions
from abliterate.steer.steering import check_coeff, check_layer, load_vectors


def _harmfulness_units(lm: LoadedModel, path: Path | None, sets: dict[str, list[str]], template: str | None,
                       batch_size: int, quiet: bool, **kwargs) -> np.ndarray:
    if path is not None:
        return load_probe_direction(path, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    found = harmfulness_direction(lm, sets["harmful"], sets["harmless"], template=template, batch_size=batch_size,
                                  quiet=quiet, **kwargs)
    rows = found.direction.double()
    return (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-30)).float().numpy()


def run_evaluate(model: str, wrappers_source: str, classes: list[str] | None, sets: dict[str, list[str]], *,
                 vectors_path: Path | None, source: str | None, coeff: float, layer: int | None,
                 harmfulness_path: Path | None, max_new_tokens: int, model_options: ModelOptions, batch_size: int,
                 quiet: bool) -> tuple[JailbreakReport, str]:
    wrappers = load_wrappers(wrappers_source, classes)
    if source is not None and vectors_path is None:
        raise AbliterateError("--from names a class of a vectors file; pass --vectors too")
    if vectors_path is not None and not Path(vectors_path).is_file():
        raise AbliterateError(f"vectors file {vectors_path} does not exist; make one with `abliterate jailbreak "
                              "vectors`")
    check_coeff(coeff)
    m = model_options
    text_template = load_template(m.template)
    lm = load_model(model, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
    layer = lm.num_layers // 2 if layer is None else layer
    check_layer(layer, lm.num_layers)
    hardening = None
    if vectors_path is not None:
        vectors = load_vectors(vectors_path, hidden_size=lm.hidden_size, num_layers=lm.num_layers, cls=source)
        hardening = Hardening(vectors, source or "all classes", layer, coeff)
    settings = EvalSettings(batch_size=batch_size, template=text_template, thinking=m.thinking)
    units = _harmfulness_units(lm, harmfulness_path, sets, text_template, batch_size, quiet,
                               **settings.template_kwargs())
    report = evaluate_jailbreaks(lm, sets["harmful"], sets["harmless"], sets["overrefusal"], wrappers, units,
                                 layer + 1, hardening=hardening, settings=settings, max_new_tokens=max_new_tokens,
                                 quiet=quiet)
    report.settings.update(model=model, wrappers=wrappers_source, vectors=str(vectors_path) if vectors_path else None,
                           source=source, coeff=coeff, layer=layer, max_new_tokens=max_new_tokens,
                           harmfulness=str(harmfulness_path) if harmfulness_path else "measured")
    return report, format_report(report, hardening)
