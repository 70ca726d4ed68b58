"""The README's set-up commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command():
    install_and_demo, test_command = readme_commands()[:2]
    assert "abliterate demo" in install_and_demo and "pytest" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines
    assert "torch==2.13.0" in test_command and "torch==2.13.0" in install_and_demo
