"""Errors a user can cause; the CLI prints them as one sentence, without a traceback."""


class CcatError(RuntimeError):
    """A user-facing error: bad path, mismatched data, a run that cannot continue."""
