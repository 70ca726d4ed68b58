"""Steering: contrastive activation addition (CAA, Rimsky et al. 2023) and ActAdd-style vectors.

A steering vector per layer is a mean difference of residual activations between prompts that show
a behaviour and prompts that do not. It is stored in the direction file format ([L + 1, d], row
L + 1 = the residual stream leaving decoder layer L) but *not* normalised: its length is the
natural scale of the behaviour, and `coeff` multiplies it.

Pairs files (JSONL, one object per line, or a JSON array of objects as the CAA datasets ship):

* CAA A/B items: ``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior``
  (answers "A"/"B", or "(A)"/"(B)"). The prompt is the chat-formatted question (the model's chat
  template with the generation prompt) followed by the answer as the file writes it, up to its
  letter: ``"A"`` or ``"(A"``, after a space unless the prompt ends in whitespace. Both answers are
  tokenised; the letter is the first token where they differ, whatever the tokenizer merges it
  with. Activations are read at that token; the sweep scores its two candidates there.
* ActAdd pairs: ``positive``, ``negative``: raw texts (no chat template), last-token activations.

Steering adds ``coeff * vectors[L + 1]`` to the residual stream leaving layer L: in a plain forward
at every position; in `generate_steered` at the post-instruction tokens (assistant header) and
every generated token, never at the user's message. `abliterate steer bake` writes the same
addition into the bias of layer L's MLP output projection (see abliterate.bake).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from abliterate.arch.writers import Arch
from abliterate.errors import AbliterateError
from abliterate.evaluate.generation import generate
from abliterate.evaluate.records import EvalSettings
from abliterate.io.json_files import json_records
from abliterate.measure.activations import mean_residuals
from abliterate.measure.batching import Batch, batches, run_fitting
from abliterate.measure.hooks import add_after, decoder_layers
from abliterate.measure.loading import LoadedModel
from abliterate.measure.templates import count_suffix_tokens, post_instruction_suffix, render

LETTERS = ("A", "B")
VECTORS_KEY = "direction"  # the direction file's tensor name: steering files read like direction files


@dataclass(frozen=True)
class Pair:
    """One contrastive item: an A/B question (letters set) or two raw prompts (positive/negative)."""

    question: str | None = None
    matching: str | None = None  # "A" or "B"
    not_matching: str | None = None
    parenthesised: bool = False  # answers written "(A)": the model writes "(" before the letter
    positive: str | None = None
    negative: str | None = None

    @property
    def is_choice(self) -> bool:
        return self.question is not None


def _letter(value: object, where: str, field: str) -> str:
    text = str(value).strip() if isinstance(value, str) else ""
    letter = text.strip("() ")
    if letter not in LETTERS or len(text) > 3:
        raise AbliterateError(f"{where}: {field} is {value!r}; answers must be A or B (also written (A)/(B))")
    return letter


def load_pairs(path: str | Path) -> list[Pair]:
    """Read and validate a pairs file (JSONL or a JSON array); every problem is one line naming the
    file, line or item, and the fix."""
    path = Path(path)
    if path.is_dir():
        raise AbliterateError(f"pairs file {path} is a folder; pass a JSONL file of contrastive pairs")
    if not path.is_file():
        raise AbliterateError(f"pairs file {path} does not exist; pass a JSONL file of contrastive pairs")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AbliterateError(f"pairs file {path} is not UTF-8 text; write one JSON object per line") from None
    pairs: list[Pair] = []
    kinds: set[str] = set()
    for where, item in json_records(str(path), text):
        if not isinstance(item, dict):
            raise AbliterateError(f"{where}: expected a JSON object, got {type(item).__name__}")
        if "question" in item or "answer_matching_behavior" in item:
            missing = [k for k in ("question", "answer_matching_behavior", "answer_not_matching_behavior")
                       if not isinstance(item.get(k), str) or not item[k].strip()]
            if missing:
                raise AbliterateError(f"{where}: missing or empty field(s) {', '.join(missing)} "
                                      "(A/B items need question, answer_matching_behavior, "
                                      "answer_not_matching_behavior)")
            match = _letter(item["answer_matching_behavior"], where, "answer_matching_behavior")
            other = _letter(item["answer_not_matching_behavior"], where, "answer_not_matching_behavior")
            if match == other:
                raise AbliterateError(f"{where}: both answers are {match}; one must be A and the other B")
            parenthesised = item["answer_matching_behavior"].strip().startswith("(")
            pairs.append(Pair(question=item["question"], matching=match, not_matching=other,
                              parenthesised=parenthesised))
            kinds.add("A/B")
        elif "positive" in item or "negative" in item:
            missing = [k for k in ("positive", "negative") if not isinstance(item.get(k), str) or not item[k].strip()]
            if missing:
                raise AbliterateError(f"{where}: missing or empty field(s) {', '.join(missing)} "
                                      "(prompt pairs need positive and negative)")
            pairs.append(Pair(positive=item["positive"], negative=item["negative"]))
            kinds.add("positive/negative")
        else:
            raise AbliterateError(f"{where}: found fields {', '.join(map(str, item)) or 'none'}; expected question/"
                                  "answer_matching_behavior/answer_not_matching_behavior or positive/negative")
    if not pairs:
        raise AbliterateError(f"pairs file {path} has no pairs; write one JSON object per line")
    if len(kinds) > 1:
        raise AbliterateError(f"{path} mixes A/B items and positive/negative pairs; use one kind per file")
    return pairs


def _joined(prompt: str, answer: str) -> str:
    return prompt + answer if prompt[-1:].isspace() else f"{prompt} {answer}"


@dataclass(frozen=True)
class AnswerTokens:
    """The prompt and the answer's opening as token ids, then the ids of its two possible letters."""

    prefix: list[int]
    letters: dict[str, int]  # "A" -> id, "B" -> id


