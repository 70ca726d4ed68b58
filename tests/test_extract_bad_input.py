"""`abliterate extract` on broken input: one clear line naming the problem, non-zero exit, no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abliterate.demo.toy import toy_prompts
from tests.test_apply import run_cli


@pytest.fixture(scope="module")
def harmless_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "harmless.txt"
    path.write_text("\n".join(toy_prompts().harmless_train))
    return path


def extract_fails(model: Path, harmful: Path, harmless: Path, out: Path, *extra: str) -> str:
    """Run the CLI, check it failed cleanly, and return its one error line."""
    code, output = run_cli("extract", str(model), "--harmful", str(harmful), "--harmless", str(harmless),
                           "--out", str(out), "-q", "--device", "cpu", *extra)
    assert code != 0, output
    assert not [p.name for p in out.parent.iterdir() if out.name in p.name and not p.is_dir()]  # nor a temp file
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


def test_an_empty_prompt_file_is_refused(refusing_model, harmless_file, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    line = extract_fails(refusing_model, tmp_path / "empty.txt", harmless_file, tmp_path / "d.safetensors")
    # the option and file at fault, what is wrong and the fix (the path's own digits and name cannot satisfy this)
    assert f"--harmful: {tmp_path / 'empty.txt'}: contains no prompts" in line and "Add at least 8." in line


def test_an_unknown_prompt_file_format_is_refused(refusing_model, harmless_file, tmp_path):
    (tmp_path / "prompts.xml").write_text("<prompts><p>how do i bake bread ?</p></prompts>")
    line = extract_fails(refusing_model, tmp_path / "prompts.xml", harmless_file, tmp_path / "d.safetensors")
    assert "prompts.xml" in line and ".txt" in line  # names the supported formats


def test_a_json_file_without_the_prompt_field_is_refused(refusing_model, harmless_file, tmp_path):
    rows = [{"text": p} for p in toy_prompts().harmful_train]
    (tmp_path / "harmful.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    line = extract_fails(refusing_model, tmp_path / "harmful.jsonl", harmless_file, tmp_path / "d.safetensors",
                         "--field", "instruction")
    assert "harmful.jsonl" in line and "instruction" in line and "text" in line  # the missing field, those there


def test_a_csv_file_without_the_prompt_column_is_refused(refusing_model, harmless_file, tmp_path):
    (tmp_path / "harmful.csv").write_text("id,goal\n" + "\n".join(f"{i},x{i}" for i in range(20)))
    line = extract_fails(refusing_model, tmp_path / "harmful.csv", harmless_file, tmp_path / "d.safetensors",
                         "--field", "prompt")
    assert "harmful.csv" in line and "'prompt'" in line and "goal" in line


def test_fewer_than_eight_prompts_are_refused(refusing_model, harmless_file, tmp_path):
    (tmp_path / "few.txt").write_text("\n".join(toy_prompts().harmful_train[:5]))
    line = extract_fails(refusing_model, tmp_path / "few.txt", harmless_file, tmp_path / "d.safetensors")
    assert f"--harmful: {tmp_path / 'few.txt'}: found 5 prompts, need at least 8." in line


@pytest.mark.parametrize("head", ["BertModel", "BertForMaskedLM"])
def test_a_model_that_is_not_a_causal_lm_is_refused(harmless_file, tmp_path, head):
    import transformers

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37)
    getattr(transformers, head)(config).save_pretrained(tmp_path / "bert")  # config.json + model.safetensors
    line = extract_fails(tmp_path / "bert", harmless_file, harmless_file, tmp_path / "d.safetensors")
    assert "bert" in line and head in line and "not a causal language model" in line


def test_a_folder_without_config_is_refused(harmless_file, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"")
    line = extract_fails(tmp_path / "weights", harmless_file, harmless_file, tmp_path / "d.safetensors")
    assert "weights" in line and "config.json" in line


def test_an_output_path_that_is_a_folder_is_refused_before_loading_the_model(harmless_file, tmp_path):
    (tmp_path / "out").mkdir()
    line = extract_fails(tmp_path / "no-model-here", harmless_file, harmless_file, tmp_path / "out")
    assert "--out" in line and "folder" in line and "direction.safetensors" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_a_model_folder_without_tokenizer_files_is_refused_before_loading_weights(refusing_model, harmless_file,
                                                                                  tmp_path):
    import shutil

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in refusing_model.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, folder / f.name)
    line = extract_fails(folder, harmless_file, harmless_file, tmp_path / "d.safetensors")
    assert "cannot load the tokenizer of" in line and "no-tokenizer" in line and "tokenizer.json" in line
