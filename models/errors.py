"""The error hierarchy: permanent errors are never retried, transient ones are."""


class ReturnsError(Exception):
    """Base of every error this package raises on purpose; its message is safe to show a user."""


class PermanentError(ReturnsError):
    """Retrying cannot help: bad input, not eligible, a rule says no."""


class InvalidInput(PermanentError):
    """The input is malformed or contradicts stored facts; nothing was written."""


class NotFound(PermanentError):
    """The thing named does not exist (or, for R13, may not be revealed)."""


class InvalidTransition(PermanentError):
    """The lifecycle does not allow this change from the current state."""


class TransientError(ReturnsError):
    """Worth retrying: database busy, SMTP down, gateway timeout."""


class StaleState(TransientError):
    """A compare-and-set lost: someone else changed the row first."""
