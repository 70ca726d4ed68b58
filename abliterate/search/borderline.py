"""The prompts behind the search's objectives, kept apart from the prompts that evaluate its result.

The search counts refusals of harmful validation prompts and over-refusals of borderline ones (safe
requests that only look dangerous). The built-in borderline set has no splits and `abliterate
evaluate` reports over-refusal on an even spread of it, so the search takes its prompts from the
rest: a point chosen on them is then judged on prompts it was not chosen on.
"""

from __future__ import annotations

from abliterate.errors import AbliterateError
from abliterate.prompts import builtin, load_prompts
from abliterate.prompts.loaders import PromptError

NO_PROMPTS = ("", "none")


def borderline_prompts(source: str | None, n: int, *, field: str | None = None, eval_limit: int = 32) -> list[str]:
    """Up to `n` borderline prompts for the search's over-refusal count ([] for "none" or an empty source).

    For `builtin:overrefusal`, the prompts that `evaluate --limit eval_limit` does not select."""
    if source is None or source.strip().lower() in NO_PROMPTS or n <= 0:
        return []
    from abliterate.evaluate.evaluation import select

    try:
        if source == "builtin:overrefusal":
            every = builtin("overrefusal")
            evaluated = set(select(every, eval_limit))
            prompts = [p for p in every if p not in evaluated]
        else:
            prompts = load_prompts(source, field=field)
    except PromptError as e:
        raise AbliterateError(f"--overrefusal: {e}") from None
    return select(prompts, n)
