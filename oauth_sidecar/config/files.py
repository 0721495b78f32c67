"""One size-checked read of a small text file: a mounted secret or an allow-list.

Why one reader: a mistyped path can name a log file or a device, and every file the
configuration reads must then fail the same clear way instead of filling memory; the check is a
single bounded read, so a file that grows between a stat and the read cannot slip past it.
"""

from __future__ import annotations

MAX_SECRET_FILE_BYTES = 65536  # a key, a password, a token or a URI: far beyond any real one


class FileTooLarge(OSError):
    """The file holds more than the reader takes; an OSError, so callers handle it like any
    other unreadable file."""

    def __init__(self, path: str, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.path = path
        self.limit = limit


def read_capped_text(path: str, limit: int) -> str:
    """The UTF-8 text of the file at path, at most limit bytes long.

    Raises FileTooLarge, another OSError when the file cannot be read, or UnicodeDecodeError.
    """
    with open(path, "rb") as file:
        content = file.read(limit + 1)
    if len(content) > limit:
        raise FileTooLarge(path, limit)
    return content.decode()