def answer_tokens(tokenizer, prompt: str, parenthesised: bool = False) -> AnswerTokens:
    """Tokenise both answers after `prompt`; the letters are where the two token sequences first differ."""
    opening = "(" if parenthesised else ""
    ids = {letter: tokenizer(_joined(prompt, opening + letter), add_special_tokens=False)["input_ids"]
           for letter in LETTERS}
    a, b = ids["A"], ids["B"]
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    if len(a) != shared + 1 or len(b) != shared + 1:
        raise AbliterateError(f"the answers {opening}A and {opening}B do not end in one differing token after the "
                              "chat prompt for this tokenizer; A/B steering needs the letters to be single tokens")
    return AnswerTokens(a[:shared], {"A": a[shared], "B": b[shared]})


def choice_prompt(lm: LoadedModel, question: str, template: str | None = None) -> str:
    return render(lm.tokenizer, question, template)


def choice_tokens(lm: LoadedModel, pairs: Sequence[Pair], template: str | None = None) -> list[AnswerTokens]:
    if not pairs or not pairs[0].is_choice:
        raise AbliterateError("this needs A/B items (question, answer_matching_behavior, "
                              "answer_not_matching_behavior)")
    return [answer_tokens(lm.tokenizer, choice_prompt(lm, p.question, template), p.parenthesised)  # type: ignore[arg-type]
            for p in pairs]


def steering_vectors(lm: LoadedModel, pairs: Sequence[Pair], *, template: str | None = None, batch_size: int = 16,
                     quiet: bool = False) -> torch.Tensor:
    """Mean (behaviour - opposite) residual, [num_layers + 1, d], at the answer letter (or last token)."""
    positive: list[str] | list[list[int]]
    negative: list[str] | list[list[int]]
    if pairs[0].is_choice:
        answers = choice_tokens(lm, pairs, template)
        positive = [[*t.prefix, t.letters[p.matching]] for t, p in zip(answers, pairs, strict=True)]  # type: ignore[index]
        negative = [[*t.prefix, t.letters[p.not_matching]] for t, p in zip(answers, pairs, strict=True)]  # type: ignore[index]
    else:
        positive = [p.positive for p in pairs]  # type: ignore[misc]
        negative = [p.negative for p in pairs]  # type: ignore[misc]
    pos = mean_residuals(lm, positive, 1, batch_size=batch_size, desc="behaviour", quiet=quiet)[:, 0]
    neg = mean_residuals(lm, negative, 1, batch_size=batch_size, desc="opposite", quiet=quiet)[:, 0]
    return pos - neg


def save_vectors(path: str | Path, vectors: torch.Tensor, lm: LoadedModel, pairs_path: str | Path,
                 pairs: Sequence[Pair]) -> None:
    from abliterate.io.direction_file import save_direction

    save_direction(path, vectors, {"model": lm.name, "kind": "steering", "pairs": str(pairs_path),
                                   "pair_format": "A/B" if pairs[0].is_choice else "positive/negative",
                                   "count": len(pairs), "num_layers": lm.num_layers})


