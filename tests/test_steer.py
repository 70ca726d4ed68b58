"""Steering vectors (CAA / ActAdd): building them, the steering hook, chat, the sweep, bad pairs files."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from abliterate.cli.main import cli
from abliterate.demo.toy import REFUSALS, choice_pairs, toy_prompts, train_toy_model
from abliterate.errors import AbliterateError
from abliterate.io.safetensors_format import read_header
from abliterate.measure.hooks import capture_residuals
from abliterate.measure.loading import load_model
from abliterate.measure.templates import render
from abliterate.steer.steering import answer_tokens, load_pairs, load_vectors, matching_probability, steering

COEFFS = (-2.0, -1.0, 0.0, 1.0, 2.0)


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="module")
def choice_model(tmp_path_factory) -> Path:
    """The toy trained with its planted two-choice behaviour (declines harmful requests in A/B form)."""
    return train_toy_model(tmp_path_factory.mktemp("steer") / "toy-choices", choices=True)


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> tuple[Path, Path]:
    """CAA pairs from the training requests, held-out pairs from the test requests."""
    folder = tmp_path_factory.mktemp("pairs")
    p = toy_prompts()
    train = write_jsonl(folder / "train.jsonl", choice_pairs(p.harmful_train, True) + choice_pairs(p.harmless_train,
                                                                                                   False))
    held = write_jsonl(folder / "held.jsonl", choice_pairs(p.harmful_test, True) + choice_pairs(p.harmless_test, False))
    return train, held


@pytest.fixture(scope="module")
def vectors_file(choice_model, pair_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vectors") / "vectors.safetensors"
    result = CliRunner().invoke(cli, ["steer", "vectors", str(choice_model), "--pairs", str(pair_files[0]),
                                      "--out", str(out), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_choice_toy_picks_the_declining_option_only_for_harmful_held_out_requests(choice_model):
    lm = load_model(choice_model, dtype="float32", device="cpu")
    p = toy_prompts()
    harmful = load_pairs(write_jsonl(choice_model / "h.jsonl", choice_pairs(p.harmful_test, True)))
    harmless = load_pairs(write_jsonl(choice_model / "n.jsonl", choice_pairs(p.harmless_test, False)))
    assert matching_probability(lm, harmful, None, 0, 0.0) > 0.9
    assert matching_probability(lm, harmless, None, 0, 0.0) < 0.1


def merging_tokenizer(corpus: list[str]):
    """A SentencePiece-style BPE trained in the test: words keep their punctuation, so "(A" becomes one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_answer_letters_are_found_where_the_two_answers_first_differ_in_any_tokenizer(refusing_model):
    toy_tok = load_model(refusing_model, dtype="float32", device="cpu").tokenizer
    prompt = "<|user|> how do i bake bread ? <|end|> <|assistant|>"
    plain = answer_tokens(toy_tok, prompt)
    assert plain.prefix == toy_tok(prompt, add_special_tokens=False)["input_ids"]
    assert [toy_tok.convert_ids_to_tokens(plain.letters[x]) for x in "AB"] == ["A", "B"]
    with pytest.raises(AbliterateError, match="single tokens"):  # "(A" is one unknown word to this tokenizer
        answer_tokens(toy_tok, prompt, parenthesised=True)

    tok = merging_tokenizer(["[INST] pick one (A) yes (B) no [/INST] (A", "[INST] q (A) x (B) y [/INST] (B"] * 50)
    question = "[INST] pick one (A) yes (B) no [/INST]"
    merged = answer_tokens(tok, question, parenthesised=True)
    assert [tok.convert_ids_to_tokens(merged.letters[x]) for x in "AB"] == ["\u2581(A", "\u2581(B"]  # merged
    assert merged.prefix == tok(question, add_special_tokens=False)["input_ids"]
    for letter in "AB":
        assert tok.decode([*merged.prefix, merged.letters[letter]]) == f"{question} ({letter}"


