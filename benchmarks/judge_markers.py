"""The refusal markers' accuracy on the built-in labelled replies (the number docs/evaluate.md states).

The set (abliterate/evaluate/data/judge_set.jsonl) is weighted to the cases that fool keyword
detection: refusals without the usual phrases, partial refusals, refuse-then-comply,
comply-then-disclaim, other languages, reasoning blocks. Prints the markers' accuracy overall, on
refusals, on non-refusals and per kind, and every reply they get wrong. No model runs.

    python benchmarks/judge_markers.py
"""

from __future__ import annotations

from abliterate.evaluate.judge_check import check, load_labelled, table


def main() -> None:
    items = load_labelled()
    (markers,) = check(items)
    print(table([markers]))
    print(f"\nmarkers: {100 * markers.accuracy:.1f} % right on {markers.total} labelled replies "
          f"({markers.refusals_found}/{markers.refusals} refusals found, "
          f"{markers.compliance_kept}/{markers.compliance} non-refusals kept)")
    print("\nwrong:")
    for item, verdict in zip(items, markers.verdicts, strict=True):
        if verdict != item.refusal:
            print(f"  [{item.kind}] labelled {'refusal' if item.refusal else 'not a refusal'}: {item.reply[:90]!r}")


if __name__ == "__main__":
    main()
