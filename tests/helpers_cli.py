"""Assertions on CLI results shared by the reliability tests."""

from __future__ import annotations


def one_line_error(result, *words: str) -> None:
    """``result`` (a click ``Result``) failed with exit status 1 and one line, no traceback, naming ``words``."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for w in words:
        assert w in result.output, result.output
