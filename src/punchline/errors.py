"""The error hierarchy every layer shares.

Following h11, errors say who is at fault: `LocalError` when this side misused something
(bad configuration, a missing file), `RemoteError` when a peer or server sent something wrong.
Every user-facing error carries a message written for a person, and the CLI turns any
`PunchlineError` into that message and an exit code, never a traceback.
"""


class PunchlineError(Exception):
    """Base of every error punchline raises on purpose."""

    exit_code = 1


class LocalError(PunchlineError):
    """This side is misconfigured or misused an API."""


class RemoteError(PunchlineError):
    """A peer or server sent something wrong or refused us."""


class SecurityError(PunchlineError):
    """A check that protects the user failed: wrong CA, forged signature, tampered data."""

    exit_code = 3
