"""The one exception type users see: its message is a single line naming the problem and the fix."""


class SunEdgeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2.

    Messages are one line: what is wrong, and what to do about it.
    """
