"""Reading variables into values, collecting every problem instead of stopping at the first.

Why: an operator fixing a misconfigured deployment wants the whole list in one start-up, not one
problem per restart; every section of load() reads through one Reader and adds to its list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from oauth_sidecar.config.files import MAX_SECRET_FILE_BYTES, FileTooLarge, read_capped_text
from oauth_sidecar.config.variables import VARIABLES

T = TypeVar("T")
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def split_list(value: str) -> tuple[str, ...]:
    """Comma- or space-separated items, order kept, duplicates and blanks dropped."""
    items = (item.strip() for item in value.replace(",", " ").split())
    return tuple(dict.fromkeys(item for item in items if item))


class Reader:
    """Reads variables, collecting every problem instead of stopping at the first."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return VARIABLES[name][0]
        return value.strip()

    def secret(self, name: str) -> str:
        """NAME, or the content of the file NAME_FILE names, so that no secret needs to be in
        the environment (a mounted Kubernetes or Docker secret). Never both: which one wins
        would be a guess. One trailing newline, as `echo` and editors leave, is not part of it."""
        path = self.env.get(f"{name}_FILE", "").strip()
        if not path:
            return self.raw(name)
        if self.env.get(name, "").strip():
            self.problems.append(f"{name} and {name}_FILE are both set: give the secret once")
            return ""
        try:
            text = read_capped_text(path, MAX_SECRET_FILE_BYTES)
        except FileTooLarge:
            self.problems.append(f"{name}_FILE {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
            return ""
        except OSError as exc:
            self.problems.append(f"{name}_FILE {path} cannot be read: {exc.strerror or exc}")
            return ""
        except UnicodeDecodeError:
            self.problems.append(f"{name}_FILE {path} is not UTF-8 text")
            return ""
        value = text.removesuffix("\n").removesuffix("\r")
        if not value.strip():
            self.problems.append(f"{name}_FILE {path} is empty")
        elif any(c in value for c in "\r\n\0"):
            self.problems.append(f"{name}_FILE {path} has more than one line")
        else:
            return value
        return ""

    def required(self, name: str, hint: str) -> str:
        value = self.raw(name)
        if not value:
            self.problems.append(f"{name} is required: {hint}")
        return value

    def number(self, name: str, cast: Callable[[str], T], low: T, high: T) -> T:
        value = self.raw(name)
        try:
            parsed = cast(value)
        except ValueError:
            self.problems.append(f"{name}={value!r} is not a number")
            return cast(VARIABLES[name][0] or str(low))  # no default (a port): any placeholder
        if not low <= parsed <= high:  # type: ignore[operator]
            self.problems.append(f"{name}={value} is out of range: use {low}..{high}")
        return parsed

    def flag(self, name: str) -> bool:
        value = self.raw(name).lower()
        if value in TRUE_WORDS:
            return True
        if value not in FALSE_WORDS:
            self.problems.append(f"{name}={value!r} is not a boolean: use true or false")
        return False

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name).lower()
        if value not in choices:
            self.problems.append(f"{name}={value!r} is not one of {', '.join(choices)}")
        return value
