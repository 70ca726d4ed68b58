"""Greedy generation for evaluation, search and steering: the model's sampling settings cleared, stop tokens handled."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from tqdm import tqdm

from abliterate.evaluate.records import EvalSettings
from abliterate.measure.batching import Batch, batches, run_fitting
from abliterate.measure.loading import LoadedModel
from abliterate.measure.templates import render


def generate(lm: LoadedModel, instructions: Sequence[str], settings: EvalSettings, max_new_tokens: int,
             desc: str = "generating", quiet: bool = False) -> list[tuple[str, list[int]]]:
    """Greedy replies (text with special tokens kept, ids up to and including the end of turn), in order."""
    tok = lm.tokenizer
    prompts = [render(tok, t, settings.template, **settings.template_kwargs()) for t in instructions]
    config = copy.deepcopy(lm.model.generation_config)
    config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    config.num_beams, config.max_new_tokens, config.max_length = 1, max_new_tokens, None
    config.pad_token_id = tok.pad_token_id
    stops = _stop_ids(lm, config)
    out: list[tuple[str, list[int]]] = [("", [])] * len(prompts)
    def step(batch: Batch) -> None:
        ids = lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                generation_config=config)
        for row, i in zip(ids[:, batch.input_ids.shape[1]:].tolist(), batch.indices, strict=True):
            end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            text = tok.decode([t for t in row[:end] if t not in stops], skip_special_tokens=False)
            out[i] = (text, row[:end])

    with torch.inference_mode(), lm.running(), \
            tqdm(total=len(prompts), desc=desc, unit="prompt", disable=quiet, leave=False) as bar:
        run_fitting(lm, list(batches(lm, prompts, settings.batch_size)), step, progress=bar.update)
    return out


def _stop_ids(lm: LoadedModel, config) -> set[int]:
    eos = config.eos_token_id if config.eos_token_id is not None else lm.tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    return ids | ({lm.tokenizer.pad_token_id} - {None})
