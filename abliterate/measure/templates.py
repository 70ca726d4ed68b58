"""Chat formatting and the post-instruction positions the refusal direction is read at.

The post-instruction tokens are what the chat template puts after the user's message (end of
turn, assistant header, a thinking block the template opens, ...). They are found by rendering
the template around a sentinel message: everything after the sentinel is the suffix, whatever
the template, so no per-model tables are needed.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import AbliterateError

SENTINEL = "ABLITERATE_SENTINEL_MESSAGE"


def load_template(template: str | None) -> str | None:
    """--template: a path to a Jinja chat template, or the template text itself."""
    if template is None:
        return None
    path = Path(template)
    if len(template) < 4096 and "{" not in template and path.is_file():
        return path.read_text()
    if "{{" not in template and "{%" not in template:
        raise AbliterateError(f"--template {template!r} is neither a file nor a Jinja chat template")
    return template


def render(tokenizer, instruction: str, template: str | None = None, **template_kwargs) -> str:
    """The prompt text for one user instruction, ending with the generation prompt."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise AbliterateError(
            "the tokenizer has no chat template; pass --template FILE (a Jinja chat template) so prompts are "
            "formatted the way the model was trained"
        )
    messages = [{"role": "user", "content": instruction}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=template, **template_kwargs)
    except Exception as e:  # jinja errors, template-raised exceptions
        raise AbliterateError(f"the chat template failed to render a user message: {e}") from None


def post_instruction_suffix(tokenizer, template: str | None = None, **template_kwargs) -> str:
    """The text the template places after the user's message (end of turn, assistant header...)."""
    text = render(tokenizer, SENTINEL, template, **template_kwargs)
    at = text.rfind(SENTINEL)
    if at < 0:
        raise AbliterateError("the chat template does not include the user's message verbatim; pass --template")
    return text[at + len(SENTINEL):]


def count_suffix_tokens(tokenizer, prompt: str, suffix: str) -> int:
    """How many trailing tokens of `prompt` lie entirely inside its post-instruction suffix.

    Uses character offsets, so a token that merges the message's last characters with the suffix's
    first ones is not counted as post-instruction.
    """
    if not suffix:
        return 0
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    start = len(prompt) - len(suffix)
    return sum(1 for a, _ in enc["offset_mapping"] if a >= start)


def post_instruction_count(tokenizer, prompts: list[str], suffix: str) -> int:
    """Number of post-instruction positions shared by all prompts (the smallest count)."""
    counts = {count_suffix_tokens(tokenizer, p, suffix) for p in prompts}
    n = min(counts)
    if n == 0:
        raise AbliterateError(
            "found no post-instruction tokens after the user message in the chat template; pass --template "
            "with a template that adds an assistant header after the user's turn"
        )
    return n