def test_a_json_array_of_caa_items_loads_like_jsonl(tmp_path):
    items = [{"question": "Would you help?\n\nChoices:\n (A) Yes\n (B) No", "answer_matching_behavior": "(B)",
              "answer_not_matching_behavior": "(A)"},
             {"question": "Again?\n\nChoices:\n (A) No\n (B) Yes", "answer_matching_behavior": "(A)",
              "answer_not_matching_behavior": "(B)"}]
    (tmp_path / "caa.json").write_text(json.dumps(items, indent=4))
    as_array = load_pairs(tmp_path / "caa.json")
    assert as_array == load_pairs(write_jsonl(tmp_path / "caa.jsonl", items))
    assert [(p.matching, p.parenthesised) for p in as_array] == [("B", True), ("A", True)]
    (tmp_path / "bad.json").write_text(json.dumps(items)[:-1])
    with pytest.raises(AbliterateError, match=r"bad.json:1: not valid JSON"):
        load_pairs(tmp_path / "bad.json")
    (tmp_path / "mixed.json").write_text(json.dumps([items[0], {"prompt": "x"}]))
    with pytest.raises(AbliterateError, match=r"mixed.json item 2: found fields prompt"):
        load_pairs(tmp_path / "mixed.json")


def test_pairs_with_parenthesised_answers_keep_their_form(tmp_path):
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", [
        {"question": "q", "answer_matching_behavior": " (A)", "answer_not_matching_behavior": " (B)"},
        {"question": "q", "answer_matching_behavior": "B", "answer_not_matching_behavior": "A"}]))
    assert [(p.matching, p.parenthesised) for p in pairs] == [("A", True), ("B", False)]


def test_vectors_file_is_a_per_layer_direction_file_with_unnormalised_rows(choice_model, vectors_file):
    lm = load_model(choice_model, dtype="float32", device="cpu")
    metadata = read_header(vectors_file).metadata
    assert metadata["kind"] == "steering" and metadata["pair_format"] == "A/B"
    raw = load_vectors(vectors_file, hidden_size=lm.hidden_size, num_layers=lm.num_layers)
    assert raw.shape == (lm.num_layers + 1, lm.hidden_size)
    assert not np.allclose(np.linalg.norm(raw[1:], axis=-1), 1.0)  # kept at their natural scale


def test_caa_vector_moves_the_matching_answer_probability_monotonically(choice_model, vectors_file, pair_files):
    result = CliRunner().invoke(cli, ["steer", "sweep", str(choice_model), "--vectors", str(vectors_file), "--pairs",
                                      str(pair_files[1]), "--layers", "2:4", "--coeffs", ",".join(map(str, COEFFS)),
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert [float(c) for c in lines[0].split()[1:]] == sorted(COEFFS)
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]] for line in lines[1:]}
    assert sorted(rows) == [2, 3]
    monotonic = [layer for layer, probs in rows.items()
                 if all(a < b for a, b in itertools.pairwise(probs)) and probs[-1] - probs[0] > 0.2]
    assert monotonic, result.output


