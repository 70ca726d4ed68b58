"""The one exception type users see: a single line naming the problem and the fix."""


class AbliterateError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    The message is one line: what is wrong (naming the file or option) and how to fix it.
    The CLI prints it and exits with status 2.
    """
