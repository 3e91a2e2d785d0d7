"""Calling the CLI in-process from tests: its exit code and output, and its one error line."""

from __future__ import annotations

from sun_edge.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``sun-edge ARGV`` through ``main``: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The single ``error:`` line of ``err``; fails on none, several, or a traceback."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]
