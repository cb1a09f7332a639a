"""The one exception type the data layer raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """Bad user data: a missing or corrupt file, an invalid JSONL line, an empty question.

    The message is one line that names the problem and where it is (file, line number, field)
    and, where it helps, what was expected versus what was found, e.g.
    ``data.jsonl:3: field "question" must be a non-empty string, got ""``. The CLI prints it
    as is on stderr, so it must never span lines.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(text: object) -> str:
    """Collapse any whitespace run (newlines from library messages included) to one space."""
    return " ".join(str(text).split())
