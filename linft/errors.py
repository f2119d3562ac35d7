"""The one exception type that linft raises for bad input.

A :class:`LinftError` carries a single line that names the problem and what to
do about it; the command-line interface prints it without a traceback and
exits with status 2 (a failed check, such as ``cache verify``, exits with 1).
Library users can catch it like any other exception.
"""


class LinftError(Exception):
    """Bad input or an unusable file: the message says what is wrong and how to fix it.

    ``exit_at_once`` asks a command-line caller to leave without running the
    interpreter's clean-up: after a failed HDF5 write (full disk, file-size
    limit) the HDF5 library crashes when it closes its handles at exit, which
    would turn a clean one-line error into a segmentation fault.
    """

    def __init__(self, message: str, exit_at_once: bool = False):
        super().__init__(message)
        self.exit_at_once = exit_at_once
