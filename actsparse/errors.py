"""The one exception type users catch: every user-facing mistake raises ActsparseError."""


class ActsparseError(ValueError):
    """A user-facing error: the message says what was wrong, what was expected and what to do."""
