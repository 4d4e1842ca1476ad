"""The Prometheus metrics of a bucket server (docs/observability.md lists them).

:class:`BucketMetrics` is built in the composition root on the process's own registry
and handed to the components that count. Calls are counted once each, when they end,
never per chunk; the store's usage is read when scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator

from grpclib import GRPCError
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from karma8.bucket.store import FragmentStore

#: Results a call is counted under: ``ok``, a gRPC status in lower case
#: (``invalid_argument``, ``not_found``, ``data_loss``, ``resource_exhausted``, ...),
#: ``cancelled`` (the caller went away) or ``internal`` (a bug).
OK = "ok"


class BucketMetrics:
    """Every metric of one bucket server, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.puts = Counter(
            "karma8_bucket_puts", "Put calls (fragments written), by result.", ["result"], registry=registry
        )
        self.gets = Counter(
            "karma8_bucket_gets", "Get calls (fragments read), by result.", ["result"], registry=registry
        )
        self.deletes = Counter(
            "karma8_bucket_deletes", "Delete calls, by result.", ["result"], registry=registry
        )
        self.written_bytes = Counter(
            "karma8_bucket_written_bytes",
            "Fragment bytes received by Puts and written (also of Puts that failed later).",
            registry=registry,
        )
        self.read_bytes = Counter(
            "karma8_bucket_read_bytes", "Fragment bytes sent by Gets.", registry=registry
        )
        self.batches = Counter(
            "karma8_bucket_batch_calls",
            "Batches: PutMany and GetMany calls and stream messages (items count under puts or gets too).",
            ["call"],
            registry=registry,
        )
        self.deleted_fragments = Counter(
            "karma8_bucket_deleted_fragments", "Fragments removed by Delete calls.", registry=registry
        )
        self.tmp_removed = Gauge(
            "karma8_bucket_tmp_files_removed_at_start",
            "Unfinished Put files found in tmp/ and removed when the bucket started.",
            registry=registry,
        )
        self.heartbeat_failures = Counter(
            "karma8_bucket_heartbeat_failures",
            "Heartbeats the API server did not acknowledge (unreachable or refused).",
            registry=registry,
        )
        self.registered = Gauge(
            "karma8_bucket_registered",
            "1 while the API server acknowledged the last heartbeat, else 0.",
            registry=registry,
        )
        self.metrics_http_errors = Counter(
            "karma8_bucket_metrics_http_errors",
            "Requests to /metrics, /healthz or /ready ended by an unexpected error (a bug: see the log).",
            registry=registry,
        )
        for counter in (self.puts, self.gets, self.deletes):
            counter.labels(OK)

    def watch_store(self, store: FragmentStore) -> None:
        """Report ``store``'s usage from now on (read at every scrape)."""
        self.tmp_removed.set(store.tmp_removed)
        self.registry.register(_StoreCollector(store))

    @contextlib.contextmanager
    def count(self, counter: Counter) -> Iterator[None]:
        """Count one call under its result when the block ends."""
        result = OK
        try:
            yield
        except GRPCError as exc:
            result = exc.status.name.lower()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            result = "cancelled"
            raise
        except BaseException:
            result = "internal"
            raise
        finally:
            counter.labels(result).inc()


class _StoreCollector:
    """The store's space and fragment count, as of the scrape."""

    def __init__(self, store: FragmentStore) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        # usage() is safe from any thread: a statvfs and two counters kept under a lock.
        return self._families(self._store)

    @staticmethod
    def _families(store: FragmentStore | None = None) -> list[Metric]:
        used = GaugeMetricFamily("karma8_bucket_used_bytes", "Bytes of fragment data stored.")
        free = GaugeMetricFamily("karma8_bucket_free_bytes", "Bytes still free for fragments.")
        capacity = GaugeMetricFamily(
            "karma8_bucket_capacity_bytes", "Capacity: the configured one, else the filesystem's size."
        )
        fragments = GaugeMetricFamily("karma8_bucket_fragments", "Fragments stored.")
        info = GaugeMetricFamily("karma8_bucket_info", "The bucket's id (always 1).", labels=["bucket"])
        volumes = GaugeMetricFamily("karma8_bucket_volumes", "Volume files (small fragments as needles).")
        volume_bytes = GaugeMetricFamily(
            "karma8_bucket_volume_bytes", "Bytes of the volume files, live or dead.", labels=["state"]
        )
        batches = CounterMetricFamily(
            "karma8_bucket_volume_batches", "Group commits: needles written with one fdatasync."
        )
        needles = CounterMetricFamily("karma8_bucket_volume_needles", "Needles written (puts and deletes).")
        reclaimed = CounterMetricFamily(
            "karma8_bucket_volume_reclaimed_bytes", "Bytes reclaimed by compacting volumes."
        )
        if store is not None:
            count, total, live = store.volumes.sizes()
            volumes.add_metric([], count)
            volume_bytes.add_metric(["live"], live)
            volume_bytes.add_metric(["dead"], total - live)
            stats = store.volumes.stats
            batches.add_metric([], stats.batches)
            needles.add_metric([], stats.needles)
            reclaimed.add_metric([], stats.reclaimed)
            usage = store.usage()
            used.add_metric([], usage.used)
            free.add_metric([], usage.free)
            capacity.add_metric([], usage.capacity)
            fragments.add_metric([], usage.fragments)
            info.add_metric([store.bucket_id], 1)
        return [used, free, capacity, fragments, info, volumes, volume_bytes, batches, needles, reclaimed]
