"""User-facing errors: one line that names the file or option and the fix, never a traceback."""

from __future__ import annotations


class FisherscanError(Exception):
    """A mistake in the user's input (a file, a folder, an option). The CLI prints it as one line, exit code 2.

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    ``FisherscanError("Caught FisherscanError in DataLoader worker ... Original Traceback ...")``;
    the original one-line message is recovered here so the user still sees one line.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:
            lines = [line for line in message.strip().splitlines() if line.strip()]
            last = lines[-1]
            prefix = "FisherscanError: "
            message = last.split(prefix, 1)[1] if prefix in last else last
        super().__init__(message)
