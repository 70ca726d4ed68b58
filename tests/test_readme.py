"""The README's set-up commands are the ones CI and users run; the README and docs/ state the tolerances the tests
assert; every page is reachable and every link resolves; the README's results are the numbers its pages state."""

import re

from tests.docs import ROOT, flat, text


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", text("README"))


def test_ci_runs_exactly_the_readme_test_command():
    install_and_demo, test_command = readme_commands()[:2]
    assert "abliterate demo" in install_and_demo and "pytest" in test_command
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test_command in ci_lines
    assert "torch==2.13.0" in test_command and "torch==2.13.0" in install_and_demo


def short(x: float) -> str:
    """1e-05 -> 1e-5: how the docs write a tolerance."""
    return f"{x:.0e}".replace("e-0", "e-")


def test_docs_state_the_tolerances_the_exactness_tests_assert():
    """Each logit tolerance the README and docs/ state is the constant its tests use, not a looser one."""
    from tests.families import EFFECT_FLOOR, LOGIT_TOLERANCE
    from tests.test_bake import TOLERANCE as BAKE
    from tests.test_norm_preserve import PRESERVE_TOLERANCE

    assert (f"(within {short(LOGIT_TOLERANCE)} in float32, for an edit that moves some logit by at least "
            f"{EFFECT_FLOOR:g})") in flat("README")
    apply = flat("apply")
    assert f"the tests check logits to {short(LOGIT_TOLERANCE)} in float32 for every family" in apply
    assert f"moves some logit by at least {EFFECT_FLOOR:g}" in apply
    assert f"the formula applied in memory (within {short(PRESERVE_TOLERANCE)} in float32)" in apply
    steer = flat("steer")
    assert f"match the hook's within 7.2e-7 in float32, printed by `python3 benchmarks/toy_numbers.py bake`; " \
           f"the tests assert {short(BAKE)})" in steer
    assert f"Phi-3 and Granite models (within {short(BAKE)} in float32;" in steer
    assert f"at `--scale 2`; the tests assert {short(BAKE)})" in steer


def test_docs_state_the_residual_verify_and_the_apply_tests_allow():
    from abliterate.edit.verify import FLOAT32_RESIDUAL_TOLERANCE

    assert f"At scale 1 at most {short(FLOAT32_RESIDUAL_TOLERANCE)} |W| may remain along r in float32" in flat("verify")
    source = (ROOT / "tests" / "test_apply.py").read_text()
    assert f"along.norm() <= {short(FLOAT32_RESIDUAL_TOLERANCE)} * a.double().norm()" in source


def test_every_docs_page_is_linked_from_the_readme_and_every_relative_link_resolves():
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f"(docs/{p})" not in text("README")] == []
    for source in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", source.read_text()):
            assert (source.parent / target).exists(), f"{source.name} links to {target}, which does not exist"


def test_readme_results_are_the_numbers_their_pages_state():
    """Each number in a row of the README's results table is stated on the docs page the row links to, where
    the tests that check it (or the script that prints it) are named."""
    results = text("README").split("### On the toy model", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in results.splitlines() if line.startswith("| ") and "(docs/" in line]
    assert len(rows) >= 5
    for row in rows:
        stated = row.split("|")[2]
        page = re.search(r"\(docs/([a-z-]+)\.md\)", row).group(1)
        numbers = re.findall(r"\d+(?:\.\d+)?(?:e-\d+)?", stated)
        assert numbers and [n for n in numbers if n not in flat(page)] == [], (row, page)
