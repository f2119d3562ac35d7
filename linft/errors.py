"""The exception types that linft raises for bad input.

A :class:`LinftError` carries a single line that names the problem and what to
do about it, in the names of the library's parameters (``workers must be >= 0,
got -1``); its ``param`` says which parameter. Library users can catch it like
any other exception; the command-line interface decides how to show it and how
to exit. :func:`worker_died` turns torch's error for a dead DataLoader worker
into one.
"""


class LinftError(Exception):
    """Bad input or an unusable file: the message says what is wrong and how to fix it.

    ``param`` names the parameter (of the function or config the caller passed) that the message is about, as the
    message writes it; the command-line interface shows the option that sets it instead (its one map of parameters
    to flags).
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class HDF5WriteError(LinftError):
    """A write to an HDF5 file failed (full disk, file-size limit): the HDF5 library's state may be broken, and it
    can crash when it closes its handles at interpreter exit. A caller that leaves the process afterwards can skip
    that clean-up; a notebook keeps running and may simply try again once the cause is fixed."""


def worker_died(exc: BaseException) -> LinftError | None:
    """The one-line error for a dead decoding worker (torch's RuntimeError, raised by the next batch fetch or at
    any point by its SIGCHLD handler), or None when ``exc`` is something else."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "DataLoader worker" not in text or \
            not ("exited unexpectedly" in text or "killed by signal" in text):  # not an error raised in a worker
        return None
    reason = str(exc).strip().splitlines()[0]
    return LinftError(f"an image-decoding worker died ({reason}); the machine may be short of memory: re-run the "
                      f"same call with fewer workers (0 decodes in the main process); finished work is kept",
                      param="workers")
