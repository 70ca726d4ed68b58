"""The README's demo runs the whole job offline and shows refusals removed."""

from __future__ import annotations

import re

from click.testing import CliRunner

from abliterate.cli.main import cli


def test_demo_trains_extracts_edits_verifies_and_removes_refusals(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--workdir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "verify: OK" in result.output
    before, after = map(int, re.search(r"(\d+)% before, (\d+)% after", result.output).groups())
    assert before >= 90 and after <= 10
    assert (tmp_path / "toy-chat-abliterated" / "model.safetensors.index.json").is_file()
