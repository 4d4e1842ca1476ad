"""Listing pages: the pure arithmetic, and pages of the registry on both databases against a
model (every name once, in order, common prefixes rolled up), also while names come and go."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest

from karma8.core.listing import MAX_PAGE, Cursor, ListQuery, common_prefix, successor
from karma8.core.names import validate_name
from karma8.errors import BadName, BadRequest
from karma8.registry import database
from karma8.registry.db import FragmentRow, RegistryDB, UploadRow

DIGEST = "cd" * 32
ALPHABET = ["a", "b", "z", "/", "-", "é", "日", "\U0001f600", "\ud7ff", "\ue000", "\U0010ffff"]


# -- pure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "after"),
    [
        ("a", "b"),
        ("logs/", "logs0"),
        ("a\U0010ffff", "b"),
        ("\U0010ffff", None),
        ("", None),
        ("\ud7ff", "\ue000"),  # the surrogates are skipped: no name holds them
        ("日", "旦"),
    ],
)
def test_successor(prefix: str, after: str | None) -> None:
    assert successor(prefix) == after


def test_a_prefix_is_the_range_up_to_its_successor() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        prefix = "".join(rng.choices(ALPHABET, k=rng.randint(1, 3)))
        name = "".join(rng.choices(ALPHABET, k=rng.randint(0, 5)))
        end = successor(prefix)
        in_range = prefix <= name and (end is None or name < end)
        assert in_range == name.startswith(prefix), (prefix, name)
        # Code point order is the byte order of UTF-8 (what SQLite and "C" compare).
        assert (prefix < name) == (prefix.encode() < name.encode())


@pytest.mark.parametrize(
    ("name", "prefix", "delimiter", "rolled"),
    [
        ("a/b/c", "", "/", "a/"),
        ("a/b/c", "a/", "/", "a/b/"),
        ("a/b", "a/", "/", None),
        ("a/b", "a/", "", None),
        ("a--b--c", "a", "--", "a--"),
        ("a/b", "a", "/", "a/"),
    ],
)
def test_common_prefix(name: str, prefix: str, delimiter: str, rolled: str | None) -> None:
    assert common_prefix(name, prefix, delimiter) == rolled


@pytest.mark.parametrize("cursor", [Cursor("a"), Cursor("logs/é", inclusive=True), Cursor("")])
def test_cursor_token_round_trip(cursor: Cursor) -> None:
    token = cursor.token()
    assert token.isascii()
    assert "=" not in token
    assert Cursor.from_token(token) == cursor


def test_a_foreign_token_is_refused() -> None:
    for token in ("", "!!", "eHl6", Cursor("a").token() + "AA=="):
        with pytest.raises(BadRequest):
            Cursor.from_token(token)


def test_the_first_cursor_is_the_later_of_prefix_and_start() -> None:
    assert ListQuery("b/").first() == Cursor("b/", inclusive=True)
    assert ListQuery("b/", start=Cursor("a")).first() == Cursor("b/", inclusive=True)
    assert ListQuery("b/", start=Cursor("b/x")).first() == Cursor("b/x")
    assert ListQuery("b/", start=Cursor("b/")).first() == Cursor("b/")  # after b/ itself


# -- the registry --------------------------------------------------------------------------


@pytest.fixture
def db(registry_url: str) -> Iterator[RegistryDB]:
    registry = RegistryDB(registry_url)
    yield registry
    registry.close()


class Store:
    """Committed names in a registry, and the model of them."""

    def __init__(self, db: RegistryDB) -> None:
        self.db = db
        self.names: set[str] = set()
        self._n = 0

    def put(self, name: str) -> None:
        self._n += 1
        upload_id = f"{self._n:032x}"
        self.db.begin_upload(
            UploadRow(upload_id, name, 3, 1, unit=3, state="in_progress", created=1.0),
            [FragmentRow(upload_id, 0, "b0", 3, None)],
        )
        self.db.commit_upload(upload_id, DIGEST, {0: "00" * 32}, 2.0)
        self.names.add(name)

    def delete(self, name: str) -> None:
        self.db.delete_file(name, 3.0)
        self.names.discard(name)

    def expected(self, prefix: str, delimiter: str, after: str = "") -> list[str]:
        """The model: names and rolled-up prefixes under ``prefix``, by name."""
        out: set[str] = set()
        for name in self.names:
            if name.startswith(prefix):
                out.add(common_prefix(name, prefix, delimiter) or name)
        return sorted(e for e in out if e > after)


def _random_names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        name = "".join(rng.choices(ALPHABET, k=rng.randint(1, 6)))
        try:
            names.add(validate_name(name))
        except BadName:
            continue
    return sorted(names)


def _walk(db: RegistryDB, query: ListQuery) -> Iterator[list[str]]:
    """Pages of ``query`` until the last: each a list of names and prefixes, by name."""
    start = query.start
    while True:
        page = db.list_page(ListQuery(query.prefix, query.delimiter, start, query.limit, paged=True))
        assert len(page.files) + len(page.prefixes) <= query.limit
        yield sorted([f[0] for f in page.files] + page.prefixes)
        if page.next is None:
            return
        start = Cursor.from_token(page.next.token())  # as a client carries it


def test_pages_match_the_model(db: RegistryDB) -> None:
    rng = random.Random(7)
    store = Store(db)
    for name in _random_names(rng, 150):
        store.put(name)
    cases = [("", "", 1), ("", "", 7), ("", "/", 3), ("a", "/", 2), ("a/", "/", 4), ("", "-", 5)]
    cases += [("日", "", 2), ("\U0001f600", "/", 1), ("zz", "/", 3), ("", "/", MAX_PAGE)]
    for prefix, delimiter, limit in cases:
        pages = list(_walk(db, ListQuery(prefix, delimiter, limit=limit)))
        listed = [entry for page in pages for entry in page]
        assert listed == store.expected(prefix, delimiter), (prefix, delimiter, limit)
        assert all(pages[:-1]), "an empty page before the last"
    # start_after: strictly after, and a common prefix starting after is still rolled up.
    for after in ("a", "a/", "b", "é"):
        listed = [e for page in _walk(db, ListQuery("", "/", Cursor(after), 3)) for e in page]
        assert listed == store.expected("", "/", after), after


def test_a_walk_sees_every_name_that_stays_once_in_order_while_names_come_and_go(db: RegistryDB) -> None:
    rng = random.Random(11)
    store = Store(db)
    pool = _random_names(rng, 220)
    for name in pool[::2]:
        store.put(name)
    stayed = set(store.names)
    ever = set(store.names)
    seen: list[str] = []
    for page in _walk(db, ListQuery(limit=9)):
        seen += page
        for _ in range(4):  # between pages: names added and deleted anywhere
            name = rng.choice(pool)
            if name in store.names:
                store.delete(name)
                stayed.discard(name)
            else:
                store.put(name)
                ever.add(name)
    assert seen == sorted(set(seen)), "a name twice or out of order"
    assert stayed <= set(seen), "a name present all along was skipped"
    assert set(seen) <= ever, "a name that never existed"


def test_the_old_form_holds_one_page(db: RegistryDB) -> None:
    store = Store(db)
    for i in range(5):
        store.put(f"f{i}")
    whole = db.list_page(ListQuery(limit=5))
    assert ([f[0] for f in whole.files], whole.next) == ([f"f{i}" for i in range(5)], None)
    cut = db.list_page(ListQuery(limit=4))
    assert cut.next is not None  # the handler refuses it with too_large
    assert db.list_page(ListQuery("f4", limit=1)).next is None


def test_delimiter_listing_reads_one_row_per_common_prefix(
    db: RegistryDB, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipping a common prefix is one index seek: 3 directories of 200 names each are
    listed with 4 queries (one per directory, one for the rest), not 600 rows."""
    store = Store(db)
    for d in ("a", "b", "c"):
        for i in range(200):
            store.put(f"{d}/{i:04}")
    store.put("top")
    statements: list[str] = []
    for cls in (database._SQLiteTx, database._PgTx):
        original = cls.execute

        def execute(self: Any, sql: str, args: Any = (), _original: Any = original) -> Any:
            statements.append(sql)
            return _original(self, sql, args)

        monkeypatch.setattr(cls, "execute", execute)
    page = db.list_page(ListQuery("", "/", limit=10, paged=True))
    assert (page.prefixes, [f[0] for f in page.files], page.next) == (["a/", "b/", "c/"], ["top"], None)
    assert len(statements) == 4
