"""Jailbreak wrappers: the built-in set, users' files, and one-line errors for bad wrappers."""

from __future__ import annotations

import json

import pytest

from abliterate.errors import AbliterateError
from abliterate.jailbreak.wrappers import SLOT, by_class, class_names, load_wrappers, wrapped
from tests.test_apply import run_cli


def test_builtin_wrappers_have_several_classes_each_with_a_prompt_slot():
    wrappers = load_wrappers("builtin:jailbreaks")
    assert class_names(wrappers) == ["role_play", "refusal_suppression", "prefix_injection", "style_injection",
                                     "hypothetical", "payload_splitting"]
    assert all(len(ws) >= 3 for ws in by_class(wrappers).values())
    assert all(SLOT in w.template for w in wrappers)


def test_a_wrapper_puts_the_request_in_its_slot_and_keeps_other_braces(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text(json.dumps({"class": "json", "template": 'As JSON {"task": "{prompt}"}'}) + "\n"
                    + json.dumps({"class": "grouped", "templates": ["A {prompt}", "B {prompt} B"]}) + "\n")
    wrappers = load_wrappers(path)
    assert wrapped(["do x"], wrappers) == ['As JSON {"task": "do x"}', "A do x", "B do x B"]
    assert [w.template for w in load_wrappers(path, ["grouped"])] == ["A {prompt}", "B {prompt} B"]


@pytest.mark.parametrize(("content", "message"), [
    ('{"class": "role", "template": "no slot here"}', "has no {prompt} slot"),
    ('{"class": "", "template": "x {prompt}"}', "has no class"),
    ('{"class": "empty", "templates": []}', "class 'empty' is empty"),
    ('{"template": "x {prompt}"}', 'expected an object with "class"'),
    ("not json", "not valid JSON"),
    ("", "has no wrappers"),
])
def test_bad_wrapper_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "w.jsonl"
    path.write_text(content + "\n")
    with pytest.raises(AbliterateError, match=message.replace("{", r"\{").replace("(", r"\(")) as caught:
        load_wrappers(path)
    assert "\n" not in str(caught.value)


def test_a_class_that_is_not_in_the_file_is_refused_naming_the_classes():
    with pytest.raises(AbliterateError, match=r"class 'roleplay' has no wrapper.*role_play"):
        load_wrappers("builtin:jailbreaks", ["roleplay"])


@pytest.mark.parametrize("command", ["vectors", "evaluate"])
def test_jailbreak_commands_refuse_bad_wrappers_before_loading_the_model(tmp_path, command):
    path = tmp_path / "w.jsonl"
    path.write_text('{"class": "role", "template": "no slot"}\n')
    out = ["--out", str(tmp_path / "v.safetensors")] if command == "vectors" else []
    code, text = run_cli("jailbreak", command, str(tmp_path / "no-model"), "--wrappers", str(path), *out)
    assert code == 2 and text.startswith("error: ") and "{prompt}" in text and "Traceback" not in text


def test_jailbreak_help_explains_every_option():
    for command, options in (("vectors", ("--wrappers", "--classes", "--harmful", "--limit", "--layer", "--plot",
                                          "--out")),
                             ("evaluate", ("--vectors", "--from", "--coeff", "--layer", "--harmfulness",
                                           "--overrefusal", "--max-new-tokens", "--out"))):
        code, out = run_cli("jailbreak", command, "--help")
        assert code == 0
        for option in options:
            assert option in out, (command, option)
