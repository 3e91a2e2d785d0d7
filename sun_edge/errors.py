"""The one exception type users see: its message is a single line naming the problem and the fix."""


class SunEdgeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with status 2.

    Messages are one line: what is wrong, and what to do about it.
    """


def first_names(names: list[str] | tuple[str, ...], n: int = 3) -> str:
    """``"a, b, c, ..."``: the first ``n`` names of a list, for one-line error messages."""
    shown = ", ".join(names[:n])
    return shown + (", ..." if len(names) > n else "")
