"""The one exception type users see: its message is a single line naming the problem and the fix."""


class SunEdgeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2.

    Messages are one line: what is wrong, and what to do about it.
    """


def first_names(names: list[str] | tuple[str, ...], n: int = 3) -> str:
    """``"a, b, c, ..."``: the first ``n`` names of a list, for one-line error messages."""
    shown = ", ".join(names[:n])
    return shown + (", ..." if len(names) > n else "")


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message (its type name if it has none), for one-line errors
    that wrap a library's multi-line exception."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
