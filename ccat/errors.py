"""Errors a user can cause; both CLIs print them as one sentence, without a traceback."""


class UserError(Exception):
    """The base of every error a user can cause and fix (a bad path, a wrong layout, a
    mismatched dataset, an unknown config key): ``ccat`` and ``ccat-data`` catch this one
    class and print its message as one line with a non-zero exit."""


class CcatError(UserError, RuntimeError):
    """A user-facing error: bad path, mismatched data, a run that cannot continue."""
