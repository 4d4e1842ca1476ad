"""The Prometheus metrics of the API server (docs/observability.md lists them).

:class:`ApiMetrics` is built in the composition root on the process's own registry and
handed to the components that count: the session edge, uploads, the janitor, the
reconciler and the rebalancer. They count once per transfer or event, never per chunk.
What the buckets report in their heartbeats is read when scraped (:meth:`watch_buckets`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from karma8.core.protocol import Op
from karma8.core.records import Usage

#: Upload and download durations: 1 ms (a tiny file) to 10 min (10 GiB at ~20 MB/s).
DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

#: Outcomes of a session besides the error codes (``not_found``, ``timeout``, ...).
OK = "ok"
DISCONNECTED = "disconnected"  # the client went away without an error frame
CANCELLED = "cancelled"  # the server stopped

#: Endpoints of the API process (label ``endpoint`` of karma8_api_connection_errors_total).
WEBSOCKET = "websocket"
MEMBERSHIP = "membership"
METRICS_HTTP = "metrics"

#: Why fragments were deleted (label ``reason`` of karma8_api_deleted_fragments_total).
CLEANUP = "cleanup"  # by a failed upload's own cleanup
JANITOR = "janitor"  # of failed, replaced and deleted uploads, by the janitor
STALE = "stale"  # copies the rebalancer left behind, by the janitor
ORPHAN = "orphan"  # unknown to the registry, by reconciliation


@dataclass(frozen=True, slots=True)
class BucketSample:
    """One bucket as the API server sees it at a scrape."""

    bucket_id: str
    live: bool
    usage: Usage


class ApiMetrics:
    """Every metric of the API server, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        # -- transfers, sessions, errors (counted at the session edge) -----------------
        self.uploaded_bytes = Counter(
            "karma8_api_uploaded_bytes",
            "Bytes received from clients in uploads (of failed uploads too).",
            registry=r,
        )
        self.downloaded_bytes = Counter(
            "karma8_api_downloaded_bytes",
            "Bytes sent to clients in downloads (of failed downloads too).",
            registry=r,
        )
        self.uploads = Counter(
            "karma8_api_uploads", "Uploads that ended, by outcome.", ["outcome"], registry=r
        )
        self.downloads = Counter(
            "karma8_api_downloads", "Downloads that ended, by outcome.", ["outcome"], registry=r
        )
        self.upload_seconds = Histogram(
            "karma8_api_upload_duration_seconds",
            "Duration of committed uploads, from the handshake to the ack.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.download_seconds = Histogram(
            "karma8_api_download_duration_seconds",
            "Duration of complete downloads, from the handshake to the last frame.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "karma8_api_sessions", "WebSocket sessions being served, by operation.", ["op"], registry=r
        )
        self.errors = Counter(
            "karma8_api_errors", "Error frames sent to clients, by error code.", ["code"], registry=r
        )
        self.connection_errors = Counter(
            "karma8_api_connection_errors",
            "Connections ended by an unexpected error (a bug: see the log), by endpoint; "
            "the server kept serving the others.",
            ["endpoint"],
            registry=r,
        )
        for endpoint in (WEBSOCKET, MEMBERSHIP, METRICS_HTTP):
            self.connection_errors.labels(endpoint)
        # -- failed uploads and garbage -------------------------------------------------
        self.upload_cleanups = Counter(
            "karma8_api_upload_cleanups",
            "Cleanups of failed uploads: done, or left (partly) to the janitor.",
            ["result"],
            registry=r,
        )
        self.deleted_fragments = Counter(
            "karma8_api_deleted_fragments",
            "Fragments the buckets confirmed deleted, by reason.",
            ["reason"],
            registry=r,
        )
        self.janitor_sweeps = Counter("karma8_api_janitor_sweeps", "Janitor passes.", registry=r)
        self.janitor_pending = Gauge(
            "karma8_api_janitor_pending_deletions",
            "Deletions (per upload and bucket, and stale copies) pending at the last janitor pass.",
            registry=r,
        )
        self.reconciliations = Counter(
            "karma8_api_reconciliations",
            "Reconciliations of a bucket's listing with the registry, by result.",
            ["result"],
            registry=r,
        )
        self.missing_fragments = Gauge(
            "karma8_api_missing_fragments",
            "Fragments of committed files missing from their bucket, per the last listings.",
            registry=r,
        )
        # -- the rebalancer --------------------------------------------------------------
        self.rebalance_running = Gauge(
            "karma8_api_rebalance_running", "1 while a rebalance run is moving fragments.", registry=r
        )
        self.rebalance_runs = Counter(
            "karma8_api_rebalance_runs", "Rebalance runs that moved something.", registry=r
        )
        self.rebalance_moves = Counter(
            "karma8_api_rebalance_moves",
            "Fragment moves that ended: done, failed, or discarded (the file changed meanwhile).",
            ["result"],
            registry=r,
        )
        self.rebalance_moved_bytes = Counter(
            "karma8_api_rebalance_moved_bytes", "Bytes of the fragments moved.", registry=r
        )
        self.rebalance_pending_moves = Gauge(
            "karma8_api_rebalance_pending_moves",
            "Moves the current run's plan has left (0 when idle).",
            registry=r,
        )
        # -- erasure coding and repair (docs/durability.md) -------------------------------
        self.owed_fragments = Counter(
            "karma8_api_owed_fragments",
            "Fragments an upload was acknowledged without (its quorum met), owed to repair.",
            registry=r,
        )
        self.degraded_reads = Counter(
            "karma8_api_degraded_reads",
            "Downloads that read around a failed, stalled or damaged fragment (and queued a repair).",
            registry=r,
        )
        self.repair_queue = Gauge("karma8_api_repair_queue_files", "Files in the repair queue.", registry=r)
        self.repair_at_risk = Gauge(
            "karma8_api_repair_at_risk_files",
            "Files in the repair queue with no fragment to spare (one more loss and they cannot be read).",
            registry=r,
        )
        self.repairs = Counter(
            "karma8_api_repairs",
            "Repairs of one file that ended: done (all fragments of its scheme), later (retried), failed.",
            ["result"],
            registry=r,
        )
        self.repaired_fragments = Counter(
            "karma8_api_repaired_fragments", "Fragments rebuilt and switched in by repairs.", registry=r
        )
        self.repair_read_bytes = Counter(
            "karma8_api_repair_read_bytes", "File bytes read by repairs (to rebuild fragments).", registry=r
        )
        # Series that exist from the start, so that rates and alerts need no special case.
        for op in Op:
            self.sessions.labels(op.value)
        self.uploads.labels(OK)
        self.downloads.labels(OK)
        for result in ("done", "left_to_janitor"):
            self.upload_cleanups.labels(result)
        for reason in (CLEANUP, JANITOR, STALE, ORPHAN):
            self.deleted_fragments.labels(reason)
        for result in ("ok", "skipped"):
            self.reconciliations.labels(result)
        for result in ("done", "failed", "discarded"):
            self.rebalance_moves.labels(result)
        for result in ("done", "later", "failed"):
            self.repairs.labels(result)

    def watch_buckets(self, read: Callable[[], Sequence[BucketSample]]) -> None:
        """Report the buckets ``read`` returns at every scrape (called on a scrape thread)."""
        self.registry.register(_BucketCollector(read))

    def session_ended(self, op: Op, outcome: str, nbytes: int, seconds: float) -> None:
        """Count one upload or download (other operations count only their errors)."""
        if op is Op.UPLOAD:
            self.uploaded_bytes.inc(nbytes)
            self.uploads.labels(outcome).inc()
            if outcome == OK:
                self.upload_seconds.observe(seconds)
        elif op is Op.DOWNLOAD:
            self.downloaded_bytes.inc(nbytes)
            self.downloads.labels(outcome).inc()
            if outcome == OK:
                self.download_seconds.observe(seconds)


