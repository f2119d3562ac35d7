"""The one exception type that linft raises for bad input.

A :class:`LinftError` carries a single line that names the problem and what to
do about it; the command-line interface prints it without a traceback and
exits with status 2 (a failed check, such as ``cache verify``, exits with 1).
Library users can catch it like any other exception. :func:`worker_died` turns torch's error for a dead
DataLoader worker into one.
"""


class LinftError(Exception):
    """Bad input or an unusable file: the message says what is wrong and how to fix it.

    ``exit_at_once`` asks a command-line caller to leave without running the
    interpreter's clean-up: after a failed HDF5 write (full disk, file-size
    limit) the HDF5 library crashes when it closes its handles at exit, which
    would turn a clean one-line error into a segmentation fault.

    ``param`` names the parameter (of the function or config the caller passed) that the message is about, as the
    message writes it; the command-line interface shows the option that sets it instead (its one map of parameters
    to flags).
    """

    def __init__(self, message: str, exit_at_once: bool = False, *, param: str | None = None):
        super().__init__(message)
        self.exit_at_once = exit_at_once
        self.param = param


def worker_died(exc: BaseException) -> LinftError | None:
    """The one-line error for a dead decoding worker (torch's RuntimeError, raised by the next batch fetch or at
    any point by its SIGCHLD handler), or None when ``exc`` is something else."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "DataLoader worker" not in text or \
            not ("exited unexpectedly" in text or "killed by signal" in text):  # not an error raised in a worker
        return None
    reason = str(exc).strip().splitlines()[0]
    return LinftError(f"an image-decoding worker died ({reason}); the machine may be short of memory: re-run the "
                      f"same command with fewer --workers (0 decodes in the main process); finished work is kept")
