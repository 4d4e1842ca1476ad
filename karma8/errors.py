"""The one error hierarchy of karma8.

Every expected failure is a :class:`Karma8Error` with a stable ``code`` (the string a
client sees in ``{"ok": false, "error": code}``) and the data that explains it. Bugs are
not Karma8Errors and are never caught as if they were expected.
"""

from __future__ import annotations


class Karma8Error(Exception):
    """Root of all expected karma8 errors."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(Karma8Error):
    """The request is malformed (bad frame, bad JSON, unknown path, ...)."""

    code = "bad_request"


class BadName(Karma8Error):
    """A file name breaks the naming rules."""

    code = "bad_name"


class NotFound(Karma8Error):
    """No committed file has this name."""

    code = "not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no file named {name!r}")
        self.name = name


class TooLarge(Karma8Error):
    """The announced size exceeds the configured maximum."""

    code = "too_large"


class SizeMismatch(Karma8Error):
    """More or fewer bytes arrived than were announced."""

    code = "size_mismatch"


class ChecksumMismatch(Karma8Error):
    """Data does not match its sha256."""

    code = "checksum_mismatch"


class NotEnoughBuckets(Karma8Error):
    """Fewer live buckets than parts per file."""

    code = "not_enough_buckets"

    def __init__(self, live: int, needed: int, *, with_room: bool = False) -> None:
        what = "live bucket(s) with room for a part" if with_room else "live bucket(s)"
        super().__init__(f"{live} {what}, {needed} needed")
        self.live = live
        self.needed = needed


class Unreadable(Karma8Error):
    """Fewer fragments of a file are readable than its data parts: it cannot be served now."""

    code = "unreadable"


class BucketUnavailable(Karma8Error):
    """A bucket could not be reached or failed mid-transfer."""

    code = "bucket_unavailable"

    def __init__(self, bucket_id: str, detail: str) -> None:
        super().__init__(f"bucket {bucket_id}: {detail}")
        self.bucket_id = bucket_id
        self.detail = detail


class FragmentNotFound(BucketUnavailable):
    """A live bucket does not hold a fragment the registry places on it."""


class RegistryUnavailable(Karma8Error):
    """The registry's database cannot be reached (PostgreSQL down, SQLite locked too long)."""

    code = "unavailable"


class Unauthorized(Karma8Error):
    """The client presented no valid token (the API server's ``client_token``)."""

    code = "unauthorized"


class Conflict(Karma8Error):
    """Another upload of the same name is in progress."""

    code = "conflict"


class Timeout(Karma8Error):
    """A peer stopped sending or reading for longer than the configured limit."""

    code = "timeout"


class Internal(Karma8Error):
    """An unexpected server-side failure (details are in the server's log)."""

    code = "internal"


class ConfigError(Karma8Error):
    """Configuration is invalid (unknown key, bad value, unreadable file)."""

    code = "config"


class ConnectionFailed(Karma8Error):
    """The client could not reach the API server or lost it mid-request."""

    code = "connection_failed"


class RemoteError(Karma8Error):
    """An error frame from the API server, as the client library raises it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
