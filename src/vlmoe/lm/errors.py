"""The exception the pretrained-weights layer raises for missing or bad weight files."""

from __future__ import annotations

from vlmoe.data.errors import DataError


class WeightsError(DataError):
    """A weight file or package that is absent, half-downloaded, corrupt or unsupported.

    A ``DataError`` (so the CLI already prints it as one ``vlmoe: error:`` line and exits 1);
    the message names the file and what was expected, and where it helps, how to fix it by hand.
    """
