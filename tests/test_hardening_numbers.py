"""docs/jailbreak.md's hardening table is what benchmarks/hardening.py prints: its unhardened and coefficient-1 rows
are measured again here on the toy trained with its jailbreak behaviour (the session's `jailbreak_model`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from abliterate.demo.toy import jailbreak_wrappers, toy_prompts
from tests.docs import text

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("hardening", ROOT / "benchmarks" / "hardening.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["hardening"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_stated_hardening_rows_are_what_the_script_measures(jailbreak_model, tmp_path):
    script = _script()
    prompts = toy_prompts()
    rows = script.hardening_rows(jailbreak_model, script.load_wrappers_records(jailbreak_wrappers()),
                                 prompts.harmful_test, prompts.harmful_train, prompts.harmless_test, tmp_path,
                                 source="role_play", layer=1, coeffs=[1.0])
    assert [(r.way, r.coeff) for r in rows] == [("none", 0.0), ("hook", 1.0), ("bake", 1.0), ("adapter", 1.0)]
    assert rows[2].refused == rows[3].refused  # the baked bias and its adapter compute the same thing
    stated = text("jailbreak")
    for line in script.table(rows, "role_play").splitlines():
        assert line in stated, f"docs/jailbreak.md's table lacks {line!r}: rerun benchmarks/hardening.py, paste it"
