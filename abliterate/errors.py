"""The one exception type users see: a single line naming the problem and the fix."""


class AbliterateError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    The message is one line: what is wrong (naming the file or option) and how to fix it.
    The CLI prints it and exits with status 2.
    """


def first_line(error: BaseException) -> str:
    """The first non-blank line of a library's error message (or its type): what an AbliterateError quotes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
