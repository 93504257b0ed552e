"""The one exception type users see: a bad input, named by file and problem."""


class MaltError(Exception):
    """Bad input or an impossible request. The CLI prints `str(err)` as one line, no traceback."""


def fail(path, problem: str) -> "MaltError":
    """Build the error for `path`; `raise fail(path, "...")` reads as the message."""
    return MaltError(f"{path}: {problem}")
