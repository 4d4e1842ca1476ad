"""Upload sessions: WebSocket frames in, one gRPC Put stream per fragment out.

The file is cut into ``parts`` data parts and ``parity`` parity parts computed stripe by
stripe (karma8/api/writing.py), each fragment on a distinct live bucket. The upload is
acknowledged once ``write_quorum`` fragments are durable; fragments that failed are
recorded as owed in the commit and queued for repair. Any failure that leaves the quorum
out of reach (client gone, garbage, too many buckets down) cancels the upload's nursery,
and the shielded cleanup with its deadline deletes what was stored and marks the upload
failed; what it cannot delete stays pending for the janitor. The previous version of the
name is untouched until the commit.
"""

from __future__ import annotations

import time

import trio

from karma8.api.metrics import CLEANUP
from karma8.api.pool import Bucket
from karma8.api.session import Session
from karma8.api.writing import write_fragments
from karma8.core.coding import Scheme
from karma8.core.fragments import new_upload_id
from karma8.core.layout import Layout
from karma8.core.protocol import encode_ok, parse_upload_header
from karma8.errors import BadRequest, BucketUnavailable, ChecksumMismatch, Karma8Error
from karma8.registry import UploadRow


async def handle_upload(session: Session, name: str) -> None:
    """Serve ``/upload/{name}``."""
    services = session.services
    config = session.config
    message = await session.receive()
    if isinstance(message, bytes):
        raise BadRequest('an upload starts with a text frame holding {"size": N}')
    header = parse_upload_header(message, config.max_file_size)
    # A second client upload of the name in progress, on any server, is refused when
    # this one is placed (a unique index of the registry): Conflict.
    upload_id = new_upload_id()
    scheme = Scheme.of(config.parts, config.parity)
    layout = Layout.for_size(header.size, scheme.data, config.stripe_unit, scheme.parity)
    # With fewer live buckets than the quorum: write to them all (at least the data
    # parts) and owe the rest, unless the operator asked for refusals instead.
    required = scheme.data if config.degraded_writes else config.quorum
    await services.cluster.settle(scheme.width)
    bucket_ids = await services.registry.place_upload(
        UploadRow.new(upload_id, name, header.size, scheme, layout.unit, time.time()),
        layout.part_sizes(),
        services.cluster.live(),
        required,
    )
    quorum = min(config.quorum, len(bucket_ids))
    log = session.log
    log.upload_id = upload_id  # every line of the session names it from now on
    log.info("name=%r size=%d %s to %s (quorum %d)", name, header.size, scheme, ",".join(bucket_ids), quorum)
    started = trio.current_time()
    try:
        # A bucket that stopped being live since placement is a failed fragment, owed
        # like one that fails mid-upload; the upload fails (through the cleanup below)
        # only if too few are left for the quorum.
        clients: dict[int, Bucket] = {}
        gone: dict[int, Karma8Error] = {}
        for part, bucket_id in enumerate(bucket_ids):
            try:
                clients[part] = services.cluster.client(bucket_id)
            except BucketUnavailable as down:
                gone[part] = down
        if len(clients) < quorum:
            raise next(iter(gone.values()))

        async def receive() -> bytes:
            data = await session.receive_data()
            session.transferred += len(data)
            return data

        written = await write_fragments(receive, layout, scheme, upload_id, clients, quorum, session.limits)
        written.failed.update(gone)
        if header.sha256 is not None and header.sha256 != written.sha256:
            raise ChecksumMismatch(f"data has sha256 {written.sha256}, client announced {header.sha256}")
        for part, exc in sorted(written.failed.items()):
            log.warning("part %d owed to repair: %s", part, exc.message)
        services.metrics.owed_fragments.inc(len(written.failed))
        replaced = await services.registry.commit_upload(
            upload_id, written.sha256, written.stored, owed=written.failed
        )
    except BaseException as exc:
        log.warning("name=%r failed (%s); cleaning up", name, type(exc).__name__)
        clean = False
        with trio.move_on_after(config.cleanup_timeout, shield=True) as scope:
            await services.registry.fail_upload(upload_id)
            clean = await services.janitor.delete(upload_id, bucket_ids, reason=CLEANUP)
            log.info("cleanup %s", "done" if clean else "incomplete, left to the janitor")
        if scope.cancelled_caught:
            log.warning("cleanup timed out; left to the janitor")
        services.metrics.upload_cleanups.labels("done" if clean else "left_to_janitor").inc()
        raise
    elapsed = max(trio.current_time() - started, 1e-9)
    log.info(
        "name=%r committed: %d bytes in %.2f s (%.1f MB/s)",
        name,
        header.size,
        elapsed,
        header.size / elapsed / 1e6,
    )
    if replaced is not None:
        services.janitor.poke()
    if len(written.stored) < scheme.width:
        services.repairer.poke()
    spare = len(written.stored) - scheme.data
    await session.send(
        encode_ok(name=name, size=header.size, sha256=written.sha256, scheme=str(scheme), spare=spare)
    )
