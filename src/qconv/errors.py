"""qconv's one exception type: every bad input, failed backend or malformed file raises it."""


class QconvError(ValueError):
    """A problem the user can fix; the message says what was wrong and, where possible, how to fix it."""


class BackendUnavailable(QconvError):
    """The requested backend cannot run here; the message says what was looked for and how to fix it."""
