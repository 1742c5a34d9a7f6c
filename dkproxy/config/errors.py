"""ConfigError (FILE:LINE messages), reading a configuration file, and pydantic validation
errors rewritten as `FILE: key.path: message`."""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

COMMAND_LINE = "command line"


class ConfigError(Exception):
    """A configuration problem, located as precisely as the input allows.

    str() is "FILE:LINE: message", "FILE: key.path: message" (TOML) or
    "command line: --opt: message", so an operator can go straight to the culprit.
    """

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}: {self.message}"
        return f"{self.source}: {self.message}"

    @classmethod
    def at(cls, where: str, message: str) -> ConfigError:
        """Build from a location string as stored in `source` fields.

        "FILE:LINE" -> (FILE, LINE); "FILE: key.path" -> (FILE, None, "key.path: message");
        anything else is used as the source as it is.
        """
        match = re.fullmatch(r"(.+):(\d+)", where)
        if match:
            return cls(match.group(1), int(match.group(2)), message)
        head, sep, tail = where.partition(": ")
        if sep and tail:
            return cls(head, None, f"{tail}: {message}")
        return cls(where, None, message)


class HelpRequested(Exception):
    """`--help` was given; `text` is the usage text to print (exit status 0)."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


def read_text(path: str, what: str = "configuration file") -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read {what} ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(path, line, "not valid UTF-8") from None


def _loc_text(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class found by following `loc` (field names and list indexes) from `model`."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _unwrap(info.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """list[X] -> X, X | None -> X (for locating nested models)."""
    for _ in range(3):
        origin = typing.get_origin(annotation)
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if args and origin in (list, typing.Union, types.UnionType):
            annotation = args[0]
        else:
            break
    return annotation


def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    problems: list[str] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            allowed = ", ".join(parent.model_fields) if parent else ""
            message = f"unknown key (allowed: {allowed})" if allowed else "unknown key"
        elif error["type"] == "literal_error":
            message = message.replace("Input should be", "expected")
        problems.append(f"{_loc_text(loc)}: {message}")
    return "; ".join(problems)
