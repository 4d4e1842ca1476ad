"""The WebSocket protocol codec: request paths, upload headers, reply frames."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from karma8.core.listing import Cursor, ListQuery
from karma8.core.protocol import (
    CloseCode,
    Op,
    Request,
    UploadHeader,
    close_code_for,
    decode_reply,
    encode_error,
    encode_ok,
    encode_session_request,
    encode_upload_header,
    parse_path,
    parse_session_request,
    parse_upload_header,
)
from karma8.errors import (
    BadName,
    BadRequest,
    BucketUnavailable,
    ChecksumMismatch,
    Conflict,
    Internal,
    Karma8Error,
    NotEnoughBuckets,
    NotFound,
    RemoteError,
    SizeMismatch,
    TooLarge,
)

DIGEST = "0123456789abcdef" * 4

# -- parse_path ----------------------------------------------------------------------


@pytest.mark.parametrize("op", [Op.UPLOAD, Op.DOWNLOAD, Op.STAT, Op.DELETE])
def test_named_ops(op: Op) -> None:
    assert parse_path(f"/{op.value}/reports/2024.csv") == Request(op, name="reports/2024.csv")


@pytest.mark.parametrize("op", [Op.FILES, Op.STATUS])
def test_unnamed_ops(op: Op) -> None:
    assert parse_path(f"/{op.value}") == Request(op)


def test_verify_takes_an_optional_name() -> None:
    assert parse_path("/verify") == Request(Op.VERIFY)
    assert parse_path("/verify/a/b%20c") == Request(Op.VERIFY, name="a/b c")
    with pytest.raises(BadName):
        parse_path("/verify/a/../b")


def test_rebalance_takes_a_dry_run_flag() -> None:
    assert parse_path("/rebalance") == Request(Op.REBALANCE)
    assert parse_path("/rebalance?dry_run=1") == Request(Op.REBALANCE, dry_run=True)
    assert parse_path("/rebalance?dry_run=0") == Request(Op.REBALANCE)
    for bad in ("/rebalance?dry_run=yes", "/rebalance?dry_run", "/rebalance/x"):
        with pytest.raises(BadRequest):
            parse_path(bad)


def test_repair_takes_nothing() -> None:
    assert parse_path("/repair") == Request(Op.REPAIR)
    assert parse_path("/repair?x=1") == Request(Op.REPAIR)  # like /status: a query is ignored
    with pytest.raises(BadRequest):
        parse_path("/repair/x")


def test_a_session_request_is_the_path_of_an_operation() -> None:
    assert parse_path("/session") == Request(Op.SESSION)
    assert parse_session_request(encode_session_request("/stat/a%20b")) == Request(Op.STAT, name="a b")
    listing = parse_session_request('{"path": "/files?prefix=d%2F&limit=5"}').listing
    assert listing == ListQuery("d/", limit=5, paged=True)
    for bad in ("[]", "{}", '{"path": 1}', '{"path": "/stat/x", "x": 1}', '{"path": "/session"}', "nope"):
        with pytest.raises(BadRequest):
            parse_session_request(bad)
    with pytest.raises(BadName):
        parse_session_request('{"path": "/stat/a/../b"}')


def test_every_op_is_covered() -> None:
    # The tests above between them name every Op; a new one needs a test.
    covered = {
        Op.UPLOAD,
        Op.DOWNLOAD,
        Op.STAT,
        Op.DELETE,
        Op.FILES,
        Op.STATUS,
        Op.VERIFY,
        Op.REBALANCE,
        Op.REPAIR,
        Op.SESSION,
    }
    assert covered == set(Op)


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("hello%20world", "hello world"),
        ("caf%C3%A9.txt", "café.txt"),
        ("%E6%97%A5%E6%9C%AC/%F0%9F%98%80", "日本/😀"),
        ("a%2Fb", "a/b"),
        ("a%2fb", "a/b"),
        ("100%25", "100%"),
        ("what%3F%23", "what?#"),
    ],
)
def test_percent_encoded_names(raw: str, name: str) -> None:
    assert parse_path(f"/download/{raw}") == Request(Op.DOWNLOAD, name=name)


@pytest.mark.parametrize(
    ("query", "prefix"),
    [
        ("", ""),
        ("?prefix=logs%2F", "logs/"),
        ("?prefix=caf%C3%A9", "café"),
        ("?prefix=a&prefix=b", "b"),
        ("?prefix=", ""),
        ("?other=1", ""),
    ],
)
def test_files_prefix(query: str, prefix: str) -> None:
    assert parse_path(f"/files{query}") == Request(Op.FILES, listing=ListQuery(prefix))


def test_files_paging_parameters() -> None:
    token = Cursor("logs/b", inclusive=True).token()
    req = parse_path(f"/files?prefix=logs%2F&delimiter=%2F&limit=10&continuation={token}&start_after=x")
    assert req.listing == ListQuery("logs/", "/", Cursor("logs/b", inclusive=True), 10, paged=True)
    assert parse_path("/files?start_after=a%20b").listing == ListQuery(start=Cursor("a b"), paged=True)
    assert parse_path("/files?limit=1000").listing.paged


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=ten", "limit"),
        ("?continuation=%21%21", "continuation"),
        ("?continuation=eHl6", "continuation"),  # "xyz": not ours
        ("?prefix=a%00b", "control character"),
        ("?start_after=a%0Ab", "control character"),
        ("?prefix=" + "a" * 1025, "longer than"),
    ],
)
def test_files_bad_paging_parameters(query: str, problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        parse_path(f"/files{query}")


@pytest.mark.parametrize("query", ["?prefix=%ff", "?prefix"])
def test_files_malformed_query(query: str) -> None:
    with pytest.raises(BadRequest, match="query"):
        parse_path(f"/files{query}")


@pytest.mark.parametrize(
    "path", ["/", "", "/uploads/x", "/UPLOAD/x", "/nope", "/%75pload/x", "//[", "//host/upload/x"]
)
def test_unknown_ops(path: str) -> None:
    with pytest.raises(BadRequest, match="unknown path"):
        parse_path(path)


@pytest.mark.parametrize("path", ["/files/x", "/status/x", "/files/a/b"])
def test_names_on_unnamed_ops(path: str) -> None:
    with pytest.raises(BadRequest, match="takes no name"):
        parse_path(path)


@pytest.mark.parametrize("path", ["/upload", "/upload/", "/download/", "/stat", "/delete/"])
def test_missing_name(path: str) -> None:
    with pytest.raises(BadName, match="empty"):
        parse_path(path)


@pytest.mark.parametrize("path", ["/upload/a/../b", "/upload/a%00b", "/upload/%ff", "/upload/a%zz"])
def test_bad_names(path: str) -> None:
    with pytest.raises(BadName):
        parse_path(path)


def test_bad_name_is_not_a_bad_request() -> None:
    # Clients see "bad_name", not the generic "bad_request".
    with pytest.raises(BadName) as info:
        parse_path("/upload/")
    assert not isinstance(info.value, BadRequest)
    assert info.value.code == "bad_name"


# -- parse_upload_header ---------------------------------------------------------------


def test_header_size_only() -> None:
    assert parse_upload_header('{"size": 42}', max_size=100) == UploadHeader(size=42)


def test_header_with_sha256() -> None:
    text = json.dumps({"size": 0, "sha256": DIGEST})
    assert parse_upload_header(text, max_size=100) == UploadHeader(size=0, sha256=DIGEST)


def test_header_size_at_the_limit() -> None:
    assert parse_upload_header('{"size": 100}', max_size=100).size == 100


def test_header_too_large() -> None:
    with pytest.raises(TooLarge) as info:
        parse_upload_header('{"size": 101}', max_size=100)
    assert info.value.code == "too_large"


@pytest.mark.parametrize(
    "text",
    [
        '{"size": -1}',
        '{"size": true}',
        '{"size": false}',
        '{"size": 1.0}',
        '{"size": 1e3}',
        '{"size": "10"}',
        '{"size": null}',
        '{"size": NaN}',
        '{"size": [1]}',
        "{}",
        json.dumps({"sha256": DIGEST}),
    ],
)
def test_header_bad_size(text: str) -> None:
    with pytest.raises(BadRequest, match="size"):
        parse_upload_header(text, max_size=100)


def test_header_unknown_keys() -> None:
    with pytest.raises(BadRequest, match="unknown key") as info:
        parse_upload_header('{"size": 1, "name": "x", "mode": 1}', max_size=100)
    assert "mode" in info.value.message
    assert "name" in info.value.message


@pytest.mark.parametrize(
    "digest",
    [DIGEST.upper(), DIGEST[:-1], DIGEST + "0", "g" * 64, " " + DIGEST[1:], DIGEST[:-1] + "\n", 1, ["x"]],
)
def test_header_bad_sha256(digest: object) -> None:
    text = json.dumps({"size": 1, "sha256": digest})
    with pytest.raises(BadRequest, match="sha256"):
        parse_upload_header(text, max_size=100)


def test_header_null_sha256_means_none() -> None:
    assert parse_upload_header('{"size": 1, "sha256": null}', max_size=100).sha256 is None


@pytest.mark.parametrize("text", ["", "size=1", "{", "{'size': 1}", "[" * 100_000])
def test_header_not_json(text: str) -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_upload_header(text, max_size=100)


@pytest.mark.parametrize("text", ["[]", "1", '"size"', "null", '[{"size": 1}]'])
def test_header_not_an_object(text: str) -> None:
    with pytest.raises(BadRequest, match="not a JSON object"):
        parse_upload_header(text, max_size=100)


@pytest.mark.parametrize("header", [UploadHeader(size=0), UploadHeader(size=10**12, sha256=DIGEST)])
def test_header_round_trip(header: UploadHeader) -> None:
    assert parse_upload_header(encode_upload_header(header), max_size=10**12) == header


# -- replies -----------------------------------------------------------------------------


def test_ok_round_trip() -> None:
    fields = decode_reply(encode_ok(name="a/b", size=3, sha256=DIGEST, files=[["x", 1]]))

    assert fields == {"ok": True, "name": "a/b", "size": 3, "sha256": DIGEST, "files": [["x", 1]]}


def test_ok_without_fields() -> None:
    assert decode_reply(encode_ok()) == {"ok": True}


@pytest.mark.parametrize(
    "error",
    [
        BadRequest("bad frame"),
        NotFound("a/b"),
        TooLarge("too big"),
        NotEnoughBuckets(live=2, needed=6),
        BucketUnavailable("b1", "timed out"),
        Internal("boom"),
        BadRequest("unicode: café ✓"),
    ],
)
def test_error_round_trip(error: Karma8Error) -> None:
    frame = encode_error(error)

    assert json.loads(frame) == {"ok": False, "error": error.code, "message": error.message}
    with pytest.raises(RemoteError) as info:
        decode_reply(frame)
    assert info.value.code == error.code
    assert info.value.message == error.message
    assert str(info.value) == error.message


def test_error_frame_without_details() -> None:
    with pytest.raises(RemoteError) as info:
        decode_reply('{"ok": false}')
    assert info.value.code == "internal"
    assert info.value.message == ""


@pytest.mark.parametrize("text", ['{"size": 1}', '{"ok": 1}', '{"ok": "true"}', '{"ok": null}'])
def test_reply_without_ok(text: str) -> None:
    with pytest.raises(BadRequest, match="'ok'"):
        decode_reply(text)


@pytest.mark.parametrize("text", ["nope", "[true]"])
def test_reply_not_an_object(text: str) -> None:
    with pytest.raises(BadRequest):
        decode_reply(text)


# -- close codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BadRequest("x"), CloseCode.BAD_REQUEST),
        (BadName("x"), CloseCode.BAD_REQUEST),
        (SizeMismatch("x"), CloseCode.BAD_REQUEST),
        (ChecksumMismatch("x"), CloseCode.BAD_REQUEST),
        (NotFound("x"), CloseCode.NOT_FOUND),
        (TooLarge("x"), CloseCode.TOO_BIG),
        (Conflict("x"), CloseCode.CONFLICT),
        (NotEnoughBuckets(1, 6), CloseCode.TRY_AGAIN_LATER),
        (BucketUnavailable("b", "x"), CloseCode.TRY_AGAIN_LATER),
        (Internal("x"), CloseCode.INTERNAL_ERROR),
    ],
)
def test_close_code_for(error: Karma8Error, code: CloseCode) -> None:
    assert close_code_for(error.code) is code


@pytest.mark.parametrize("error_code", ["", "internal", "no_such_code", "config"])
def test_close_code_for_unknown_is_internal_error(error_code: str) -> None:
    assert close_code_for(error_code) is CloseCode.INTERNAL_ERROR


def test_close_codes_are_valid_on_the_wire() -> None:
    # 1000-1015 are IANA-registered, 4000-4999 are for applications; 1005/1006/1015
    # must never be sent in a close frame.
    for code in CloseCode:
        assert 1000 <= code <= 1014 or 4000 <= code <= 4999
        assert code not in (1004, 1005, 1006)


# -- properties: any input gives a value or one of our errors, never another exception ---

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
#: Paths as a hostile client writes them: our words, escapes, separators and any text.
PATH_PIECES = st.sampled_from(
    [
        *(f"/{op.value}" for op in Op),
        "/",
        "//",
        "?",
        "#",
        "&",
        "=",
        "%",
        "%2F",
        "%ff",
        "%00",
        "[",
        "..",
        ".",
        "a",
    ]
)
PATHS = st.lists(PATH_PIECES | st.text(max_size=6), max_size=8).map("".join)


@given(st.one_of(PATHS, st.text()))
@example("//[")  # urlsplit read it as a broken IPv6 authority: ValueError, an `internal`
@example("//host/upload/x")  # ... and this as host "host" with path /upload/x
@settings(max_examples=500)
def test_parse_path_gives_a_request_or_our_error(path: str) -> None:
    try:
        req = parse_path(path)
    except (BadRequest, BadName):
        return
    if req.op in (Op.UPLOAD, Op.DOWNLOAD, Op.STAT, Op.DELETE):
        assert req.name
    assert req.name == "" or "\x00" not in req.name


@given(st.one_of(st.text(), JSON.map(json.dumps)), st.integers(min_value=0, max_value=2**64))
@settings(max_examples=500)
def test_parse_upload_header_gives_a_valid_header_or_our_error(text: str, max_size: int) -> None:
    try:
        header = parse_upload_header(text, max_size)
    except (BadRequest, TooLarge):
        return
    assert 0 <= header.size <= max_size
    assert header.sha256 is None or len(header.sha256) == 64


@given(
    st.integers(min_value=0, max_value=2**63),
    st.none() | st.text("0123456789abcdef", min_size=64, max_size=64),
)
def test_upload_header_round_trip(size: int, digest: str | None) -> None:
    header = UploadHeader(size, digest)
    assert parse_upload_header(encode_upload_header(header), max_size=2**63) == header


def test_deeply_nested_json_is_a_bad_request() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_upload_header("[" * 100_000 + "]" * 100_000, max_size=1)
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_upload_header('{"size": ' + "9" * 5000 + "}", max_size=1)  # over int's digit limit


@given(st.one_of(st.text(), JSON.map(json.dumps)))
@settings(max_examples=300)
def test_decode_reply_gives_fields_or_our_error(text: str) -> None:
    try:
        fields = decode_reply(text)
    except (RemoteError, BadRequest):
        return
    assert fields["ok"] is True


@given(st.text(min_size=1, max_size=40), st.text(max_size=200))
def test_error_frames_round_trip(code: str, message: str) -> None:
    error = Karma8Error(message)
    error.code = code
    with pytest.raises(RemoteError) as info:
        decode_reply(encode_error(error))
    assert (info.value.code, info.value.message) == (code, message)
