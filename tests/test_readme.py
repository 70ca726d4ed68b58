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


def short(x: float) -> str:
    """1e-05 -> 1e-5: how the README writes a tolerance."""
    return f"{x:.0e}".replace("e-0", "e-")


def flat_readme() -> str:
    return " ".join((ROOT / "README.md").read_text().split())


def test_readme_states_the_tolerances_the_exactness_tests_assert():
    """Each logit tolerance the README states is the constant its tests use, not a looser one."""
    from tests.families import EFFECT_FLOOR, LOGIT_TOLERANCE
    from tests.test_bake import TOLERANCE as BAKE
    from tests.test_norm_preserve import PRESERVE_TOLERANCE

    readme = flat_readme()
    assert f"the tests check logits to {short(LOGIT_TOLERANCE)} in float32 for every family" in readme
    assert f"moves some logit by at least {EFFECT_FLOOR:g}" in readme
    assert f"the formula applied in memory (within {short(PRESERVE_TOLERANCE)} in float32)" in readme
    assert f"match the hook's within 7.2e-7 in float32, printed by `python3 benchmarks/toy_numbers.py bake`; " \
           f"the tests assert {short(BAKE)})" in readme
    assert f"Phi-3 and Granite models (within {short(BAKE)} in float32;" in readme
    assert f"at `--scale 2`; the tests assert {short(BAKE)})" in readme


def test_readme_states_the_residual_verify_and_the_apply_tests_allow():
    from abliterate.edit.verify import FLOAT32_RESIDUAL_TOLERANCE

    assert f"At scale 1 at most {short(FLOAT32_RESIDUAL_TOLERANCE)} |W| may remain along r in float32" in flat_readme()
    source = (ROOT / "tests" / "test_apply.py").read_text()
    assert f"along.norm() <= {short(FLOAT32_RESIDUAL_TOLERANCE)} * a.double().norm()" in source