def load_vectors(path: str | Path, *, hidden_size: int, num_layers: int, cls: str | None = None) -> np.ndarray:
    """The per-layer steering vectors as stored (not normalised; zero rows allowed), checked against the model;
    a single [d] vector is used at every layer. cls: one class of a `jailbreak vectors` file (``vector.CLS``)."""
    from safetensors import safe_open

    from abliterate.io.direction_file import refuse_several
    from abliterate.io.safetensors_format import read_header

    path = Path(path)
    if not path.is_file():
        raise AbliterateError(f"vectors file {path} does not exist; make one with `abliterate steer vectors`")
    names = [t.name for t in read_header(path).tensors]
    key = VECTORS_KEY if cls is None else f"vector.{cls}"
    if key not in names:
        if cls is not None:
            classes = [n.removeprefix("vector.") for n in names if n.startswith("vector.")]
            raise AbliterateError(f"{path} has no class {cls!r} (its classes: {', '.join(classes) or 'none'}); "
                                  "pass a class made by `abliterate jailbreak vectors`")
        raise AbliterateError(f"{path} has no tensor {VECTORS_KEY!r}; pass a file from `abliterate steer vectors`")
    with safe_open(str(path), framework="np") as f:
        vectors = f.get_tensor(key)
        made_from = (f.metadata() or {}).get("model")
        refuse_several(path, f.metadata(), "steering")
    if vectors.shape == (hidden_size,):  # one direction (e.g. from `abliterate extract`): the same at every layer
        vectors = np.tile(vectors, (num_layers + 1, 1))
    if vectors.ndim != 2 or vectors.shape != (num_layers + 1, hidden_size):
        source = f" made from {made_from}" if made_from else ""
        raise AbliterateError(f"{path} holds vectors of shape {list(vectors.shape)}{source}; this model needs "
                              f"[{num_layers + 1}, {hidden_size}] (rebuild them with `abliterate steer vectors`)")
    if vectors.dtype.kind != "f" or not np.isfinite(vectors).all():
        raise AbliterateError(f"{path}: vectors contain NaN/inf or are not floating point; rebuild them")
    return vectors.astype(np.float32)


def check_coeff(coeff: float) -> None:
    if not math.isfinite(coeff):
        raise AbliterateError(f"coefficient {coeff} is not a finite number; use e.g. 1 (toward the behaviour) or -1")


def check_layer(layer: int, num_layers: int) -> None:
    if not 0 <= layer < num_layers:
        raise AbliterateError(f"--layer {layer} is out of range; the model has layers 0 to {num_layers - 1}")


@contextlib.contextmanager
def steering(model: torch.nn.Module, arch: Arch | None, layer: int, vector: object, coeff: float,
             last: int | None = None) -> Iterator[None]:
    """Add coeff * vector to the residual stream leaving decoder `layer` (= entering layer + 1).

    In a forward: every position, or only the last `last`. Inside `model.generate` (called within
    this context): every generated token, and of the prompt only its last `last` positions (none by
    default): chat steering starts at the assistant header, after the user's message.
    arch: None reads it off model.config.
    """
    from abliterate.arch.table import arch_for_config

    arch = arch if arch is not None else arch_for_config(model.config.to_dict())
    vec = torch.as_tensor(np.asarray(vector), dtype=torch.float32)
    layers = decoder_layers(model, arch)
    check_layer(layer, len(layers))
    check_coeff(coeff)
    generating = {"on": False, "forwards": 0}

    def positions(hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, 1] mask; in generate the first forward is the prompt's, each later one new tokens."""
        mask = torch.ones((*hidden.shape[:-1], 1), device=hidden.device)
        if generating["on"]:
            generating["forwards"] += 1
            if generating["forwards"] > 1:
                return mask
            count = last or 0
        elif last is None:
            return mask
        else:
            count = last
        mask[:, : max(hidden.shape[1] - count, 0)] = 0
        return mask

    plain_generate = model.generate if hasattr(model, "generate") else None

    def steered_generate(*args, **kwargs):
        generating.update(on=True, forwards=0)
        try:
            return plain_generate(*args, **kwargs)  # type: ignore[misc]
        finally:
            generating["on"] = False

    with contextlib.ExitStack() as stack:
        if plain_generate is not None:
            shadowed = vars(model).get("generate")  # an enclosing steering context's, when nested
            model.generate = steered_generate  # the instance attribute shadows the method until restored
            stack.callback(lambda: setattr(model, "generate", shadowed) if shadowed is not None
                           else delattr(model, "generate"))
        stack.enter_context(add_after(model, arch, layer, vec, coeff, positions))
        yield


