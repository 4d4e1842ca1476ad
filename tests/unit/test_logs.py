"""Log formats: text unchanged, JSON lines with the message's context as fields."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from karma8.logs import JsonFormatter, configure_logging, context_of, text_formatter

#: 2024-05-06T07:08:09.123 UTC
CREATED = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC).timestamp()


def record(msg: str, *args: object, level: int = logging.INFO, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("the disk is on fire")
        except RuntimeError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("karma8.api.upload", level, __file__, 1, msg, args, exc_info)
    rec.created = CREATED
    return rec


def test_json_line_has_the_context_of_a_session_line() -> None:
    rec = record(
        "session=%d upload=%s name=%r size=%d to %s",
        12,
        "0123456789abcdef0123456789abcdef",
        'média/it\'s a "file".bin',
        3145733,
        "b1,b2",
        level=logging.WARNING,
    )
    line = JsonFormatter("api").format(rec)
    assert "\n" not in line
    assert json.loads(line) == {
        "ts": "2024-05-06T07:08:09.123Z",
        "level": "WARNING",
        "role": "api",
        "logger": "karma8.api.upload",
        "msg": rec.getMessage(),
        "session": 12,
        "upload": "0123456789abcdef0123456789abcdef",
        "name": 'média/it\'s a "file".bin',
    }


def test_json_line_with_an_exception_has_its_traceback() -> None:
    rec = record("bucket=%s: unexpected error serving %s", "c4ceaf6a6a4f4ebe", "/upload/x", exc=True)
    line = json.loads(JsonFormatter("bucket").format(rec))
    assert line["level"] == "INFO"
    assert line["role"] == "bucket"
    assert line["bucket"] == "c4ceaf6a6a4f4ebe"
    assert line["msg"] == "bucket=c4ceaf6a6a4f4ebe: unexpected error serving /upload/x"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith("RuntimeError: the disk is on fire")


def test_json_line_without_context_or_exception_has_only_the_base_fields() -> None:
    line = json.loads(JsonFormatter("up").format(record("the stack is up")))
    assert set(line) == {"ts", "level", "role", "logger", "msg"}


@pytest.mark.parametrize(
    ("message", "context"),
    [
        ("session=3 client went away (None)", {"session": 3}),
        (
            "move upload=00ff00ff00ff00ff00ff00ff00ff00ff part 2 from bucket=aa to bb failed: x",
            {"upload": "00ff00ff00ff00ff00ff00ff00ff00ff", "bucket": "aa"},
        ),
        ("bucket=abc: refused", {"bucket": "abc"}),
        ("bucket=abc, upload=def; name='a b'", {"bucket": "abc", "upload": "def", "name": "a b"}),
        ("a bucket=first and bucket=second", {"bucket": "first"}),  # the first one counts
        ("rename=x subbucket=y upload_id=z", {}),  # only whole keys
        ('name="it\'s"', {"name": "it's"}),
        ("name='\\u00e9\\n'", {"name": "é\n"}),
    ],
)
def test_context_tokens(message: str, context: dict[str, object]) -> None:
    assert context_of(message) == context


def test_text_format_is_unchanged() -> None:
    rec = record("session=%d upload=%s name=%r failed", 1, "ab", "x")
    line = text_formatter("api").format(rec)
    stamp = datetime.fromtimestamp(CREATED).strftime("%Y-%m-%dT%H:%M:%S")  # local time, as before
    assert line == f"{stamp} INFO    api karma8.api.upload: session=1 upload=ab name='x' failed"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_configure_logging_picks_the_format(root_logger: logging.Logger) -> None:
    configure_logging("debug", "bucket", "json")
    (handler,) = root_logger.handlers
    assert isinstance(handler.formatter, JsonFormatter)
    assert root_logger.level == logging.DEBUG
    configure_logging("info", "api")
    (handler,) = root_logger.handlers
    assert handler.formatter is not None
    assert not isinstance(handler.formatter, JsonFormatter)
    assert re.fullmatch(r".* INFO    api karma8.api.upload: hi", handler.formatter.format(record("hi")))
    with pytest.raises(ValueError, match="unknown log format"):
        configure_logging("info", "api", "xml")
