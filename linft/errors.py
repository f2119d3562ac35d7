"""The one exception type that linft raises for bad input.

A :class:`LinftError` carries a single line that names the problem and what to
do about it; the command-line interface prints it without a traceback and
exits with status 2. Library users can catch it like any other exception.
"""


class LinftError(Exception):
    """Bad input or an unusable file: the message says what is wrong and how to fix it."""
