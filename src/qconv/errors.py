"""qconv's exceptions: one base, split by who can fix the problem.

- InputError: a bad argument, shape, scale or file; the user fixes it (the CLI exits 2).
- BackendError: a driver, compiler or kernel failure; the message carries the driver's words
  (the CLI exits 1). BackendUnavailable: the backend cannot run on this machine at all.
"""


class QconvError(Exception):
    """Base of every error qconv raises on purpose; the message says what was wrong and how to fix it."""


class InputError(QconvError, ValueError):
    """A problem with what the caller passed: arguments, shapes, scales, files."""


class BackendError(QconvError, RuntimeError):
    """A backend failed while running: a driver, NVRTC or C status other than a bad argument."""


class BackendUnavailable(BackendError):
    """The requested backend cannot run here; the message says what was looked for and how to fix it."""


class QconvWarning(UserWarning):
    """A call that runs but is probably not what the user meant (a scale that zeroes a tensor)."""
