"""``/verify``: the scrub. Every fragment is read whole by its bucket and checked.

A fragment is damaged when its bucket lacks it, when its data no longer matches the
checksum in its footer, or when the data read back differs from the checksum the registry
recorded at upload. Buckets read their own fragments: the data does not travel to the
API. Each file is held by a read lease while it is checked, so a concurrent replacement
cannot pass for data loss. Corrupt fragments are remembered (``stat`` shows the file as
damaged) until a later scrub reads them back intact: the latest ``CORRUPT_KEPT`` (the
repair queue holds every damaged file).

A scrub of every file walks the names a page at a time (``PAGE`` per registry read, an
index range of the name index), so its memory does not grow with the number of files;
only the damaged fragments it reports are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio

from karma8.api.download import lease_current_version
from karma8.api.session import Session
from karma8.core.fragments import fragment_id
from karma8.core.protocol import encode_ok
from karma8.errors import BucketUnavailable, NotFound
from karma8.registry import FileRow, FragmentRow

#: Time allowed for a bucket to read a fragment, on top of rpc_timeout (a slow disk).
READ_RATE = 20e6  # bytes per second
#: Names per registry read of a scrub of every file.
PAGE = 1000


async def _names(session: Session, name: str, page: int) -> AsyncIterator[str]:
    """``name`` alone, or every committed name in order, a page at a time."""
    if name:
        yield name
        return
    after = ""
    while names := await session.services.registry.file_names(after, page):
        for each in names:
            yield each
        after = names[-1]


async def handle_verify(session: Session, name: str) -> None:
    """Serve ``/verify`` (every file) or ``/verify/{name}``."""
    damaged: list[dict[str, object]] = []
    files = fragments = 0
    async for each in _names(session, name, PAGE):
        with contextlib.ExitStack() as lease:
            try:
                file = await lease_current_version(session, each, lease)
            except NotFound:
                if name:
                    raise
                continue  # deleted since the listing
            damaged += await _verify_file(session, file)
        files += 1
        fragments += len(file.fragments)
    session.log.info("verify: %d file(s), %d fragment(s), %d damaged", files, fragments, len(damaged))
    await session.send(encode_ok(files=files, fragments=fragments, damaged=damaged))


async def _verify_file(session: Session, file: FileRow) -> list[dict[str, object]]:
    found: list[dict[str, object]] = []

    async def one(fragment: FragmentRow) -> None:
        problem = await _check(session, fragment)
        if problem:
            found.append(
                {"name": file.name, "part": fragment.part, "bucket": fragment.bucket_id, "problem": problem}
            )

    async with trio.open_nursery() as nursery:
        for fragment in file.fragments:
            nursery.start_soon(one, fragment)
    return sorted(found, key=lambda d: str(d["part"]))


async def _check(session: Session, fragment: FragmentRow) -> str:
    services = session.services
    fid = fragment_id(fragment.upload_id, fragment.part)
    try:
        with trio.fail_after(session.config.rpc_timeout + fragment.size / READ_RATE):
            problem, size, digest = await services.cluster.client(fragment.bucket_id).verify(fid)
    except (BucketUnavailable, trio.TooSlowError) as exc:
        return f"unreachable: {exc}"
    if not problem and (size != fragment.size or (fragment.sha256 and digest != fragment.sha256)):
        problem = "corrupt: differs from the registry's checksum"
    if problem.startswith("corrupt") or problem == "missing":
        if problem != "missing":
            services.reconciler.corrupt.add(fid)
        await services.registry.queue_bad_fragments([(fragment.upload_id, fragment.part)], "scrub")
        services.repairer.poke()
    elif not problem:
        services.reconciler.corrupt.discard(fid)
    return problem