class _BucketCollector:
    """Per-bucket gauges from the last heartbeat of each bucket, as of the scrape."""

    def __init__(self, read: Callable[[], Sequence[BucketSample]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families(())

    def collect(self) -> Iterable[Metric]:
        return self._families(self._read())

    @staticmethod
    def _families(samples: Sequence[BucketSample]) -> list[Metric]:
        bucket = ["bucket"]
        live = GaugeMetricFamily(
            "karma8_api_bucket_live", "1 while the bucket heartbeats in time.", labels=bucket
        )
        used = GaugeMetricFamily(
            "karma8_api_bucket_used_bytes",
            "Bytes of fragments on the bucket (its last heartbeat).",
            labels=bucket,
        )
        free = GaugeMetricFamily(
            "karma8_api_bucket_free_bytes", "Bytes free on the bucket (its last heartbeat).", labels=bucket
        )
        capacity = GaugeMetricFamily(
            "karma8_api_bucket_capacity_bytes", "Capacity of the bucket (its last heartbeat).", labels=bucket
        )
        fragments = GaugeMetricFamily(
            "karma8_api_bucket_fragments", "Fragments on the bucket (its last heartbeat).", labels=bucket
        )
        total = GaugeMetricFamily("karma8_api_live_buckets", "Buckets that heartbeat in time.")
        for s in samples:
            labels = [s.bucket_id]
            live.add_metric(labels, 1 if s.live else 0)
            used.add_metric(labels, s.usage.used)
            free.add_metric(labels, s.usage.free)
            capacity.add_metric(labels, s.usage.capacity)
            fragments.add_metric(labels, s.usage.fragments)
        total.add_metric([], sum(s.live for s in samples))
        return [live, used, free, capacity, fragments, total]