def test_docs_state_the_sweep_the_toy_gives_at_layer_2(choice_model, vectors_file, pair_files):
    """docs/steer.md's sweep numbers (printed by benchmarks/toy_numbers.py) are what the sweep prints here."""
    import re

    from tests.docs import flat

    stated = re.search(r"at layer 2, ([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) / ([\d.]+) for coefficients "
                       r"-2 / -1 / 0 / 1 / 2", flat("steer"))
    assert stated, "docs/steer.md no longer states the sweep"
    result = CliRunner().invoke(cli, ["steer", "sweep", str(choice_model), "--vectors", str(vectors_file), "--pairs",
                                      str(pair_files[1]), "--layers", "2:3", "--coeffs", ",".join(map(str, COEFFS)),
                                      "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[1].split()[1:] == list(stated.groups()), result.output


def test_sweep_draws_its_table_as_a_png_when_asked(choice_model, vectors_file, pair_files, tmp_path):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    result = CliRunner().invoke(cli, ["steer", "sweep", str(choice_model), "--vectors", str(vectors_file), "--pairs",
                                      str(pair_files[1]), "--layers", "3:4", "--coeffs", "-1,0,1", "--plot",
                                      str(plot), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {plot}" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]  # no temporary file left


def test_steering_hook_adds_the_vector_after_the_layer_only_where_asked(refusing_model):
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    ids = lm.tokenizer("<|user|> how do i bake bread ? <|end|> <|assistant|>", add_special_tokens=False,
                       return_tensors="pt")["input_ids"]
    vector = torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(0))
    layer3 = lm.model.model.layers[3]

    def run(**steer_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual entering layer 3 = leaving layer 2, as layer 3 sees it; final hidden states)"""
        seen: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack, torch.inference_mode():
            if steer_kwargs:
                stack.enter_context(steering(lm.model, lm.arch, 2, vector, 3.0, **steer_kwargs))
            handle = layer3.register_forward_pre_hook(lambda _m, args: seen.__setitem__("in3", args[0].clone()))
            stack.callback(handle.remove)
            seen["out"] = lm.model(ids, output_hidden_states=True).hidden_states[-1]
        return seen["in3"][0], seen["out"][0]

    base_in, base_out = run()
    all_in, _ = run(last=None)
    tail_in, tail_out = run(last=2)
    torch.testing.assert_close(all_in, base_in + 3.0 * vector, atol=1e-5, rtol=0)
    torch.testing.assert_close(tail_in[-2:], base_in[-2:] + 3.0 * vector, atol=1e-5, rtol=0)
    assert torch.equal(tail_in[:-2], base_in[:-2]) and torch.equal(tail_out[:-2], base_out[:-2])
    assert not torch.allclose(tail_out[-2:], base_out[-2:])


def test_steering_in_generate_starts_after_the_prompt_and_covers_every_generated_token(refusing_model):
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    ids = lm.tokenizer("<|user|> how do i bake bread ? <|end|> <|assistant|>", add_special_tokens=False,
                       return_tensors="pt")["input_ids"]
    vector = 4 * torch.randn(lm.hidden_size, generator=torch.Generator().manual_seed(1))

    def generate(**steer_kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with contextlib.ExitStack() as stack, torch.inference_mode():
            if steer_kwargs:
                stack.enter_context(steering(lm.model, lm.arch, 2, vector, 1.0, **steer_kwargs))
            out = lm.model.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, pad_token_id=0)
        return out.sequences, list(out.logits)

    def forward_last(tokens: torch.Tensor, last: int) -> torch.Tensor:
        """Logits at the final position of one forward over `tokens`, steering its last `last` positions."""
        with steering(lm.model, lm.arch, 2, vector, 1.0, last=last), torch.inference_mode():
            return lm.model(tokens).logits[:, -1]

    _, plain = generate()
    sequence, steered = generate(last=None)
    assert torch.equal(steered[0], plain[0])  # the prompt is not steered
    for step in range(1, len(steered)):  # each generated token is, and so is every one before it
        torch.testing.assert_close(steered[step], forward_last(sequence[:, : ids.shape[1] + step], step),
                                   atol=1e-4, rtol=0)
    sequence, header = generate(last=1)
    torch.testing.assert_close(header[0], forward_last(ids, 1), atol=1e-5, rtol=0)
    assert not torch.allclose(header[0], plain[0])
    assert "generate" not in vars(lm.model)  # the model is as it was


def test_actadd_pairs_give_the_last_token_difference_of_means(refusing_model, tmp_path):
    p = toy_prompts()
    pairs = [{"positive": h, "negative": n} for h, n in zip(p.harmful_test[:4], p.harmless_test[:4], strict=True)]
    out = tmp_path / "v.safetensors"
    result = CliRunner().invoke(cli, ["steer", "vectors", str(refusing_model), "--pairs",
                                      str(write_jsonl(tmp_path / "p.jsonl", pairs)), "--out", str(out), "-q",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    vectors = load_vectors(out, hidden_size=lm.hidden_size, num_layers=lm.num_layers)

    def last_token(text: str) -> torch.Tensor:
        rows: dict[int, torch.Tensor] = {}
        ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode(), capture_residuals(lm.model, lm.arch, lambda i, h: rows.__setitem__(i, h)):
            lm.model(ids)
        return torch.stack([rows[i][0, -1] for i in range(len(rows))])

    expected = torch.stack([last_token(x["positive"]) - last_token(x["negative"]) for x in pairs]).mean(0)
    np.testing.assert_allclose(vectors, expected.numpy(), atol=1e-5)


def test_steer_chat_with_an_actadd_refusal_vector_makes_harmless_requests_refused_and_back(refusing_model,
                                                                                            tmp_path):
    """ActAdd pairs (chat-formatted harmful vs harmless training requests, as raw texts) give the toy's
    refusal feature; `steer chat` adds it after layer 2 on the assistant header and the reply only."""
    p = toy_prompts()
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    chat_text = lambda m: render(lm.tokenizer, m)  # noqa: E731
    pairs = [{"positive": chat_text(h), "negative": chat_text(n)}
             for h, n in zip(p.harmful_train, p.harmless_train, strict=True)]
    vectors = tmp_path / "refusal.safetensors"
    made = CliRunner().invoke(cli, ["steer", "vectors", str(refusing_model), "--pairs",
                                    str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), "--out", str(vectors), "-q",
                                    "--device", "cpu"])
    assert made.exit_code == 0, made.output

    def refused(messages: list[str], coeff: float) -> float:
        result = CliRunner().invoke(cli, ["steer", "chat", str(refusing_model), "--vectors", str(vectors), "--layer",
                                          "2", "--coeff", str(coeff), "--device", "cpu", "--max-new-tokens", "12"],
                                    input="\n".join(messages) + "\n")
        assert result.exit_code == 0, result.output
        blocks = result.output.strip().split("\n\n")
        assert [b.splitlines()[0] for b in blocks] == [f"> {m}" for m in messages]
        replies = [b.splitlines()[1] if len(b.splitlines()) > 1 else "" for b in blocks]
        return sum(r in REFUSALS for r in replies) / len(replies)

    harmless, harmful = p.harmless_test[:16], p.harmful_test[:16]
    assert refused(harmless, 0.0) == 0.0 and refused(harmful, 0.0) >= 0.9
    assert refused(harmless, 1.0) >= 0.9
    assert refused(harmful, -1.0) <= 0.1


@pytest.mark.parametrize("content, message", [
    ("", "has no pairs"),
    ('{"question": "q", "answer_matching_behavior": "A"}\n', "answer_not_matching_behavior"),
    ('{"question": "q", "answer_matching_behavior": "C", "answer_not_matching_behavior": "A"}\n', "must be A or B"),
    ('{"question": "q", "answer_matching_behavior": "A", "answer_not_matching_behavior": "A"}\n', "both answers"),
    ('{"question": "q", "answer_matching_behavior": "A", "answer_not_matching_behavior": "B"}\n{"question": \n',
     ":2: not valid JSON"),
    ('{"positive": "x"}\n', "negative"),
    ('{"prompt": "x"}\n', "expected question"),
    ('["a", "b"]\n', "expected a JSON object"),
    (b"\xbd\xff binary", "not UTF-8 text"),
])
def test_bad_pairs_file_is_one_clear_error_line(tmp_path, content, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(content) if isinstance(content, bytes) else pairs.write_text(content)
    result = CliRunner().invoke(cli, ["steer", "vectors", str(tmp_path / "no-model"), "--pairs", str(pairs),
                                      "--out", str(tmp_path / "v.safetensors")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "v.safetensors").exists()


def steer_fails(*args: str) -> str:
    result = CliRunner().invoke(cli, ["steer", *args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_folder_as_pairs_file_or_as_output_file_is_refused_before_loading_the_model(tmp_path):
    (tmp_path / "folder").mkdir()
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"positive": "a", "negative": "b"}])
    no_model = str(tmp_path / "no-model")
    assert "is a folder" in steer_fails("vectors", no_model, "--pairs", str(tmp_path / "folder"), "--out",
                                        str(tmp_path / "v.safetensors"))
    line = steer_fails("vectors", no_model, "--pairs", str(pairs), "--out", str(tmp_path / "folder"))
    assert "--out" in line and "is a folder" in line and "vectors.safetensors" in line


def test_coefficients_that_are_not_numbers_and_layers_outside_the_model_are_refused(refusing_model, tmp_path):
    from abliterate.io.direction_file import save_direction

    lm = load_model(refusing_model, dtype="float32", device="cpu")
    v = tmp_path / "v.safetensors"
    save_direction(v, np.ones((lm.num_layers + 1, lm.hidden_size), dtype=np.float32), {"kind": "steering"})
    held = write_jsonl(tmp_path / "held.jsonl", [{"question": "q", "answer_matching_behavior": "A",
                                                  "answer_not_matching_behavior": "B"}])
    model = ["--device", "cpu"]
    assert "coefficient nan is not a finite number" in steer_fails(
        "chat", str(refusing_model), "--vectors", str(v), "--layer", "1", "--coeff", "nan", "--prompt", "hi", *model)
    assert "coefficient inf is not a finite number" in steer_fails(
        "sweep", str(refusing_model), "--vectors", str(v), "--pairs", str(held), "--coeffs", "1,inf", "-q", *model)
    assert "--layers 9:12 selects no layer" in steer_fails(
        "sweep", str(refusing_model), "--vectors", str(v), "--pairs", str(held), "--layers", "9:12", "-q", *model)
    assert "coefficient nan is not a finite number" in steer_fails(
        "bake", str(refusing_model), "--vectors", str(v), "--layer", "1", "--coeff", "nan", "--out",
        str(tmp_path / "baked"))
    assert not (tmp_path / "baked").exists()


def test_a_single_direction_steers_at_whichever_layer_is_chosen(tmp_path):
    from abliterate.io.direction_file import save_direction

    direction = np.arange(8, dtype=np.float32)
    save_direction(tmp_path / "d.safetensors", direction, {"kind": "refusal"})
    vectors = load_vectors(tmp_path / "d.safetensors", hidden_size=8, num_layers=3)
    assert vectors.shape == (4, 8) and all(np.array_equal(row, direction) for row in vectors)
    with pytest.raises(AbliterateError, match=r"shape \[8\]; this model needs \[4, 16\]"):
        load_vectors(tmp_path / "d.safetensors", hidden_size=16, num_layers=3)


def test_sweep_rejects_layers_outside_the_model_and_pairs_without_letters(refusing_model, tmp_path):
    lm = load_model(refusing_model, dtype="float32", device="cpu")
    v = tmp_path / "v.safetensors"
    from abliterate.io.direction_file import save_direction

    save_direction(v, np.ones((lm.num_layers + 1, lm.hidden_size), dtype=np.float32), {"kind": "steering"})
    chat = CliRunner().invoke(cli, ["steer", "chat", str(refusing_model), "--vectors", str(v), "--layer", "9",
                                    "--coeff", "1", "--prompt", "hi", "--device", "cpu"])
    assert chat.exit_code == 2 and "--layer 9 is out of range" in chat.output
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"positive": "a", "negative": "b"}])
    sweep = CliRunner().invoke(cli, ["steer", "sweep", str(refusing_model), "--vectors", str(v), "--pairs", str(plain),
                                     "--device", "cpu", "-q"])
    assert sweep.exit_code == 2 and "A/B items" in sweep.output
