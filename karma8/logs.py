"""Log setup; only the CLI calls it (library code just logs).

Two formats, one line per event on stderr:

- ``text`` (the default): time, level, role (api, bucket, ...), logger, message.
- ``json``: one JSON object per line with ``ts`` (ISO 8601, UTC), ``level``, ``role``,
  ``logger``, ``msg``, the context found in the message as fields (``session``,
  ``upload``, ``bucket``, ``name``) and ``exc`` (the traceback) when there is one.

Messages carry their context as ``key=value`` tokens (``session=3 upload=9f... name='a/b'``);
the JSON formatter copies the first of each key into a field and leaves ``msg`` as is, so
both formats say the same thing and code logs the same way for both.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
from datetime import UTC, datetime

#: The formats ``--log-format`` and ``KARMA8_LOG_FORMAT`` accept.
FORMATS = ("text", "json")

# ``name=%r`` renders as a Python string literal, in single or double quotes.
_NAME = re.compile(r"""(?<![\w.])name=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
_TOKEN = re.compile(r"(?<![\w.])(session|upload|bucket)=([^\s,;:()'\"]+)")


def context_of(message: str) -> dict[str, str | int]:
    """The context tokens of a log message: ``session`` (an int), ``upload``, ``bucket``, ``name``.

    Only the first occurrence of each key counts (later ones name a second party, such as
    the destination of a move).
    """
    found: dict[str, str | int] = {}
    for match in _TOKEN.finditer(message):
        key, value = match.group(1), match.group(2)
        if key in found:
            continue
        found[key] = int(value) if key == "session" and value.isdigit() else value
    if (name := _NAME.search(message)) is not None:
        try:
            found["name"] = ast.literal_eval(name.group(1))
        except (ValueError, SyntaxError):  # not a literal after all: keep what is there
            found["name"] = name.group(1)[1:-1]
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the context of its message as fields."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname,
            "role": self._role,
            "logger": record.name,
            "msg": message,
        }
        for key, value in context_of(message).items():
            line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def text_formatter(role: str) -> logging.Formatter:
    """The human-readable format (the default)."""
    return logging.Formatter(f"%(asctime)s %(levelname)-7s {role} %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")


def configure_logging(level: str, role: str, log_format: str = "text") -> None:
    """One line per event on stderr, as ``text`` or ``json`` (see the module docstring).

    Raises:
        ValueError: an unknown format.
    """
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r} (use {' or '.join(FORMATS)})")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if log_format == "json" else text_formatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # h2 and hpack log every frame at DEBUG; they are never what an operator wants.
    for noisy in ("hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