def generate_steered(lm: LoadedModel, instructions: Sequence[str], vectors: np.ndarray, layer: int, coeff: float, *,
                     max_new_tokens: int = 64, template: str | None = None, batch_size: int = 8) -> list[str]:
    """Greedy replies with steering on the post-instruction tokens and every generated token."""
    check_layer(layer, lm.num_layers)  # before vectors[layer + 1] is read
    prompts = [render(lm.tokenizer, text, template) for text in instructions]
    suffix = post_instruction_suffix(lm.tokenizer, template)
    k = max(1, min(count_suffix_tokens(lm.tokenizer, p, suffix) for p in prompts))
    settings = EvalSettings(batch_size=batch_size, template=template, thinking=True)  # the template as it renders
    with steering(lm.model, lm.arch, layer, vectors[layer + 1], coeff, last=k):
        replies = generate(lm, instructions, settings, max_new_tokens, quiet=True)
    return [lm.tokenizer.decode(ids, skip_special_tokens=True).strip() for _, ids in replies]


def matching_probability(lm: LoadedModel, pairs: Sequence[Pair], vectors: np.ndarray | None, layer: int,
                         coeff: float, *, template: str | None = None, batch_size: int = 16) -> float:
    """Mean P(behaviour-matching letter) / (P(A) + P(B)) where the letter is written, steered from the
    post-instruction tokens on (as in generation)."""
    answers = choice_tokens(lm, pairs, template)
    prompts = [choice_prompt(lm, p.question, template) for p in pairs]  # type: ignore[arg-type]
    suffix = post_instruction_suffix(lm.tokenizer, template)
    k = max(1, min(count_suffix_tokens(lm.tokenizer, prompt, suffix)
                   + len(t.prefix) - len(lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
                   for prompt, t in zip(prompts, answers, strict=True)))
    matching = torch.empty(len(pairs))

    def step(batch: Batch) -> None:
        logits = lm.model(**batch.inputs(), use_cache=False, logits_to_keep=1).logits[:, -1, :].float()
        rows = [[answers[i].letters[pairs[i].matching], answers[i].letters[pairs[i].not_matching]]
                for i in batch.indices]
        two = torch.softmax(logits.gather(1, torch.tensor(rows, device=logits.device)), dim=-1)
        matching[batch.indices] = two[:, 0].cpu()

    ctx = steering(lm.model, lm.arch, layer, vectors[layer + 1], coeff, last=k) if vectors is not None and coeff \
        else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        run_fitting(lm, list(batches(lm, [t.prefix for t in answers], batch_size)), step)  # OOM: halved
    return matching.mean().item()


def sweep(lm: LoadedModel, pairs: Sequence[Pair], vectors: np.ndarray, layers: Sequence[int],
          coeffs: Sequence[float], *, template: str | None = None, batch_size: int = 16,
          quiet: bool = False) -> dict[int, dict[float, float]]:
    """{layer: {coeff: mean matching probability}} over held-out A/B pairs."""
    for layer in layers:
        check_layer(layer, lm.num_layers)
    for c in coeffs:
        check_coeff(c)
    grid = [(layer, c) for layer in layers for c in coeffs]
    table: dict[int, dict[float, float]] = {layer: {} for layer in layers}
    for layer, c in tqdm(grid, desc="sweep", disable=quiet, leave=False):
        table[layer][c] = matching_probability(lm, pairs, vectors, layer, c, template=template, batch_size=batch_size)
    return table


def format_table(table: dict[int, dict[float, float]]) -> str:
    coeffs = sorted({c for row in table.values() for c in row})
    lines = ["layer " + " ".join(f"{c:>7g}" for c in coeffs)]
    for layer, row in table.items():
        lines.append(f"{layer:>5} " + " ".join(f"{row[c]:7.3f}" for c in coeffs))
    return "\n".join(lines)


def plot_table(table: dict[int, dict[float, float]], path: Path) -> bool:
    """A PNG of probability against coefficient, one line per layer; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, row in table.items():
        cs = sorted(row)
        ax.plot(cs, [row[c] for c in cs], marker="o", label=f"layer {layer}")
    ax.set_xlabel("steering coefficient")
    ax.set_ylabel("P(behaviour-matching answer)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
