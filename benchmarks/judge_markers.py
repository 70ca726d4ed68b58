"""The refusal markers' and the answer check's accuracy on the built-in labelled replies (the numbers
docs/evaluate.md states).

The set (abliterate/evaluate/data/judge_set.jsonl) is weighted to the cases that fool keyword
detection: refusals without the usual phrases, partial refusals, refuse-then-comply,
comply-then-disclaim, other languages, reasoning blocks. Prints the markers' accuracy overall, on
refusals, on non-refusals and per kind, and every reply they get wrong; then the same for whether a reply
answered (markers plus evaluate/answers.py's check) on that set and the answer set
(abliterate/evaluate/data/answer_set.jsonl: empty, repetitive, garbled and off-topic replies, and long real
answers). No model runs.

    python benchmarks/judge_markers.py
"""

from __future__ import annotations

from abliterate.evaluate.judge_check import check, check_answers, load_labelled, table

NON_ANSWER_KINDS = ("empty", "repetition", "garbled", "off_topic")


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
    answers = load_labelled(answers=True)
    (heuristic,) = check_answers(answers)
    print("\n" + table([heuristic], "non-answers found", "answers kept"))
    found = sum(heuristic.per_kind[k][0] for k in NON_ANSWER_KINDS)
    total = sum(heuristic.per_kind[k][1] for k in NON_ANSWER_KINDS)
    kept, long = heuristic.per_kind["long_answer"]
    print(f"\nanswer check: {found}/{total} of the empty, repetitive, garbled and off-topic replies found "
          f"({', '.join(f'{k} {heuristic.per_kind[k][0]}/{heuristic.per_kind[k][1]}' for k in NON_ANSWER_KINDS)}), "
          f"{kept}/{long} long answers kept")


if __name__ == "__main__":
    main()
